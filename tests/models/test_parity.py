"""Our models against HF transformers on the same weights: logits within tolerance, greedy tokens equal."""

import pytest
import torch
from parity_helpers import hf_greedy, prefill_logits

from scaleinfer import LLM, SamplingParams
from scaleinfer.config import CacheConfig, ModelConfig
from scaleinfer.weights.source import resolve_model
from scaleinfer.worker.model_runner import ModelRunner

FAMILIES = ["llama2", "llama3.1", "mistral", "mistral_window", "qwen2", "gpt2", "gpt_neox"]
PROMPTS = ["The capital of France is", "The quick brown fox", "Paris", "lazy dog. The capital of"]


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_family_logits_match_hf(tiny_models, family):
    folder, hf_model = tiny_models[family]
    source = resolve_model(str(folder))
    model_config = ModelConfig(str(folder), device="cpu", dtype="float32")
    runner = ModelRunner(model_config, CacheConfig(num_blocks=16), source, progress=False)
    generator = torch.Generator().manual_seed(1)
    token_ids = torch.randint(0, source.arch.vocab_size, (40,), generator=generator).tolist()
    with torch.no_grad():
        expected = hf_model(torch.tensor([token_ids])).logits[0]
    torch.testing.assert_close(prefill_logits(runner, token_ids), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_family_greedy_tokens_match_hf(tiny_models, family):
    folder, hf_model = tiny_models[family]
    llm = LLM(model=str(folder), device="cpu", progress=False)
    tokenizer = llm.get_tokenizer()
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=32))
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        assert output.outputs[0].token_ids == hf_greedy(hf_model, tokenizer, prompt, 32), prompt
