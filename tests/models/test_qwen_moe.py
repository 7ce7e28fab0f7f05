"""Qwen2-MoE (shared expert, sigmoid gate, dense layers by mlp_only_layers / decoder_sparse_step) and Qwen3-MoE
(q/k norm) against HF transformers on tiny random models: logits, greedy tokens, init_inference."""

import pytest
from family_checks import (
    assert_greedy_match,
    assert_init_inference_matches,
    assert_logits_match,
    random_prompts,
    save_tiny,
)
from safetensors import safe_open
from transformers import Qwen2MoeConfig, Qwen3MoeConfig

from scaleinfer.errors import ModelLoadError
from scaleinfer.weights.hf_config import arch_from_hf

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
            max_position_embeddings=512, initializer_range=0.2, bos_token_id=None, eos_token_id=None,
            pad_token_id=None, tie_word_embeddings=False)
VARIANTS = {
    # layer 1 dense by mlp_only_layers; top 2 of 8 not renormalized
    "qwen2_moe": (Qwen2MoeConfig, dict(shared_expert_intermediate_size=48, mlp_only_layers=[1])),
    # every second layer sparse (layers 1 only), renormalized
    "qwen2_moe_step2": (Qwen2MoeConfig, dict(shared_expert_intermediate_size=48, decoder_sparse_step=2,
                                             norm_topk_prob=True)),
    "qwen3_moe": (Qwen3MoeConfig, dict(norm_topk_prob=True)),
    "qwen3_moe_top1": (Qwen3MoeConfig, dict(num_experts_per_tok=1, norm_topk_prob=False)),
}


@pytest.fixture(scope="module")
def qwen_models(tmp_path_factory):
    out = {}
    for name, (config_class, overrides) in VARIANTS.items():
        folder = tmp_path_factory.mktemp(name)
        out[name] = (folder, save_tiny(config_class(**{**TINY, **overrides}), folder))
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_hf(qwen_models, variant):
    assert_logits_match(*qwen_models[variant])


@pytest.mark.parametrize("variant", ["qwen2_moe", "qwen3_moe"])
def test_greedy_tokens_match_hf(qwen_models, variant):
    folder, hf_model = qwen_models[variant]
    assert_greedy_match(folder, hf_model, random_prompts(TINY["vocab_size"]), max_new_tokens=12)


def test_init_inference_loads_the_in_memory_expert_stacks(qwen_models):
    assert_init_inference_matches(qwen_models["qwen2_moe"][0], random_prompts(TINY["vocab_size"]), max_new_tokens=8)


def test_saved_names_and_config_mapping(qwen_models):
    folder, hf_model = qwen_models["qwen2_moe"]
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        names = set(handle.keys())
    assert "model.layers.0.mlp.experts.7.gate_proj.weight" in names
    assert "model.layers.0.mlp.shared_expert_gate.weight" in names
    assert "model.layers.1.mlp.gate_proj.weight" in names  # the dense layer
    config = {**hf_model.config.to_dict(), "architectures": ["Qwen2MoeForCausalLM"]}
    arch = arch_from_hf(config)
    assert (arch.num_local_experts, arch.moe_intermediate_size, arch.shared_expert_intermediate_size) == (8, 32, 48)
    assert (arch.norm_topk_prob, arch.attention_bias, arch.mlp_only_layers) == (False, True, (1,))
    assert [arch.is_moe_layer(i) for i in range(3)] == [True, False, True]
    with pytest.raises(ModelLoadError, match="num_experts_per_tok=9"):
        arch_from_hf({**config, "num_experts_per_tok": 9})
    with pytest.raises(ModelLoadError, match="use_sliding_window=True is not supported"):
        arch_from_hf({**config, "use_sliding_window": True})
