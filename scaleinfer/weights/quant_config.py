"""A pre-quantized checkpoint's `quantization_config` (config.json), read into the scheme its layers load with.

Supported layouts, as the tools that write them name and shape their tensors:
- HF transformers' fine-grained FP8 (`quant_method: "fp8"`): e4m3 `weight`, float32 `weight_scale_inv`
  [cdiv(N, bn), cdiv(K, bk)] for `weight_block_size: [bn, bk]` (w = weight * weight_scale_inv, despite the
  name), dynamic activations.
- compressed-tensors (`quant_method: "compressed-tensors"`, float-quantized): e4m3 `weight`, float32
  `weight_scale` per tensor [1], per channel [N, 1] or per block, and `input_scale` [1] when the input
  activations are static; `kv_cache_scheme` adds `self_attn.k_scale` / `v_scale` (the FP8 KV cache's).
- AutoAWQ's GEMM layout (`quant_method: "awq"`, `version: "gemm"`) and GPTQ's (`quant_method: "gptq"`, the
  v1 `checkpoint_format` "gptq" or "gptq_v2"), 4 bits, groups of `group_size`, GPTQ with or without act-order
  (`desc_act`): their packed int32 tensors become the int4 scheme's rows (weights/int4_checkpoint.py).
Any other quant_method, and settings of these that we cannot serve (bits, group size, AWQ version, GPTQ pack
dtype), are refused at start, naming them. KV-cache scales of any checkpoint go to the attention layers under
vLLM's names (`kv_scale_name`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scaleinfer.errors import ModelLoadError

SUPPORTED_METHODS = ("fp8", "compressed-tensors", "awq", "gptq")
# GPTQ checkpoint_format -> what a stored zero point lacks: v1 stores zero - 1 (AutoGPTQ's pack), v2 the zero
GPTQ_ZERO_OFFSETS = {"gptq": 1, "gptq_v2": 0}
FLOAT_FORMATS = ("float-quantized", "naive-quantized")
# A checkpoint's per-layer KV-cache scale names -> ours (the attention layer's k_scale / v_scale buffers)
KV_SCALE_NAMES = {
    ".self_attn.k_proj.output_scale": ".self_attn.attn.k_scale",
    ".self_attn.v_proj.output_scale": ".self_attn.attn.v_scale",
    ".self_attn.k_proj.k_scale": ".self_attn.attn.k_scale",
    ".self_attn.v_proj.v_scale": ".self_attn.attn.v_scale",
    ".self_attn.k_scale": ".self_attn.attn.k_scale",
    ".self_attn.v_scale": ".self_attn.attn.v_scale",
}


@dataclass(slots=True, frozen=True)
class CheckpointQuant:
    """How a checkpoint's linear weights are quantized."""

    method: str  # one of SUPPORTED_METHODS
    scale_name: str  # the weight scale tensor's name suffix: weight_scale_inv | weight_scale
    weight_block: tuple[int, int] | None  # (rows, columns) of a scale block; None: per tensor or per channel
    static_input: bool  # an input_scale tensor per linear (else activations are scaled per token)

    def scheme(self, requested: str | None):
        """The linears' scheme; `requested` (ModelConfig.quantization) must be None or this checkpoint's."""
        if requested not in (None, "fp8"):
            raise ModelLoadError(f"quantization={requested!r}: the checkpoint is already quantized "
                                 f"({self.method}, fp8 weights); leave quantization unset or 'fp8'")
        from scaleinfer.layers.quant_fp8 import Fp8CheckpointScheme

        return Fp8CheckpointScheme(self.scale_name, self.weight_block, self.static_input)


@dataclass(slots=True, frozen=True)
class Int4CheckpointQuant:
    """A 4-bit AWQ or GPTQ checkpoint: packed int32 levels and zero points, float16 scales per group."""

    method: str  # awq | gptq
    group_size: int  # input features per scale and zero point
    act_order: bool  # GPTQ desc_act: g_idx assigns the input features to groups out of order
    zero_offset: int  # added to each stored zero point (GPTQ v1: 1)

    def scheme(self, requested: str | None):
        """The int4 scheme in this checkpoint's groups; `requested` must be None or 'int4'."""
        if requested not in (None, "int4"):
            raise ModelLoadError(f"quantization={requested!r}: the checkpoint is already quantized ({self.method}, "
                                 f"4-bit weights in groups of {self.group_size}); leave quantization unset or 'int4'")
        from scaleinfer.layers.quant_int4_checkpoint import Int4CheckpointScheme

        return Int4CheckpointScheme(self.method, self.group_size, self.act_order)

    def unpacked(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, object]]:
        """The checkpoint's tensors with each linear's packed ones replaced by its int4 rows."""
        from scaleinfer.weights.int4_checkpoint import unpacked_weights

        return unpacked_weights(weights, self)


def read_quant_config(folder: Path) -> CheckpointQuant | Int4CheckpointQuant | None:
    """The checkpoint's quantization, None for an unquantized one."""
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    return parse_quant_config(config.get("quantization_config"), path)


def parse_quant_config(config: dict[str, Any] | None,
                       path: Path | str = "config.json") -> CheckpointQuant | Int4CheckpointQuant | None:
    if config is None:
        return None
    method = config.get("quant_method")
    if method not in SUPPORTED_METHODS:
        raise ModelLoadError(f"{path}: quantization_config quant_method {method!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_METHODS)})")
    if method == "fp8":
        return _hf_fp8(config, path)
    if method == "awq":
        return _awq(config, path)
    if method == "gptq":
        return _gptq(config, path)
    return _compressed_tensors(config, path)


