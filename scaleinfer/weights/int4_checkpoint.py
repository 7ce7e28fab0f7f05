"""AWQ and GPTQ 4-bit checkpoints' packed tensors, read into the int4 scheme's rows (layers/quant_int4.Int4Rows).

Both tools store, per linear of weight [N, K] (N output features, K input features, G = K / group_size groups),
int32 words of eight 4-bit values, the value at bits 4i..4i+3 being nibble i, and float16 scales [G, N]:

- AutoAWQ's GEMM layout (awq/modules/linear/gemm.py, WQLinear_GEMM.from_linear; unpacked by
  awq/utils/packing_utils.py, dequantize_gemm): qweight [K, N / 8] packed along the output features, nibble i
  of word c holding output feature 8c + AWQ_ORDER[i]; qzeros [G, N / 8] packed the same way; w = (q - z) * s.
- GPTQ (AutoGPTQ's auto_gptq/nn_modules/qlinear/qlinear_cuda.py, QuantLinear.pack and its torch forward):
  qweight [K / 8, N] packed along the input features, nibble j of word r holding input feature 8r + j; qzeros
  [G, N / 8] packed along the output features in plain order, storing z - 1 in the v1 format (the reader adds
  1 back; "gptq_v2" stores z); g_idx [K], the group of each input feature (out of order under act-order);
  w = (q - z) * s[g_idx].

In the int4 scheme's form w = (q - 8) * scale + zero, that is scale = s and zero = (8 - z) * s: exact in
float32 for float16 or bfloat16 scales (integers below 16 times an 11-bit mantissa), so the kept weights are the
checkpoint's to the bit. Each linear's tensors are gathered as the checkpoint streams (in any order) and
replaced by one `<linear>.weight` of int4 rows, which the linears' loaders narrow to each rank like GGUF's kept
rows. Every rank unpacks a whole linear before narrowing it (a transient copy of one linear's levels).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from scaleinfer.errors import ModelLoadError
from scaleinfer.kernels.gemv_int4 import ZERO_POINT
from scaleinfer.layers.quant_int4 import Int4Rows
from scaleinfer.weights.quant_config import Int4CheckpointQuant

PACK = 8  # 4-bit values per int32 word
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds output feature AWQ_ORDER[i] of its eight
AWQ_UNORDER = tuple(AWQ_ORDER.index(f) for f in range(PACK))  # feature f is in nibble AWQ_UNORDER[f]
PARTS = ("qweight", "qzeros", "scales", "g_idx")


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[..., M] int32 -> [..., M, 8] uint8, nibble i of each word at index i (masking after the shift undoes the
    sign extension of an arithmetic shift)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    return ((packed.to(torch.int32)[..., None] >> shifts) & 0xF).to(torch.uint8)


def awq_features(packed: torch.Tensor) -> torch.Tensor:
    """AWQ words [R, N / 8] -> values [R, N] in output-feature order."""
    return unpack_nibbles(packed)[..., list(AWQ_UNORDER)].flatten(-2)


def awq_rows(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> Int4Rows:
    """qweight [K, N / 8], qzeros [G, N / 8], scales [G, N] -> rows [N, K]."""
    levels = awq_features(qweight).T  # [N, K]
    return _rows(levels.contiguous(), awq_features(qzeros).T, scales.T)


def gptq_rows(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, zero_offset: int,
              g_idx: torch.Tensor | None = None) -> Int4Rows:
    """qweight [K / 8, N], qzeros [G, N / 8], scales [G, N], g_idx [K] or None (contiguous groups) -> rows [N, K]."""
    levels = unpack_nibbles(qweight.T).flatten(-2)  # [N, K / 8, 8] -> [N, K]: input feature 8r + j
    zeros = unpack_nibbles(qzeros).flatten(-2).T.to(torch.int32) + zero_offset  # [N, G]
    return _rows(levels.contiguous(), zeros, scales.T, None if g_idx is None else g_idx.to(torch.int64))


def _rows(levels: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
          g_idx: torch.Tensor | None = None) -> Int4Rows:
    """levels [N, K], zero points [N, G] (integers), scales [N, G] -> w = (q - 8) * s + (8 - z) * s."""
    scale = scales.float().contiguous()
    return Int4Rows(levels, scale, ((ZERO_POINT - zeros.float()) * scale).contiguous(), g_idx)


def unpacked_weights(weights: Iterable[tuple[str, torch.Tensor]],
                     quant: Int4CheckpointQuant) -> Iterator[tuple[str, torch.Tensor | Int4Rows]]:
    """The stream with each linear's qweight / qzeros / scales (/ g_idx) replaced by `<linear>.weight` rows."""
    needed = {"qweight", "qzeros", "scales"} | ({"g_idx"} if quant.act_order else set())
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        prefix, _, part = name.rpartition(".")
        if part not in PARTS:
            yield name, tensor
            continue
        if part == "g_idx" and not quant.act_order:
            _check_in_order(name, tensor, quant.group_size)
            continue
        parts = pending.setdefault(prefix, {})
        parts[part] = tensor
        if needed <= parts.keys():
            yield f"{prefix}.weight", _linear_rows(prefix, pending.pop(prefix), quant)
    if pending:
        prefix, parts = next(iter(pending.items()))
        raise ModelLoadError(f"{quant.method} checkpoint: {prefix} lacks {sorted(needed - parts.keys())} "
                             f"({len(pending)} linears incomplete)")


def _linear_rows(prefix: str, parts: dict[str, torch.Tensor], quant: Int4CheckpointQuant) -> Int4Rows:
    qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
    awq = quant.method == "awq"
    n = scales.shape[-1]
    k = qweight.shape[0] if awq else qweight.shape[0] * PACK
    groups = k // quant.group_size
    expected = dict(qweight=(k, n // PACK) if awq else (k // PACK, n), qzeros=(groups, n // PACK),
                    scales=(groups, n))
    for part, shape in expected.items():
        tensor = parts[part]
        kind = "float" if part == "scales" else "int32"
        dtype_ok = tensor.dtype.is_floating_point if part == "scales" else tensor.dtype == torch.int32
        if tuple(tensor.shape) != shape or not dtype_ok:
            raise ModelLoadError(f"{quant.method} checkpoint: {prefix}.{part} is {tuple(tensor.shape)} {tensor.dtype}, "
                                 f"expected {shape} {kind} (N={n}, K={k}, groups of {quant.group_size})")
    if awq:
        return awq_rows(qweight, qzeros, scales)
    g_idx = parts.get("g_idx")
    if g_idx is not None and tuple(g_idx.shape) != (k,):
        raise ModelLoadError(f"gptq checkpoint: {prefix}.g_idx has shape {tuple(g_idx.shape)}, expected ({k},)")
    return gptq_rows(qweight, qzeros, scales, quant.zero_offset, g_idx)


def _check_in_order(name: str, g_idx: torch.Tensor, group_size: int) -> None:
    """Without desc_act the groups are contiguous by construction and g_idx is dropped, as vLLM's GPTQ does;
    one that says otherwise is refused rather than misread."""
    expected = torch.arange(g_idx.numel(), dtype=torch.int64) // group_size
    if not torch.equal(g_idx.reshape(-1).to(torch.int64), expected):
        raise ModelLoadError(f"gptq checkpoint: {name} puts input features out of group order but desc_act is "
                             f"false (groups of {group_size}); the quantization_config contradicts the tensors")
