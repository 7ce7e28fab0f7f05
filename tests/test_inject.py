"""init_inference on HF model objects: generate() and forward() equal HF's, left-padded batches included."""

import pytest
import torch
from family_checks import assert_init_inference_matches, random_prompts
from transformers import AutoModelForCausalLM, BloomConfig, BloomForCausalLM

from scaleinfer import init_inference
from scaleinfer.errors import UnsupportedArchitectureError

FAMILIES = ["llama2", "llama3.1", "mistral", "qwen2", "gpt2", "gpt_neox"]
PAD = 0
SUPPORTED_LIST = "BloomForCausalLM.*GPT2LMHeadModel.*LlamaForCausalLM.*OPTForCausalLM.*Phi3ForCausalLM"


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_and_forward_equal_hf(tiny_models, family):
    folder, hf_model = tiny_models[family]
    assert_init_inference_matches(folder, random_prompts(hf_model.config.vocab_size))


def test_min_new_tokens_and_eos(tiny_models):
    folder = tiny_models["llama2"][0]
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([random_prompts(hf.config.vocab_size)[0]])
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
    with pytest.raises(UnsupportedArchitectureError, match=SUPPORTED_LIST):
        init_inference(bloom)
