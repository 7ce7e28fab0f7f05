"""Phi-3 against HF transformers on tiny random models: plain rope, and LongRoPE with partial rotary and a
tied head (Phi-3.5 / Phi-4-mini), whose generation crosses the pretraining length."""

import pytest
import torch
from family_checks import (
    assert_greedy_match,
    assert_init_inference_matches,
    assert_logits_match,
    random_prompts,
    save_tiny,
)
from transformers import AutoModelForCausalLM, Phi3Config

from scaleinfer import LLM, SamplingParams, init_inference
from scaleinfer.errors import ModelLoadError
from scaleinfer.layers.rotary import RotaryEmbedding
from scaleinfer.weights.hf_config import arch_from_hf

TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, bos_token_id=None,
            eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
ORIGINAL_MAX = 32  # LongRoPE's pretraining length: short factors below it, long ones from it on
LONGROPE = dict(
    original_max_position_embeddings=ORIGINAL_MAX, partial_rotary_factor=0.5, tie_word_embeddings=True,
    rope_scaling={"type": "longrope", "short_factor": [1.0, 1.3, 1.9, 2.5], "long_factor": [1.5, 4.0, 9.0, 20.0]},
)
VARIANTS = {"rope": {}, "longrope": LONGROPE, "window": dict(sliding_window=6)}  # window: Phi-3-mini-4k's 2047


@pytest.fixture(scope="module")
def phi3_models(tmp_path_factory):
    """variant -> (saved folder, the HF model object)."""
    out = {}
    for name, overrides in VARIANTS.items():
        folder = tmp_path_factory.mktemp(f"phi3_{name}")
        out[name] = (folder, save_tiny(Phi3Config(**{**TINY, **overrides}), folder))
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_hf(phi3_models, variant):
    # Prefilled in two chunks, each below ORIGINAL_MAX: the short rates, as HF's one pass.
    assert_logits_match(*phi3_models[variant], num_tokens=ORIGINAL_MAX)


def test_longrope_logits_of_a_prompt_past_the_pretraining_length_match_hf(phi3_models):
    """One pass over ORIGINAL_MAX + 8 tokens turns every position at the long rates, in HF and here."""
    folder, hf_model = phi3_models["longrope"]
    ids = torch.tensor(random_prompts(TINY["vocab_size"], (ORIGINAL_MAX + 8,)))
    with torch.no_grad():
        expected = hf_model(ids).logits
    ours = init_inference(AutoModelForCausalLM.from_pretrained(folder).eval(), kv_cache_memory=16 << 20)
    torch.testing.assert_close(ours(ids).logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_tokens_match_hf(phi3_models, variant):
    folder, hf_model = phi3_models[variant]
    assert_greedy_match(folder, hf_model, random_prompts(TINY["vocab_size"]), max_new_tokens=12)


def test_longrope_prompt_past_the_pretraining_length_matches_hf(phi3_models):
    folder, hf_model = phi3_models["longrope"]
    assert_greedy_match(folder, hf_model, random_prompts(TINY["vocab_size"], (ORIGINAL_MAX + 4, 9)), 12)


def test_longrope_prompt_past_the_pretraining_length_in_chunks_matches_hf(phi3_models):
    """Chunks of 8 tokens: the first ones end below ORIGINAL_MAX but belong to a longer prompt, so they turn
    at the long rates too, as HF's one pass over the whole prompt does."""
    folder, hf_model = phi3_models["longrope"]
    prompt = random_prompts(TINY["vocab_size"], (ORIGINAL_MAX + 4,))[0]
    llm = LLM(model=str(folder), device="cpu", skip_tokenizer_init=True, progress=False, max_num_batched_tokens=8)
    ours = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    with torch.no_grad():
        expected = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8, pad_token_id=0)
    assert ours.outputs[0].token_ids == expected[0, len(prompt):].tolist()


def test_longrope_decode_matches_hf_until_it_crosses_the_pretraining_length(phi3_models):
    """HF recomputes the whole cache at the long rates when decoding first passes ORIGINAL_MAX; we do not
    (see models/phi3.py), so the tokens are compared up to that step."""
    folder, hf_model = phi3_models["longrope"]
    prompt = random_prompts(TINY["vocab_size"], (10,))[0]
    before_crossing = ORIGINAL_MAX - len(prompt) + 1  # the last one is sampled from position ORIGINAL_MAX - 1
    llm = LLM(model=str(folder), device="cpu", skip_tokenizer_init=True, progress=False)
    ours = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=before_crossing + 8))[0]
    with torch.no_grad():
        expected = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=before_crossing + 8,
                                     pad_token_id=0)[0, len(prompt):]
    assert ours.outputs[0].token_ids[:before_crossing] == expected[:before_crossing].tolist()


@pytest.mark.parametrize("variant", VARIANTS)
def test_init_inference_matches_hf(phi3_models, variant):
    # HF's batch switches to the long rates together when its longest row does; stay below ORIGINAL_MAX.
    assert_init_inference_matches(phi3_models[variant][0], random_prompts(TINY["vocab_size"]), max_new_tokens=12)


def test_legacy_su_config_maps_to_longrope():
    """Phi-3-mini-128k's config.json: rope_scaling type "su", original_max_position_embeddings at the top."""
    config = {**TINY, "model_type": "phi3", "original_max_position_embeddings": 4096, "partial_rotary_factor": 0.5,
              "rope_scaling": {"type": "su", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}}
    arch = arch_from_hf(config)
    assert arch.architecture == "Phi3ForCausalLM" and arch.rotary_dim == 8
    assert arch.rope_scaling == {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
                                 "original_max_position_embeddings": 4096}


def test_longrope_table_holds_short_then_long_rates():
    scaling = {"rope_type": "longrope", "short_factor": [1.0, 2.0], "long_factor": [4.0, 8.0],
               "original_max_position_embeddings": 16}
    rope = RotaryEmbedding(4, 64, 10000.0, scaling)
    magnitude = (1 + torch.log(torch.tensor(64 / 16)) / torch.log(torch.tensor(16.0))).sqrt()
    inv_freq = {"short": 1 / torch.tensor([1.0, 2.0 * 100.0]), "long": 1 / torch.tensor([4.0, 8.0 * 100.0])}
    assert rope.cos_cache.shape == (2 * 64, 2)
    for row, position, kind in ((15, 15, "short"), (64 + 40, 40, "long")):
        torch.testing.assert_close(rope.cos_cache[row], (position * inv_freq[kind]).cos() * magnitude)
        torch.testing.assert_close(rope.sin_cache[row], (position * inv_freq[kind]).sin() * magnitude)


def test_longrope_factors_of_the_wrong_length_are_refused():
    scaling = {"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 2,
               "original_max_position_embeddings": 16}
    with pytest.raises(ModelLoadError, match="short_factor has 3 values; rotary dim 4 needs 2"):
        RotaryEmbedding(4, 64, 10000.0, scaling)
