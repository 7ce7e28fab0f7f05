"""GGUF weights kept quantized: Q4_0 / Q4_1 / Q4_K blocks read as the int4 scheme's levels, scales and zeros, Q8_0
blocks as group-wise int8 (layers/quant_int8_groups.py).

llama.cpp's Q4_0 / Q4_1 blocks are 32 weights of a row: Q4_0 is a float16 d and 16 bytes of 4-bit levels q
(w = d * (q - 8)), Q4_1 a float16 d, a float16 m and the same 16 bytes (w = d * q + m); byte j holds element j in
its low nibble and element j + 16 in its high one. Q4_K is a super-block of 256 weights (144 bytes): float16 d
and dmin, 12 bytes packing a 6-bit scale sc and a 6-bit min m for each of its eight sub-blocks of 32
(llama.cpp's get_scale_min_k4), and 128 bytes of levels, 32 per pair of sub-blocks (sub-block 2j in the low
nibbles of bytes 32j..32j+31, 2j + 1 in their high ones); w = d * sc * q - dmin * m. In the int4 scheme's form,
w = (q - 8) * scale + zero, in groups of 32: scale = d and zero = 0 (Q4_0) or m + 8d (Q4_1); scale = d * sc and
zero = 8 * scale - dmin * m (Q4_K). Q4_0 / Q4_1 give gguf's own dequantization exactly, Q4_K within float32's
rounding of one subtraction (the tests check both). Q8_0 is a float16 d and 32 int8 levels q (w = d * q): the
int8 group scheme's levels and scale d, in groups of 32, exactly.

quantization="gguf" chooses per linear (plan_linears): a linear whose GGUF tensors are all Q4 types keeps them as
int4, one whose tensors are all Q8_0 as group-wise int8 on a GPU (on a CPU torch has no group-wise int8 kernel
and the dequantized matmul is 3.5-20x slower than float32's: dequantized there); any other linear (Q6_K, Q5_K
and the other K-quants, F16: a Q4_K_M file puts Q6_K in some layers' attn_v and ffn_down) is dequantized to the
run dtype, that linear only. A fused linear (qkv, gate_up) merges several GGUF tensors: it keeps them only when
all of them go to the same scheme (Q4_0 with Q4_K is int4; Q4_K with Q8_0 or Q6_K is not), else all of it is
dequantized.
The load says once how many linear tensors of each type were kept and dequantized. The embedding (and the tied
LM head) is dequantized in every case.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType, ReaderTensor

from scaleinfer.kernels.gemv_int4 import ZERO_POINT

logger = logging.getLogger(__name__)

BLOCK = 32  # weights per Q4 block, and per Q4_K sub-block: the int4 scheme's group
HEADER_BYTES = {GGMLQuantizationType.Q4_0: 2, GGMLQuantizationType.Q4_1: 4}  # d, or d and m (float16)
Q4_K_WEIGHTS, Q4_K_BYTES = 256, 144  # a super-block: d, dmin (float16), 12 bytes of scales and mins, 128 of levels
Q8_0_BYTES = 34  # a block: float16 d, 32 int8 levels
# the kept types -> the scheme their linears take (layers/quant_gguf.py)
KEPT_SCHEMES = {GGMLQuantizationType.Q4_0: "int4", GGMLQuantizationType.Q4_1: "int4",
                GGMLQuantizationType.Q4_K: "int4", GGMLQuantizationType.Q8_0: "int8"}
DENSE = "dense"  # a linear dequantized to the run dtype
LINEAR_PARTS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def is_linear_weight(name: str) -> bool:
    return name.startswith("blk.") and name.endswith(".weight") and name.split(".")[-2] in LINEAR_PARTS


@dataclass(slots=True, frozen=True)
class Q4Blocks:
    """A Q4_0 / Q4_1 / Q4_K tensor's rows as numpy arrays: levels [N, K] uint8 in 0..15, scale and zero [N, K // 32]
    float32 (rows in torch order, as the file's dequantization gives them)."""

    levels: np.ndarray
    scale: np.ndarray
    zero: np.ndarray


def read_q4(tensor: ReaderTensor) -> Q4Blocks:
    rows = int(tensor.shape[-1]) if len(tensor.shape) > 1 else 1  # GGUF dims are fastest-first: [K, N]
    if tensor.tensor_type == GGMLQuantizationType.Q4_K:
        return _read_q4_k(np.asarray(tensor.data, dtype=np.uint8).reshape(rows, -1, Q4_K_BYTES))
    header = HEADER_BYTES[tensor.tensor_type]
    blocks = np.asarray(tensor.data, dtype=np.uint8).reshape(rows, -1, header + BLOCK // 2)  # [N, K/32, bytes]
    d = _float16(blocks[..., 0:2])  # [N, K/32]
    zero = _float16(blocks[..., 2:4]) + 8 * d if header == 4 else np.zeros_like(d)
    qs = blocks[..., header:]  # [N, K/32, 16]
    levels = np.concatenate([qs & 0xF, qs >> 4], axis=-1).reshape(rows, -1)  # [N, K]
    return Q4Blocks(levels, d, zero.astype(np.float32))


def _read_q4_k(blocks: np.ndarray) -> Q4Blocks:
    """blocks [N, K / 256, 144] uint8 -> levels [N, K], scale and zero [N, K / 32]."""
    rows, supers = blocks.shape[:2]
    d, dmin = _float16(blocks[..., 0:2]), _float16(blocks[..., 2:4])  # [N, S]
    sc, mins = q4_k_scales(blocks[..., 4:16])  # [N, S, 8]
    qs = blocks[..., 16:].reshape(rows, supers, 4, 1, BLOCK)  # [N, S, pair, 1, 32]
    levels = np.concatenate([qs & 0xF, qs >> 4], axis=3).reshape(rows, -1)  # sub-blocks 2j (low), 2j + 1 (high)
    scale = d[..., None] * sc  # [N, S, 8]: exact (an 11-bit mantissa times a 6-bit integer)
    zero = ZERO_POINT * scale - dmin[..., None] * mins
    return Q4Blocks(levels, scale.reshape(rows, -1), zero.reshape(rows, -1).astype(np.float32))


def q4_k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A Q4_K block's 12 bytes [..., 12] -> 6-bit scales and mins [..., 8] float32. Bytes 0-3 hold the scales of
    sub-blocks 0-3 in their low 6 bits, bytes 4-7 their mins; sub-blocks 4-7 take their low 4 bits from bytes 8-11
    (scale low nibble, min high nibble) and their top 2 from the top bits of bytes 0-3 (scales) and 4-7 (mins)."""
    first, second, extra = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = np.concatenate([first & 63, (extra & 0xF) | ((first >> 6) << 4)], axis=-1)
    mins = np.concatenate([second & 63, (extra >> 4) | ((second >> 6) << 4)], axis=-1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _float16(pairs: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(pairs).view(np.float16)[..., 0].astype(np.float32)


@dataclass(slots=True, frozen=True)
class LinearPlan:
    """Which of a file's linear weights stay quantized: kept, the GGUF names of the tensors that do; schemes, each
    linear module (ours: model.layers.0.mlp.down_proj) -> "int4" | "int8" | DENSE (the run dtype)."""

    kept: frozenset[str]
    schemes: dict[str, str]
    kept_types: dict[str, int]  # type name -> how many linear tensors of it are kept
    dequantized_types: dict[str, int]  # ... are dequantized (a kept type merged with another one counts here)

    def describe(self) -> str:
        counts = lambda types: ", ".join(f"{n} {t}" for t, n in sorted(types.items())) or "none"
        return (f"quantization='gguf' keeps {counts(self.kept_types)} linear weights quantized and dequantizes "
                f"{counts(self.dequantized_types)}")


def plan_linears(tensors: list[ReaderTensor], module_of: Callable[[str], str],
                 kept_schemes: dict[GGMLQuantizationType, str] = KEPT_SCHEMES) -> LinearPlan:
    """module_of: a linear tensor's GGUF name -> the module (our name) it loads into; tensors that share a module
    (q, k and v; gate and up) are kept together, in one scheme, or dequantized together. kept_schemes: the types
    kept on this run's device, and their schemes."""
    by_module: dict[str, list[ReaderTensor]] = {}
    for tensor in tensors:
        if is_linear_weight(tensor.name):
            by_module.setdefault(module_of(tensor.name), []).append(tensor)
    kept, schemes, kept_types, dequantized = set(), {}, Counter(), Counter()
    for module, parts in by_module.items():
        types = [t.tensor_type.name for t in parts]
        chosen = {kept_schemes.get(t.tensor_type, DENSE) for t in parts}
        schemes[module] = chosen.pop() if len(chosen) == 1 else DENSE
        if schemes[module] == DENSE:
            dequantized.update(types)
        else:
            kept.update(t.name for t in parts)
            kept_types.update(types)
    return LinearPlan(frozenset(kept), schemes, dict(kept_types), dict(dequantized))


def keeps_any(tensors: list[ReaderTensor]) -> bool:
    return any(is_linear_weight(t.name) and t.tensor_type in KEPT_SCHEMES for t in tensors)


@dataclass(slots=True, frozen=True)
class Q8Blocks:
    """A Q8_0 tensor's rows: levels [N, K] int8, scale [N, K // 32] float32 (its blocks' d)."""

    levels: np.ndarray
    scale: np.ndarray


def read_q8_0(tensor: ReaderTensor) -> Q8Blocks:
    rows = int(tensor.shape[-1]) if len(tensor.shape) > 1 else 1  # GGUF dims are fastest-first: [K, N]
    blocks = np.asarray(tensor.data, dtype=np.uint8).reshape(rows, -1, Q8_0_BYTES)  # [N, K/32, 34]
    levels = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(rows, -1)  # [N, K]
    return Q8Blocks(levels, _float16(blocks[..., 0:2]))


def q8_to_torch(blocks: Q8Blocks):
    """The int8 group scheme's rows (layers/quant_int8_groups.Int8GroupRows) of numpy blocks."""
    from scaleinfer.layers.quant_int8_groups import Int8GroupRows

    return Int8GroupRows(*(torch.from_numpy(np.ascontiguousarray(a)) for a in (blocks.levels, blocks.scale)))


def q4_to_torch(blocks: Q4Blocks):
    """The int4 scheme's rows (layers/quant_int4.Int4Rows) of numpy blocks."""
    from scaleinfer.layers.quant_int4 import Int4Rows

    return Int4Rows(*(torch.from_numpy(np.ascontiguousarray(a)) for a in (blocks.levels, blocks.scale, blocks.zero)))
