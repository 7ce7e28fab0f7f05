"""init_inference on HF model objects: generate() and forward() equal HF's, left-padded batches included."""

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig, BloomForCausalLM

from scaleinfer import init_inference
from scaleinfer.errors import UnsupportedArchitectureError

FAMILIES = ["llama2", "llama3.1", "mistral", "qwen2", "gpt2", "gpt_neox"]
PAD = 0


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in (5, 17, 9)]


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_and_forward_equal_hf(tiny_models, family):
    folder = tiny_models[family][0]
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    rows = prompts(hf.config.vocab_size)
    ids, mask = left_padded(rows)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, **kwargs)
        expected_logits = hf(torch.tensor([rows[1]])).logits
    ours = init_inference(AutoModelForCausalLM.from_pretrained(folder).eval(), kv_cache_memory=64 << 20)
    assert torch.equal(ours.generate(ids, attention_mask=mask, **kwargs), expected)
    torch.testing.assert_close(ours(torch.tensor([rows[1]])).logits, expected_logits, atol=1e-4, rtol=1e-4)
    one_at_a_time = [ours.generate(torch.tensor([r]), **kwargs)[0, len(r):].tolist() for r in rows]
    batched = ours.generate(ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:].tolist()
    assert [b[: len(o)] for b, o in zip(batched, one_at_a_time)] == one_at_a_time


def test_min_new_tokens_and_eos(tiny_models):
    folder = tiny_models["llama2"][0]
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([prompts(hf.config.vocab_size)[0]])
    with torch.no_grad():
        free = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    eos = free[0, ids.shape[1] + 2].item()  # pretend the third new token is the end
    kwargs = dict(max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    with torch.no_grad():
        expected = hf.generate(ids, **kwargs)
        expected_min = hf.generate(ids, min_new_tokens=6, **kwargs)
    ours = init_inference(AutoModelForCausalLM.from_pretrained(folder).eval(), kv_cache_memory=64 << 20)
    assert torch.equal(ours.generate(ids, **kwargs), expected)
    assert torch.equal(ours.generate(ids, min_new_tokens=6, **kwargs), expected_min)


def test_weights_move_without_a_second_copy(tiny_models):
    hf = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"][0])
    init_inference(hf, kv_cache_memory=64 << 20)
    assert all(p.numel() == 0 for p in hf.parameters())


def test_unsupported_architecture_is_named():
    bloom = BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedArchitectureError, match="BloomForCausalLM.*GPT2LMHeadModel.*LlamaForCausalLM"):
        init_inference(bloom)
