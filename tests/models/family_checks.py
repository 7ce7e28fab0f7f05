"""The checks every decoder family runs against HF transformers on a tiny random model of its own.

Each family's test file builds its configs (initializer_range around 0.2, see DESIGN.md) and calls these:
logits through our paged cache, greedy tokens through LLM on the saved folder, and init_inference on the
HF model object with a left-padded batch of mixed lengths.
"""

from pathlib import Path

import torch
from parity_helpers import prefill_logits
from transformers import AutoModelForCausalLM

from scaleinfer import LLM, SamplingParams, init_inference
from scaleinfer.config import CacheConfig, ModelConfig
from scaleinfer.weights.source import resolve_model
from scaleinfer.worker.model_runner import ModelRunner

PAD = 0


def save_tiny(config, folder: Path, seed: int = 0):
    """A random-weight HF model of `config`, saved to `folder` as safetensors; returns the model."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model


def random_prompts(vocab: int, lengths: tuple[int, ...] = (5, 17, 9), seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def assert_logits_match(folder: Path, hf_model, num_tokens: int = 40) -> None:
    """Our logits at every position of one random prompt, prefilled in two chunks, equal HF's."""
    source = resolve_model(str(folder))
    runner = ModelRunner(ModelConfig(str(folder), device="cpu", dtype="float32"), CacheConfig(num_blocks=16),
                         source, progress=False)
    token_ids = random_prompts(source.arch.vocab_size, (num_tokens,), seed=1)[0]
    with torch.no_grad():
        expected = hf_model(torch.tensor([token_ids])).logits[0]
    torch.testing.assert_close(prefill_logits(runner, token_ids), expected, atol=1e-4, rtol=1e-4)


def assert_greedy_match(folder: Path, hf_model, prompts: list[list[int]], max_new_tokens: int) -> None:
    """LLM on the saved folder, all prompts in one batch, gives HF's greedy tokens for each alone (the
    tiny configs have no EOS, so both run to max_new_tokens)."""
    llm = LLM(model=str(folder), device="cpu", skip_tokenizer_init=True, kv_cache_memory=64 << 20, progress=False)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_new_tokens, ignore_eos=True))
    for prompt, output in zip(prompts, outputs, strict=True):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            expected = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         max_new_tokens=max_new_tokens, pad_token_id=PAD)
        assert output.outputs[0].token_ids == expected[0, len(prompt):].tolist(), prompt


def assert_init_inference_matches(folder: Path, rows: list[list[int]], max_new_tokens: int = 12) -> None:
    """init_inference on a fresh HF model of `folder`: a left-padded batch's generate and forward's logits
    equal HF's, and the batch gives the same tokens as each row alone."""
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids, mask = left_padded(rows)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, **kwargs)
        expected_logits = hf(torch.tensor([rows[1]])).logits
    ours = init_inference(AutoModelForCausalLM.from_pretrained(folder).eval(), kv_cache_memory=64 << 20)
    batched = ours.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(batched, expected)
    torch.testing.assert_close(ours(torch.tensor([rows[1]])).logits, expected_logits, atol=1e-4, rtol=1e-4)
    one_at_a_time = [ours.generate(torch.tensor([r]), **kwargs)[0, len(r):].tolist() for r in rows]
    new = batched[:, ids.shape[1]:].tolist()
    assert [b[: len(o)] for b, o in zip(new, one_at_a_time, strict=True)] == one_at_a_time
