"""OPT against HF transformers on tiny random models: pre-LN with a tied head, and the OPT-350m layout
(post-LN, embeddings narrower than hidden, projected in and out)."""

import pytest
from family_checks import (
    assert_greedy_match,
    assert_init_inference_matches,
    assert_logits_match,
    random_prompts,
    save_tiny,
)
from transformers import OPTConfig

from scaleinfer.errors import ModelLoadError
from scaleinfer.models.opt import OPTForCausalLM
from scaleinfer.weights.hf_config import arch_from_hf

TINY = dict(vocab_size=384, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=512, init_std=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=1)
VARIANTS = {
    "pre_ln": dict(do_layer_norm_before=True, word_embed_proj_dim=64),
    "post_ln_projected": dict(do_layer_norm_before=False, word_embed_proj_dim=32),
}


@pytest.fixture(scope="module")
def opt_models(tmp_path_factory):
    """variant -> (saved folder, the HF model object)."""
    out = {}
    for name, overrides in VARIANTS.items():
        folder = tmp_path_factory.mktemp(f"opt_{name}")
        out[name] = (folder, save_tiny(OPTConfig(**TINY, **overrides), folder))
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_hf(opt_models, variant):
    assert_logits_match(*opt_models[variant])


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_tokens_match_hf(opt_models, variant):
    folder, hf_model = opt_models[variant]
    assert_greedy_match(folder, hf_model, random_prompts(TINY["vocab_size"]), max_new_tokens=16)


@pytest.mark.parametrize("variant", VARIANTS)
def test_init_inference_matches_hf(opt_models, variant):
    assert_init_inference_matches(opt_models[variant][0], random_prompts(TINY["vocab_size"]))


def test_config_mapping():
    config = OPTConfig(**TINY, do_layer_norm_before=False, word_embed_proj_dim=32).to_dict()
    arch = arch_from_hf({**config, "architectures": None})
    assert (arch.architecture, arch.intermediate_size, arch.hidden_act) == ("OPTForCausalLM", 128, "relu")
    assert (arch.num_key_value_heads, arch.tie_word_embeddings) == (4, True)
    assert (arch.do_layer_norm_before, arch.word_embed_proj_dim) == (False, 32)


def test_checkpoint_names_without_model_prefix():
    """Checkpoints saved from OPTModel name their tensors decoder.* rather than model.decoder.*."""
    model = OPTForCausalLM(arch_from_hf(OPTConfig(**TINY).to_dict()))
    names = [name for name, _ in model.hf_weights([("decoder.layers.0.fc1.weight", None),
                                                     ("model.decoder.final_layer_norm.bias", None),
                                                     ("decoder.layers.1.final_layer_norm.weight", None)])]
    assert names == ["model.layers.0.mlp.fc_in.weight", "model.norm.bias",
                     "model.layers.1.post_attention_layernorm.weight"]


def test_layouts_we_do_not_implement_are_refused():
    with pytest.raises(ModelLoadError, match="enable_bias=False"):
        arch_from_hf(OPTConfig(**TINY, enable_bias=False).to_dict())
