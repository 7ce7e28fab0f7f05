import json

import pytest

from scaleinfer.errors import ModelLoadError
from scaleinfer.weights.hf_config import arch_from_hf, read_hf_config

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "vocab_size": 32000, "bos_token_id": 1,
    "eos_token_id": 2, "rope_scaling": None, "tie_word_embeddings": False,
}
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "vocab_size": 128256, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "vocab_size": 32768, "rope_theta": 1000000.0,
    "sliding_window": None, "bos_token_id": 1, "eos_token_id": 2,
}
QWEN2_05B = {
    "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "vocab_size": 151936, "rope_theta": 1000000.0,
    "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645,
}
SMOLLM2_135M = {  # as transformers 5 writes it: rope_parameters instead of rope_theta
    "architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "vocab_size": 49152, "tie_word_embeddings": True,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}, "bos_token_id": 1, "eos_token_id": 2,
}


def test_llama2_defaults():
    arch = arch_from_hf(LLAMA2_7B)
    assert (arch.architecture, arch.num_key_value_heads, arch.head_dim) == ("LlamaForCausalLM", 32, 128)
    assert (arch.rope_theta, arch.rope_scaling, arch.attention_bias) == (10000.0, None, False)
    assert arch.eos_token_ids == (2,) and arch.bos_token_id == 1 and arch.rms_norm_eps == 1e-5


def test_llama31_legacy_rope_scaling():
    arch = arch_from_hf(LLAMA31_8B)
    assert arch.rope_theta == 500000.0 and arch.rope_scaling == LLAMA3_SCALING
    assert arch.eos_token_ids == (128001, 128008, 128009) and arch.num_key_value_heads == 8


def test_llama31_transformers5_rope_parameters():
    config = {k: v for k, v in LLAMA31_8B.items() if k not in ("rope_theta", "rope_scaling")}
    config["rope_parameters"] = {"rope_theta": 500000.0, **LLAMA3_SCALING}
    arch = arch_from_hf(config)
    assert arch.rope_theta == 500000.0 and arch.rope_scaling == LLAMA3_SCALING


def test_legacy_type_key_is_normalized():
    config = {**LLAMA2_7B, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert arch_from_hf(config).rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_mistral_null_head_dim_defaults():
    arch = arch_from_hf(MISTRAL_7B)
    assert (arch.architecture, arch.head_dim, arch.rope_theta) == ("MistralForCausalLM", 128, 1e6)


def test_qwen2_has_qkv_bias_and_ties():
    arch = arch_from_hf(QWEN2_05B)
    assert arch.attention_bias and arch.tie_word_embeddings and arch.head_dim == 64


def test_smollm2_rope_parameters_default_type():
    arch = arch_from_hf(SMOLLM2_135M)
    assert (arch.rope_theta, arch.rope_scaling, arch.head_dim, arch.tie_word_embeddings) == (1e5, None, 64, True)


def test_architecture_from_model_type():
    config = {k: v for k, v in QWEN2_05B.items() if k != "architectures"} | {"model_type": "qwen2"}
    assert arch_from_hf(config).architecture == "Qwen2ForCausalLM"


def test_missing_key_names_key_and_file():
    config = {k: v for k, v in LLAMA2_7B.items() if k != "intermediate_size"}
    with pytest.raises(ModelLoadError, match=r"/m/config\.json.*'intermediate_size'"):
        arch_from_hf(config, "/m/config.json")


def test_invalid_value_is_a_load_error():
    with pytest.raises(ModelLoadError, match="num_key_value_heads"):
        arch_from_hf({**LLAMA2_7B, "num_key_value_heads": 5})


def test_saved_llama_config_with_generation_eos(tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=16384,
                         rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING), eos_token_id=2)
    config.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    arch = read_hf_config(tmp_path)
    assert (arch.architecture, arch.hidden_size, arch.head_dim, arch.num_key_value_heads) == (
        "LlamaForCausalLM", 64, 16, 2)
    assert arch.rope_theta == 500000.0 and arch.rope_scaling == LLAMA3_SCALING
    assert arch.eos_token_ids == (2, 7) and arch.max_position_embeddings == 16384


def test_unreadable_config_names_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        read_hf_config(tmp_path)
