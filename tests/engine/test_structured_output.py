"""Grammars compiled against the embedded model's tokenizer, matchers per sequence, the step's bitmask, rollback,
and the scheduler masking, advancing and stopping constrained sequences."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_scheduler

from scaleinfer.engine.sequence import Sequence, SequenceStatus
from scaleinfer.engine.structured_output import StructuredOutputs, grammar_bitmask
from scaleinfer.errors import InvalidRequestError
from scaleinfer.outputs import RunnerOutput, SampledToken
from scaleinfer.sampling_params import SamplingParams, StructuredOutputsParams

EOS = 2  # SmolLM2's <|im_end|>


@pytest.fixture(scope="module")
def tokenizer(embedded_gguf):
    from scaleinfer.tokenizer import load_tokenizer

    return load_tokenizer(embedded_gguf)


@pytest.fixture(scope="module")
def structured(tokenizer) -> StructuredOutputs:
    return StructuredOutputs(lambda: tokenizer, len(tokenizer), [EOS])


def constrained_seq(structured, request_id: str, **constraint) -> Sequence:
    params = SamplingParams(structured_outputs=StructuredOutputsParams(**constraint))
    grammar = structured.grammar(structured.compile(params.structured_outputs))
    return Sequence(request_id, [1, 2, 3], params, (EOS,), grammar=grammar)


def allowed(bitmask, row: int, vocab_size: int) -> set[int]:
    words = np.frombuffer(bitmask.data, dtype="<i4").reshape(-1, bitmask.num_words)[row]
    bits = (words[:, None].astype(np.int64) >> np.arange(32)) & 1
    return set(np.flatnonzero(bits.reshape(-1)[:vocab_size]).tolist())


def accept_text(tokenizer, seq: Sequence, text: str) -> bool:
    done = False
    for token_id in tokenizer.encode(text, add_special_tokens=False):
        seq.append_token(token_id)
        done = seq.grammar.accept(token_id)
    return done


@pytest.mark.parametrize(("kind", "value", "words"), [
    ("json", {"type": "objekt"}, "objekt"),
    ("json", {"type": "string", "pattern": "(("}, "(("),
    ("regex", "[a-z", "[a-z"),
    ("grammar", 'root ::= "a" | ', 'root ::= "a" |'),
])
def test_a_constraint_that_does_not_compile_is_refused_naming_it(structured, kind, value, words):
    with pytest.raises(InvalidRequestError) as info:
        structured.compile(StructuredOutputsParams(**{kind: value}))
    message = str(info.value)
    assert f"structured_outputs.{kind}" in message and words in message, message
    assert ".cc:" not in message  # xgrammar's C++ source location is cut


def test_compiled_grammars_are_cached_by_constraint(structured):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    first = structured.compile(StructuredOutputsParams(json=schema))
    again = structured.compile(StructuredOutputsParams(json='{"properties":{"a":{"type":"integer"}},"type":"object"}'))
    assert again is first  # the same schema as a dict or as text, keys in any order
    assert structured.compile(StructuredOutputsParams(regex="a+")) is not first


def test_choice_allows_only_its_prefixes_then_the_end(structured, tokenizer):
    vocab = len(tokenizer)
    seq = constrained_seq(structured, "c", choice=["Paris", "London"])
    first = allowed(grammar_bitmask([seq]), 0, vocab)
    texts = {tokenizer.decode([t]) for t in first}
    assert texts and all("Paris".startswith(t) or "London".startswith(t) for t in texts), texts
    assert EOS not in first
    assert not accept_text(tokenizer, seq, "Paris")
    assert allowed(grammar_bitmask([seq]), 0, vocab) == {EOS}  # complete: only the end remains
    seq.append_token(EOS)
    assert seq.grammar.accept(EOS)  # terminated: the scheduler stops the sequence


def test_a_token_the_grammar_refuses_raises(structured, tokenizer):
    seq = constrained_seq(structured, "r", regex="[0-9]+")
    with pytest.raises(ValueError, match="not allowed"):
        seq.grammar.accept(tokenizer.encode("abc", add_special_tokens=False)[0])


def test_the_matcher_rolls_back_to_the_tokens_its_sequence_keeps(structured, tokenizer):
    vocab = len(tokenizer)
    seq = constrained_seq(structured, "b", choice=["Paris", "London"])
    start = allowed(grammar_bitmask([seq]), 0, vocab)
    accept_text(tokenizer, seq, "London")
    del seq.output_token_ids[:], seq.all_token_ids[3:]  # the output dropped: the state must follow
    assert allowed(grammar_bitmask([seq]), 0, vocab) == start
    assert seq.grammar.num_accepted == 0
    assert not accept_text(tokenizer, seq, "Paris")  # the other branch is open again


def test_the_bitmask_has_rows_only_for_restricting_grammars(structured):
    assert grammar_bitmask([]) is None
    # "(a|b)*" then anything: after nothing accepted, the first token is restricted
    regex = constrained_seq(structured, "x", regex="[ab]+")
    choice = constrained_seq(structured, "y", choice=["yes", "no"])
    bitmask = grammar_bitmask([regex, choice])
    assert bitmask.request_ids == ["x", "y"]
    assert bitmask.num_words == -(-structured.vocab_size // 32)
    assert len(bitmask.data) == 2 * bitmask.num_words * 4


def test_structured_outputs_need_the_tokenizer():
    structured = StructuredOutputs(lambda: None, 100, [0])
    with pytest.raises(InvalidRequestError, match="tokenizer"):
        structured.compile(StructuredOutputsParams(regex="a"))
    assert structured.compile(None) is None


def test_the_scheduler_masks_advances_and_stops_constrained_sequences(structured, tokenizer):
    scheduler = make_scheduler()
    yes = tokenizer.encode("yes", add_special_tokens=False)
    done, broken, free = (constrained_seq(structured, "done", choice=["yes"]),
                          constrained_seq(structured, "broken", choice=["yes"]),
                          Sequence("free", [4, 5], SamplingParams(max_tokens=4), (EOS,)))
    for seq in (done, broken, free):
        scheduler.add(seq)
    step = scheduler.schedule()
    assert step.grammar_bitmask.request_ids == ["done", "broken"]  # the unconstrained one has no row
    tokens = {"done": yes[0], "broken": tokenizer.encode("no", add_special_tokens=False)[0], "free": 9}
    scheduler.update(step, RunnerOutput({rid: SampledToken(t) for rid, t in tokens.items()}))
    assert broken.status is SequenceStatus.FINISHED_ABORTED  # a token its grammar refuses
    assert done.grammar.num_accepted == 1 and free.status is SequenceStatus.RUNNING
    for token_id in [*yes[1:], EOS]:  # the rest of "yes", then the end its complete grammar allows
        step = scheduler.schedule()
        assert step.grammar_bitmask.request_ids == ["done"]
        scheduler.update(step, RunnerOutput({"done": SampledToken(token_id), "free": SampledToken(9)}))
    assert done.status is SequenceStatus.FINISHED_STOPPED and done.stop_reason is None
