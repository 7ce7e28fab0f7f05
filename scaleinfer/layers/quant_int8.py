"""INT8 weight-only quantization: per-output-channel symmetric int8 weights, quantized as the checkpoint loads.

A linear's weight [N, K] becomes levels q [N, K] int8 and scales [N] float32 with w ~ q * scale, scale = the
row's max |w| / 127 (over all K input features, also under tensor parallelism: a row-parallel rank quantizes
its columns with the whole row's scale, so the levels are the same at every tensor-parallel size). A
per-row scale factors out of the dot product, y = (x @ q.T) * scale, so fused layouts (qkv, gate_up) are
just their rows stacked. Activations stay in the run dtype.

The scales are a buffer, not a parameter: the checkpoint has no tensor for them (the weight's loader writes
them), and with offload they stay resident while the int8 levels stream.

The matmul: on the GPU the Triton int8 GEMV (kernels/gemv_int8.py) up to MAX_GEMV_ROWS rows, the weight-only
GEMM that dequantizes tile by tile (kernels/gemm_weight_only.py) up to MAX_DEQUANT_GEMM_ROWS, past it the levels
cast to the run dtype through cuBLAS; on the CPU torch's int8 weight-only kernel
(aten._weight_int8pack_mm, in bf16 activations and scales where K allows: _cpu_int8pack_mm) for decode rows, and
for prefill the cast + matmul (that kernel's cost grows with every row: 6x the dequantized matmul at 32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scaleinfer.kernels.dispatch import use_triton
from scaleinfer.kernels.gemm_weight_only import int8_gemm_triton
from scaleinfer.kernels.gemv_int8 import MAX_GEMV_ROWS, int8_gemv_triton
from scaleinfer.layers.linear import Columns, narrow_columns, rows_of

QMAX = 127  # symmetric: -127..127, so -q is representable for every q
# Past it the GPU casts the whole weight for cuBLAS: writing 2 bytes per weight every step costs less than the
# tile-by-tile GEMM's lower matmul rate once the step computes enough (a long prefill chunk).
MAX_DEQUANT_GEMM_ROWS = 512


def quantize_rows(rows: torch.Tensor, columns: Columns = None) -> tuple[torch.Tensor, torch.Tensor]:
    """rows: [N, K] float -> (levels [N, K'] int8 of the kept columns, scales [N] float32 over all K)."""
    rows = rows.float()
    scale = rows.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / QMAX  # [N]
    levels = torch.round(narrow_columns(rows, columns) / scale[:, None]).clamp_(-QMAX, QMAX)
    return levels.to(torch.int8), scale


def dequantize(levels: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N, K] int8, [N] -> [N, K] float weights in `dtype`."""
    return (levels.float() * scale.float()[:, None]).to(dtype)


def int8_linear(x: torch.Tensor, levels: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., K] -> [..., N] in x's dtype; levels [N, K] int8, scale [N] float32. No host syncs."""
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    small = x2.shape[0] <= MAX_GEMV_ROWS
    if use_triton(x) and x2.shape[0] <= MAX_DEQUANT_GEMM_ROWS:
        gemm = int8_gemv_triton if small else int8_gemm_triton
        return gemm(x2.contiguous(), levels, scale, bias).view(*x.shape[:-1], -1)
    if x.device.type == "cpu" and small:
        y = _cpu_int8pack_mm(x2, levels, scale)
    else:  # int8 levels are exact in bf16/fp16/fp32; the row scale applies to the output
        y = F.linear(x2, levels.to(x.dtype)) * scale.to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], -1)


def _cpu_int8pack_mm(x2: torch.Tensor, levels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """torch's CPU kernel in bf16 activations where K is a multiple of 32 (its float32 path is a scalar loop,
    10x slower; its bf16 path reads garbage past the last whole 32 columns), else in float32."""
    if levels.shape[1] % 32:
        return torch.ops.aten._weight_int8pack_mm(x2.float().contiguous(), levels, scale.float()).to(x2.dtype)
    y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), levels, scale.to(torch.bfloat16))
    return y.to(x2.dtype)


class Int8Scheme:
    """Per-output-channel INT8 weights for the parallel linears (layers/linear.py)."""

    name = "int8"

    def create_weights(self, layer: nn.Module, output_size: int, input_size: int) -> None:
        layer.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=torch.int8), requires_grad=False)
        layer.register_buffer("weight_scale", torch.ones(output_size, dtype=torch.float32))
        layer.weight.dummy_init = lambda std, generator: _init_dummy(layer, std, generator)

    def load_rows(self, layer: nn.Module, offset: int, rows: torch.Tensor, columns: Columns,
                  shard_id: object) -> None:
        """rows: [n, full K] of the checkpoint (any float dtype, any device); quantized on the weight's device."""
        levels, scale = quantize_rows(rows.to(layer.weight.device), columns)
        dst = rows_of(layer.weight.data, offset, levels)
        if dst.shape != levels.shape:
            raise ValueError(f"checkpoint tensor of shape {tuple(rows.shape)} does not fit parameter "
                             f"{tuple(layer.weight.shape)}")
        dst.copy_(levels)
        rows_of(layer.weight_scale, offset, scale).copy_(scale)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return int8_linear(x, layer.weight, layer.weight_scale, bias)


@torch.no_grad()
def _init_dummy(layer: nn.Module, std: float, generator: torch.Generator) -> None:
    """Random weights (load_format="dummy"): Normal(0, std) drawn in float32, then quantized like a checkpoint."""
    weight = layer.weight
    drawn = torch.empty(weight.shape, dtype=torch.float32, device=weight.device).normal_(0.0, std, generator=generator)
    levels, scale = quantize_rows(drawn)
    weight.data.copy_(levels)
    layer.weight_scale.copy_(scale)
