"""Map an HF config.json (Llama 2/3, Mistral, Mixtral, Qwen2, Qwen2/3-MoE, SmolLM2, GPT-2, GPT-NeoX, OPT,
Phi-3) to ArchConfig.

GPT-2 and OPT spell some keys their own way (n_embd, ffn_dim, ...); they are renamed to the Llama spelling
first.

Rope settings come in two spellings: transformers < 5 writes top-level `rope_theta` and `rope_scaling`
({"rope_type" or "type": ..., "factor": ...}); transformers 5 writes one `rope_parameters` dict
({"rope_theta": ..., "rope_type": "default" | "llama3" | ..., <scaling keys>}). Both become
ArchConfig.rope_theta and ArchConfig.rope_scaling, which is None for plain rope and otherwise the scaling
dict with its "rope_type" key (and no rope_theta). Phi-3 keeps original_max_position_embeddings at the top
level and may call longrope "su"; both are moved into that one spelling.

Whether the architecture is implemented is decided by the model registry, not here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scaleinfer.config import ArchConfig
from scaleinfer.errors import InvalidRequestError, ModelLoadError, UnsupportedArchitectureError

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "max_position_embeddings")
# These always carry q/k/v biases and so write no `attention_bias` key.
BIASED_QKV_ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")
# model_type -> architecture for configs saved without `architectures`; others ask transformers.
CAUSAL_LM_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                           "mixtral": "MixtralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                           "gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM",
                           "opt": "OPTForCausalLM", "phi3": "Phi3ForCausalLM",
                           "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
# model_type -> {its key: the Llama spelling}
KEY_SPELLINGS = {
    "gpt2": {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
             "n_positions": "max_position_embeddings", "layer_norm_epsilon": "layer_norm_eps",
             "activation_function": "hidden_act"},
    "opt": {"ffn_dim": "intermediate_size", "activation_function": "hidden_act"},
    "qwen2_moe": {"qkv_bias": "attention_bias", "num_experts": "num_local_experts"},
    "qwen3_moe": {"num_experts": "num_local_experts"},
}
TIED_BY_DEFAULT = ("gpt2", "opt")
# Families without grouped-query attention: any num_key_value_heads key is not theirs.
MULTI_HEAD_ONLY = ("gpt2", "gpt_neox", "opt")
# model_type -> {key: a value no released checkpoint uses}, refused rather than loaded wrongly
UNSUPPORTED_VALUES = {"opt": {"enable_bias": False, "layer_norm_elementwise_affine": False,
                              "_remove_final_layer_norm": True},
                      "qwen2_moe": {"use_sliding_window": True}, "qwen3_moe": {"use_sliding_window": True}}
ROPE_TYPE_ALIASES = {"su": "longrope"}


def read_hf_config(folder: Path) -> ArchConfig:
    """ArchConfig of an HF-style model folder; EOS ids of generation_config.json are added (Llama 3 chat
    models list their end-of-turn token only there)."""
    config = _read_json(folder / CONFIG_NAME)
    arch = arch_from_hf(config, folder / CONFIG_NAME)
    generation_path = folder / GENERATION_CONFIG_NAME
    if generation_path.is_file():
        extra = _as_ids(_read_json(generation_path).get("eos_token_id"))
        arch.eos_token_ids = tuple(dict.fromkeys(arch.eos_token_ids + extra))
    return arch


def arch_from_hf(config: dict[str, Any], path: str | Path = CONFIG_NAME) -> ArchConfig:
    """ArchConfig from a parsed config.json; `path` only names the file in error messages."""
    config = _gemma_spelling(_llama_spelling(config), path)
    architecture = _architecture(config, path)
    _check_known(architecture, path)  # before the keys: another family's spelling is no missing key
    for key in REQUIRED_KEYS:
        if config.get(key) is None:
            raise ModelLoadError(f"{path} lacks the required key {key!r}")
    for key, value in UNSUPPORTED_VALUES.get(config.get("model_type"), {}).items():
        if config.get(key, not value) == value:
            raise ModelLoadError(f"{path}: {key}={value} is not supported")
    rope_theta, rope_scaling = _rope(config, path)
    num_heads = config["num_attention_heads"]
    if config.get("model_type") in MULTI_HEAD_ONLY:
        config["num_key_value_heads"] = num_heads
    fields = dict(
        architecture=architecture,
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=num_heads,
        num_key_value_heads=config.get("num_key_value_heads") or num_heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // num_heads,
        max_position_embeddings=config["max_position_embeddings"],
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=bool(config.get("attention_bias", architecture in BIASED_QKV_ARCHITECTURES)),
        layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)),
        hidden_act=config.get("hidden_act", "silu"),
        partial_rotary_factor=float(_partial_rotary_factor(config)),
        use_parallel_residual=bool(config.get("use_parallel_residual", False)),
        do_layer_norm_before=bool(config.get("do_layer_norm_before", True)),
        word_embed_proj_dim=config.get("word_embed_proj_dim"),
        num_local_experts=config.get("num_local_experts"),
        num_experts_per_tok=config.get("num_experts_per_tok") or 0,
        **_moe_fields(config),
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=_as_ids(config.get("eos_token_id")),
    )
    fields.update(_gemma_fields(config, path) or _window_fields(config))
    try:
        return ArchConfig(**fields)
    except InvalidRequestError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc


def _moe_fields(config: dict[str, Any]) -> dict[str, Any]:
    """Qwen-MoE's expert width, top-k renormalization, shared expert and sparse-layer rule; {} elsewhere
    (Mixtral's defaults: experts intermediate_size wide, renormalized, every layer sparse)."""
    if config.get("model_type") not in ("qwen2_moe", "qwen3_moe"):
        return {}
    return dict(moe_intermediate_size=config.get("moe_intermediate_size"),
                norm_topk_prob=bool(config.get("norm_topk_prob", False)),
                shared_expert_intermediate_size=(config.get("shared_expert_intermediate_size") or 0
                                                 if config["model_type"] == "qwen2_moe" else 0),
                decoder_sparse_step=config.get("decoder_sparse_step") or 1,
                mlp_only_layers=tuple(config.get("mlp_only_layers") or ()))


def _llama_spelling(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of config with GPT-2's and OPT's key names as Llama's; GPT-2's MLP width is n_inner or
    4 * n_embd."""
    model_type = config.get("model_type")
    spelling = KEY_SPELLINGS.get(model_type, {})
    renamed = {**config, **{new: config[old] for old, new in spelling.items() if config.get(old) is not None}}
    if model_type == "gpt2":
        renamed["intermediate_size"] = config.get("n_inner") or 4 * renamed["hidden_size"]
    if model_type in TIED_BY_DEFAULT:
        renamed.setdefault("tie_word_embeddings", True)
    return renamed


def _partial_rotary_factor(config: dict[str, Any]) -> float:
    """transformers 5 keeps it in rope_parameters, older configs at the top level (GPT-NeoX as rotary_pct)."""
    rope_parameters = config.get("rope_parameters") or {}
    top_level = config.get("partial_rotary_factor", config.get("rotary_pct", 1.0))
    return rope_parameters.get("partial_rotary_factor", top_level)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{path} does not exist") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return data


def _architecture(config: dict[str, Any], path: str | Path) -> str:
    architectures = config.get("architectures")
    if architectures:
        return architectures[0]
    model_type = config.get("model_type")
    if model_type is None:
        raise ModelLoadError(f"{path} has neither 'architectures' nor 'model_type'")
    if model_type in CAUSAL_LM_ARCHITECTURES:
        return CAUSAL_LM_ARCHITECTURES[model_type]
    # transformers' own table knows every model_type; imported here because it takes seconds to import
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, model_type)


def _check_known(architecture: str, path: str | Path) -> None:
    """Refuse an architecture no model here implements, naming those that are."""
    from scaleinfer.models.registry import ENCODERS, MODELS  # the model classes need torch; imported when used

    if architecture not in MODELS and architecture not in ENCODERS:
        raise UnsupportedArchitectureError(
            f"{path}: architecture {architecture!r} is not supported; supported: {', '.join(sorted(MODELS))}, and "
            f"for task='embed' {', '.join(sorted(ENCODERS))}")


def _rope(config: dict[str, Any], path: str | Path) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either spelling; rope_parameters wins where both are present."""
    merged = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    if any(isinstance(value, dict) for value in merged.values()):
        raise ModelLoadError(f"{path}: per-layer-type rope_parameters are not supported: {merged}")
    merged.pop("partial_rotary_factor", None)  # read by _partial_rotary_factor
    rope_theta = float(merged.pop("rope_theta", config.get("rope_theta", config.get("rotary_emb_base", 10000.0))))
    legacy_type = merged.pop("type", "default")
    rope_type = merged.pop("rope_type", legacy_type)
    rope_type = ROPE_TYPE_ALIASES.get(rope_type, rope_type)
    if rope_type == "default":
        return rope_theta, None
    if rope_type == "longrope" and config.get("original_max_position_embeddings"):  # the top level wins, as in HF
        merged["original_max_position_embeddings"] = config["original_max_position_embeddings"]
    return rope_theta, {"rope_type": rope_type, **merged}


def _as_ids(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(value)


# Families whose every layer attends within config.sliding_window when it is set (Mistral 7B v0.1: 4096;
# Phi-3-mini-4k: 2047); later Mistral versions and Mixtral set null.
WINDOWED_ON_EVERY_LAYER = ("mistral", "mixtral", "phi3")
# Gemma model_type -> its default sliding_window_pattern: every layer not divisible by it (counting from 1)
# is a sliding-window layer, where the config lists no layer_types.
GEMMA_SLIDING_PATTERNS = {"gemma2": 2, "gemma3_text": 6}
GEMMA_DEFAULT_QUERY_PRE_ATTN_SCALAR = 256  # HF's default


def _gemma_spelling(config: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Gemma keys as arch_from_hf reads them: hidden_activation as hidden_act; Gemma 3's per-layer-type
    rope_parameters (transformers 5) as the global layers' rope_parameters and rope_local_base_freq (the
    transformers < 5 spelling)."""
    if config.get("model_type") not in GEMMA_SLIDING_PATTERNS:
        return config
    config = {**config, "hidden_act": config.get("hidden_activation") or config.get("hidden_act")}
    by_type = config.get("rope_parameters") or {}
    if isinstance(by_type.get("full_attention"), dict):
        local = by_type.get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            raise ModelLoadError(f"{path}: rope scaling on sliding-window layers is not supported: {local}")
        config["rope_parameters"] = by_type["full_attention"]
        config["rope_local_base_freq"] = local.get("rope_theta", config.get("rope_local_base_freq"))
    return config


def _window_fields(config: dict[str, Any]) -> dict[str, Any]:
    """Mistral, Mixtral and Phi-3: a sliding_window, when the config sets one, on every layer; {} otherwise."""
    window = config.get("sliding_window")
    if config.get("model_type") not in WINDOWED_ON_EVERY_LAYER or window is None:
        return {}
    return dict(sliding_window=window, layer_types=("sliding_attention",) * config["num_hidden_layers"])


def _gemma_fields(config: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """ArchConfig's Gemma fields; {} for other families."""
    model_type = config.get("model_type")
    if model_type not in GEMMA_SLIDING_PATTERNS:
        return {}
    if config.get("use_bidirectional_attention"):
        raise ModelLoadError(f"{path}: use_bidirectional_attention=True (EmbeddingGemma) is not supported")
    pattern = config.get("sliding_window_pattern") or GEMMA_SLIDING_PATTERNS[model_type]
    layer_types = config.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(config["num_hidden_layers"])
    ]
    local_theta = config.get("rope_local_base_freq")
    return dict(
        query_pre_attn_scalar=float(config.get("query_pre_attn_scalar") or GEMMA_DEFAULT_QUERY_PRE_ATTN_SCALAR),
        sliding_window=config.get("sliding_window"),
        layer_types=tuple(layer_types),
        rope_local_theta=None if local_theta is None else float(local_theta),
        attn_logit_softcapping=config.get("attn_logit_softcapping"),
        final_logit_softcapping=config.get("final_logit_softcapping"),
    )
