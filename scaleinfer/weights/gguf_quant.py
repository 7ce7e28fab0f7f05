"""GGUF weights kept quantized: Q4_0 / Q4_1 blocks read as the int4 scheme's levels, scales and zeros.

llama.cpp's blocks are 32 weights of a row: Q4_0 is a float16 d and 16 bytes of 4-bit levels q (w = d * (q - 8)),
Q4_1 a float16 d, a float16 m and the same 16 bytes (w = d * q + m); byte j holds element j in its low nibble
and element j + 16 in its high one. In the int4 scheme's form, w = (q - 8) * scale + zero, that is scale = d and
zero = 0 (Q4_0) or m + 8d (Q4_1): the same values as gguf's own dequantization (the tests check equality).

quantization="gguf" keeps them when every linear weight of the file is Q4_0 or Q4_1 (the embedded SmolLM2 is
Q4_1); a file with other linear types (Q8_0, K-quants: no kernel here yet) is dequantized, which the load says
once. The embedding (and the tied LM head) is dequantized in every case.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType, ReaderTensor

logger = logging.getLogger(__name__)

BLOCK = 32  # weights per Q4 block
HEADER_BYTES = {GGMLQuantizationType.Q4_0: 2, GGMLQuantizationType.Q4_1: 4}  # d, or d and m (float16)
KEPT_TYPES = tuple(HEADER_BYTES)
LINEAR_PARTS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def is_linear_weight(name: str) -> bool:
    return name.startswith("blk.") and name.endswith(".weight") and name.split(".")[-2] in LINEAR_PARTS


@dataclass(slots=True, frozen=True)
class Q4Blocks:
    """A Q4_0 / Q4_1 tensor's rows as numpy arrays: levels [N, K] uint8 in 0..15, scale and zero [N, K // 32]
    float32 (rows in torch order, as the file's dequantization gives them)."""

    levels: np.ndarray
    scale: np.ndarray
    zero: np.ndarray


def read_q4(tensor: ReaderTensor) -> Q4Blocks:
    header = HEADER_BYTES[tensor.tensor_type]
    rows = int(tensor.shape[-1]) if len(tensor.shape) > 1 else 1  # GGUF dims are fastest-first: [K, N]
    blocks = np.asarray(tensor.data, dtype=np.uint8).reshape(rows, -1, header + BLOCK // 2)  # [N, K/32, bytes]
    d = _float16(blocks[..., 0:2])  # [N, K/32]
    zero = _float16(blocks[..., 2:4]) + 8 * d if header == 4 else np.zeros_like(d)
    qs = blocks[..., header:]  # [N, K/32, 16]
    levels = np.concatenate([qs & 0xF, qs >> 4], axis=-1).reshape(rows, -1)  # [N, K]
    return Q4Blocks(levels, d, zero.astype(np.float32))


def _float16(pairs: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(pairs).view(np.float16)[..., 0].astype(np.float32)


def keeps_linears(tensors: list[ReaderTensor], path: object) -> bool:
    """Whether every linear weight is a kept type; if not, the types that are dequantized are said once."""
    other = sorted({t.tensor_type.name for t in tensors
                    if is_linear_weight(t.name) and t.tensor_type not in KEPT_TYPES})
    if other:
        logger.warning("%s: quantization='gguf' keeps Q4_0/Q4_1 linear weights only; this file's linears include "
                       "%s, so every linear weight is dequantized", path, ", ".join(other))
    return not other


def q4_to_torch(blocks: Q4Blocks):
    """The int4 scheme's rows (layers/quant_int4.Int4Rows) of numpy blocks."""
    from scaleinfer.layers.quant_int4 import Int4Rows

    return Int4Rows(*(torch.from_numpy(np.ascontiguousarray(a)) for a in (blocks.levels, blocks.scale, blocks.zero)))
