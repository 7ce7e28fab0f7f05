"""Gemma 2 and Gemma 3 (text) against HF transformers on tiny random models.

The configs make every Gemma feature matter: a sliding window of 8 tokens on alternate layers with
prompts of up to 30 (past one 16-token KV block), a query_pre_attn_scalar that is not head_dim, random
norm weights (HF initializes them to 0, which would hide the 1 + weight), Gemma 2's attention and final
logit soft-caps set low enough to bend the scores, Gemma 3's q/k norms, its local rope base and linear
rope scaling on the global layers.
"""

import pytest
import torch
from family_checks import (
    PAD,
    assert_greedy_match,
    assert_init_inference_matches,
    assert_logits_match,
    random_prompts,
    save_tiny,
)
from transformers import Gemma2Config, Gemma3TextConfig

from scaleinfer import LLM, SamplingParams
from scaleinfer.kernels.dispatch import HAS_TRITON, force_triton
from scaleinfer.weights.hf_config import arch_from_hf

WINDOW = 8
TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512, initializer_range=0.2,
            query_pre_attn_scalar=24, sliding_window=WINDOW, bos_token_id=None, eos_token_id=None,
            pad_token_id=None)
VARIANTS = {
    "gemma2": (Gemma2Config, dict(attn_logit_softcapping=3.0, final_logit_softcapping=4.0)),
    "gemma3": (Gemma3TextConfig, dict(sliding_window_pattern=2, rope_theta=1e6, rope_local_base_freq=1e4,
                                      rope_scaling={"rope_type": "linear", "factor": 2.0})),
}
PROMPT_LENGTHS = (24, 9, 30)


def save_gemma(config, folder):
    """save_tiny, then norm weights drawn at random (HF draws zeros) and saved again."""
    model = save_tiny(config, folder)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def gemma_models(tmp_path_factory):
    """variant -> (saved folder, the HF model object)."""
    out = {}
    for name, (config_class, overrides) in VARIANTS.items():
        folder = tmp_path_factory.mktemp(name)
        out[name] = (folder, save_gemma(config_class(**{**TINY, **overrides}), folder))
    return out


def test_config_mapping():
    gemma2 = arch_from_hf(Gemma2Config(**TINY, attn_logit_softcapping=3.0).to_dict())
    assert gemma2.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert (gemma2.sliding_window, gemma2.attn_logit_softcapping, gemma2.final_logit_softcapping) == (WINDOW, 3.0, 30.0)
    assert (gemma2.query_pre_attn_scalar, gemma2.hidden_act, gemma2.rope_local_theta) == (24, "gelu_pytorch_tanh", None)
    gemma3 = arch_from_hf({**Gemma3TextConfig(**TINY, **VARIANTS["gemma3"][1]).to_dict(),
                           "architectures": ["Gemma3ForCausalLM"]})
    assert gemma3.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert (gemma3.rope_theta, gemma3.rope_local_theta) == (1e6, 1e4)
    assert gemma3.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert gemma3.attn_logit_softcapping is None and gemma3.final_logit_softcapping is None
    # transformers < 5 wrote the rope keys at the top level and only the pattern, not layer_types
    legacy = dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], sliding_window_pattern=6,
                  rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0},
                  hidden_activation="gelu_pytorch_tanh", **{**TINY, "num_hidden_layers": 7})
    arch = arch_from_hf(legacy)
    assert arch.layer_types == ("sliding_attention",) * 5 + ("full_attention", "sliding_attention")
    assert (arch.rope_theta, arch.rope_local_theta, arch.rope_scaling["factor"]) == (1e6, 1e4, 8.0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_hf(gemma_models, variant):
    assert_logits_match(*gemma_models[variant], num_tokens=40)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_tokens_match_hf(gemma_models, variant):
    folder, hf_model = gemma_models[variant]
    assert_greedy_match(folder, hf_model, random_prompts(TINY["vocab_size"], PROMPT_LENGTHS), max_new_tokens=16)


@pytest.mark.parametrize("variant", VARIANTS)
def test_init_inference_matches_hf(gemma_models, variant):
    assert_init_inference_matches(gemma_models[variant][0], random_prompts(TINY["vocab_size"], PROMPT_LENGTHS))


def hf_tokens(hf_model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=max_new_tokens, pad_token_id=PAD)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("variant", VARIANTS)
def test_chunked_prefill_gives_hf_tokens(gemma_models, variant):
    """Prompts prefilled 5 tokens a step: chunks start inside a window and inside a block."""
    folder, hf_model = gemma_models[variant]
    prompts = random_prompts(TINY["vocab_size"], PROMPT_LENGTHS, seed=4)
    llm = LLM(model=str(folder), device="cpu", skip_tokenizer_init=True, kv_cache_memory=64 << 20,
              max_num_batched_tokens=5, progress=False)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.outputs[0].token_ids == hf_tokens(hf_model, prompt, 12), len(prompt)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_kernels_give_hf_tokens(gemma_models, variant):
    """The whole model through the Triton kernels (the interpreter off the GPU): windowed, soft-capped
    attention, the fused rotary write, Gemma's norms and GeGLU; chunked prefill, then decode."""
    folder, hf_model = gemma_models[variant]
    prompt = random_prompts(TINY["vocab_size"], (26,), seed=6)[0]
    llm = LLM(model=str(folder), device="cpu", skip_tokenizer_init=True, kv_cache_memory=16 << 20,
              max_num_batched_tokens=12, progress=False)
    with force_triton():
        output = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert output.outputs[0].token_ids == hf_tokens(hf_model, prompt, 6)