def kv_scale_name(name: str) -> str:
    """A checkpoint tensor name with a KV-cache scale's spelling mapped to the attention layer's."""
    for fragment, ours in KV_SCALE_NAMES.items():
        if name.endswith(fragment):
            return name[: -len(fragment)] + ours
    return name


def _hf_fp8(config: dict[str, Any], path: Path | str) -> CheckpointQuant:
    if config.get("activation_scheme", "dynamic") != "dynamic":
        raise ModelLoadError(f"{path}: fp8 activation_scheme {config['activation_scheme']!r} is not supported "
                             "(dynamic only)")
    block = config.get("weight_block_size")
    return CheckpointQuant(method="fp8", scale_name="weight_scale_inv", weight_block=_block(block, path),
                           static_input=False)


def _compressed_tensors(config: dict[str, Any], path: Path | str) -> CheckpointQuant:
    fmt = config.get("format")
    if fmt not in FLOAT_FORMATS:
        raise ModelLoadError(f"{path}: compressed-tensors format {fmt!r} is not supported "
                             f"(fp8 weights: {', '.join(FLOAT_FORMATS)})")
    groups = list((config.get("config_groups") or {}).values())
    if not groups:
        raise ModelLoadError(f"{path}: compressed-tensors quantization_config has no config_groups")
    schemes = {_ct_group(group, path) for group in groups}
    if len(schemes) > 1:
        raise ModelLoadError(f"{path}: compressed-tensors config_groups differ ({sorted(map(str, schemes))}); "
                             "one scheme for every linear is supported")
    block, static_input = schemes.pop()
    return CheckpointQuant(method="compressed-tensors", scale_name="weight_scale", weight_block=block,
                           static_input=static_input)


def _ct_group(group: dict[str, Any], path: Path | str) -> tuple[tuple[int, int] | None, bool]:
    """(weight block, static input scale) of one config group: fp8 weights, fp8 or no input quantization."""
    weights = group.get("weights") or {}
    if weights.get("type") != "float" or weights.get("num_bits") != 8:
        raise ModelLoadError(f"{path}: compressed-tensors weights of type {weights.get('type')!r} with "
                             f"{weights.get('num_bits')!r} bits are not supported (fp8: float, 8)")
    strategy = weights.get("strategy")
    if strategy not in ("tensor", "channel", "block"):
        raise ModelLoadError(f"{path}: compressed-tensors weight strategy {strategy!r} is not supported "
                             "(tensor, channel, block)")
    block = _block(weights.get("block_structure"), path) if strategy == "block" else None
    inputs = group.get("input_activations")
    if inputs and (inputs.get("type") != "float" or inputs.get("num_bits") != 8):
        raise ModelLoadError(f"{path}: compressed-tensors input activations of type {inputs.get('type')!r} with "
                             f"{inputs.get('num_bits')!r} bits are not supported (fp8: float, 8)")
    return block, bool(inputs) and not inputs.get("dynamic", False)


def _block(block: Any, path: Path | str) -> tuple[int, int] | None:
    if block is None:
        return None
    ok = isinstance(block, list | tuple) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)
    if not ok:
        raise ModelLoadError(f"{path}: weight block size {block!r} is not a pair of positive ints")
    return int(block[0]), int(block[1])


def _awq(config: dict[str, Any], path: Path | str) -> Int4CheckpointQuant:
    """HF's AwqConfig keys, or AutoAWQ's own (w_bit, q_group_size), as vLLM's AWQConfig reads them."""
    version = str(config.get("version", "gemm")).lower()
    if version != "gemm":
        raise ModelLoadError(f"{path}: awq version {version!r} is not supported (gemm: AutoAWQ's GEMM layout)")
    backend = config.get("backend", "autoawq")
    if backend != "autoawq":
        raise ModelLoadError(f"{path}: awq backend {backend!r} is not supported (autoawq)")
    if not config.get("zero_point", True):
        raise ModelLoadError(f"{path}: awq zero_point={config['zero_point']!r} is not supported (AutoAWQ's GEMM "
                             "layout stores zero points)")
    bits = config.get("bits", config.get("w_bit"))
    group = config.get("group_size", config.get("q_group_size"))
    return Int4CheckpointQuant("awq", _int4_group(bits, group, "awq", path), act_order=False, zero_offset=0)


def _gptq(config: dict[str, Any], path: Path | str) -> Int4CheckpointQuant:
    fmt = config.get("checkpoint_format") or config.get("format") or "gptq"
    if fmt not in GPTQ_ZERO_OFFSETS:
        raise ModelLoadError(f"{path}: gptq checkpoint_format {fmt!r} is not supported "
                             f"({', '.join(GPTQ_ZERO_OFFSETS)})")
    for key, ok in (("pack_dtype", (None, "int32")), ("lm_head", (None, False)), ("dynamic", (None, {}))):
        if config.get(key) not in ok:
            raise ModelLoadError(f"{path}: gptq {key}={config[key]!r} is not supported ({ok[1]!r})")
    group = _int4_group(config.get("bits"), config.get("group_size"), "gptq", path)
    return Int4CheckpointQuant("gptq", group, act_order=bool(config.get("desc_act", False)),
                               zero_offset=GPTQ_ZERO_OFFSETS[fmt])


def _int4_group(bits: Any, group: Any, method: str, path: Path | str) -> int:
    """The group size of a 4-bit checkpoint; any other width, and a group per whole row (-1), are refused."""
    if bits != 4:
        raise ModelLoadError(f"{path}: {method} bits={bits!r} is not supported (4)")
    if not isinstance(group, int) or group <= 0 or group % 2:
        raise ModelLoadError(f"{path}: {method} group_size={group!r} is not supported (a positive even size: "
                             "32, 64, 128, ...)")
    return group
