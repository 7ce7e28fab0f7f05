"""The embedded SmolLM2-135M GGUF against transformers loading the same file."""

import pytest
import torch
from parity_helpers import hf_greedy, prefill_logits

from scaleinfer import LLM, SamplingParams
from scaleinfer.config import CacheConfig, ModelConfig
from scaleinfer.weights.source import resolve_model
from scaleinfer.worker.model_runner import ModelRunner

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
]


@pytest.fixture(scope="module")
def hf_smollm(embedded_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=embedded_gguf.name)
    model = AutoModelForCausalLM.from_pretrained(embedded_gguf.parent, dtype=torch.float32, **kwargs)
    return model.eval(), AutoTokenizer.from_pretrained(embedded_gguf.parent, **kwargs)


def test_logits_match_hf(hf_smollm, embedded_gguf):
    hf_model, tokenizer = hf_smollm
    source = resolve_model(str(embedded_gguf))
    model_config = ModelConfig(str(embedded_gguf), device="cpu", dtype="float32")
    runner = ModelRunner(model_config, CacheConfig(num_blocks=8), source, progress=False)
    token_ids = tokenizer("The capital of France is Paris, and the capital of Italy is").input_ids
    with torch.no_grad():
        expected = hf_model(torch.tensor([token_ids])).logits[0]
    torch.testing.assert_close(prefill_logits(runner, token_ids), expected, atol=2e-3, rtol=1e-3)


def test_greedy_tokens_match_hf(hf_smollm, embedded_gguf):
    hf_model, tokenizer = hf_smollm
    llm = LLM(model="smollm2-135m", device="cpu", progress=False)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=32))
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        assert output.outputs[0].token_ids == hf_greedy(hf_model, tokenizer, prompt, 32), prompt
