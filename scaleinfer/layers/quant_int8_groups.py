"""Group-wise INT8 weights: a GGUF file's Q8_0 linears kept as stored (blocks of 32 int8 levels, one scale each).

A linear's weight [N, K] is levels q [N, K] int8 and a scale per group of `group_size` input features of a row,
[N, G] float32, w = q * scale (kernels/gemv_int8_groups.py has the format; Q8_0's float16 d is its scale,
exactly, so the kept weights are gguf's dequantized values to the bit). Float rows (load_format="dummy") are
quantized symmetric per group, scale = max |w| / 127. Scales are rows of the weight: they shard with their rows
(column-parallel) or by groups (row-parallel, whose rank must hold whole groups: checked at start). Half the
bytes of bf16 plus 4 per 32 weights.

The matmul: on the GPU the Triton GEMV that applies each group's scale to its group sum (up to MAX_GEMV_ROWS
rows), the weight-only GEMM that dequantizes tile by tile (kernels/gemm_weight_only.py, one group a K step) up
to MAX_DEQUANT_GEMM_ROWS, past it the weight dequantized to the run dtype and cuBLAS; on the CPU the dequantized
matmul for every row count (torch has no group-wise int8 kernel there: its _weight_int8pack_mm takes one scale
per row), which keeps the memory but not the speed of the int8 bytes (3.5-20x float32's time on 2 threads), so
GGUF files dequantize their Q8_0 linears on a CPU instead (layers/quant_gguf.py's Q8_0_DEVICES).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scaleinfer.errors import ModelLoadError
from scaleinfer.kernels.dispatch import use_triton
from scaleinfer.kernels.gemm_weight_only import int8_groups_gemm_triton
from scaleinfer.kernels.gemv_int8_groups import MAX_GEMV_ROWS, dequantize_int8_groups, int8_groups_gemv_triton
from scaleinfer.layers.linear import Columns, GroupRows, RowParallelLinear, rows_of

QMAX = 127
MAX_DEQUANT_GEMM_ROWS = 512  # past it the whole weight is dequantized for cuBLAS (as quant_int8.py)


@dataclass(slots=True)
class Int8GroupRows(GroupRows):
    """Rows of a weight already in this format (a GGUF Q8_0 tensor): levels [n, K] int8, scale [n, K // group]
    float32. Narrows by rows like the tensor it stands for."""

    def numel(self) -> int:
        """The bytes these rows fill in the int8 weight (what offload's loader counts)."""
        return self.levels.numel()

    def narrow(self, dim: int, start: int, length: int) -> Int8GroupRows:
        if dim != 0:
            raise ValueError(f"int8 group rows narrow by rows only, got dim={dim}")
        return Int8GroupRows(self.levels.narrow(0, start, length), self.scale.narrow(0, start, length))

    def dequantize(self) -> torch.Tensor:
        """[n, K] float32."""
        return dequantize_int8_groups(self.levels, self.scale)


def quantize_int8_groups(rows: torch.Tensor, group_size: int) -> Int8GroupRows:
    """rows: [N, K] float -> symmetric levels and a scale per group of group_size columns."""
    n, k = rows.shape
    groups = rows.float().reshape(n, k // group_size, group_size)
    scale = groups.abs().amax(dim=2).clamp_min(torch.finfo(torch.float32).tiny) / QMAX  # [N, G]
    levels = torch.round(groups / scale[..., None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return Int8GroupRows(levels.reshape(n, k), scale)


def int8_groups_linear(x: torch.Tensor, layer: nn.Module, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., K] -> [..., N] in x's dtype through the layer's group-wise int8 weight. No host syncs."""
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    if use_triton(x) and x2.shape[0] <= MAX_DEQUANT_GEMM_ROWS:
        kernel = int8_groups_gemv_triton if x2.shape[0] <= MAX_GEMV_ROWS else int8_groups_gemm_triton
        return kernel(x2.contiguous(), layer.weight, layer.weight_scale, bias).view(*x.shape[:-1], -1)
    y = F.linear(x2, dequantize_int8_groups(layer.weight, layer.weight_scale, x.dtype), bias)
    return y.view(*x.shape[:-1], -1)


class Int8GroupScheme:
    """Group-wise INT8 weights for the parallel linears (layers/linear.py), in groups of `group_size`."""

    name = "int8_groups"

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size

    def create_weights(self, layer: nn.Module, output_size: int, input_size: int) -> None:
        full = input_size * layer.tp_size if isinstance(layer, RowParallelLinear) else input_size
        if input_size % self.group_size or full % self.group_size:
            raise ModelLoadError(f"int8 group size {self.group_size} does not divide the {input_size} input features "
                                 f"of each rank (input_size={full}, tensor_parallel_size={layer.tp_size})")
        layer.group_size = self.group_size
        layer.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=torch.int8), requires_grad=False)
        layer.register_buffer("weight_scale",
                              torch.ones(output_size, input_size // self.group_size, dtype=torch.float32))
        layer.weight.dummy_init = lambda std, generator: _init_dummy(layer, std, generator)

    def load_rows(self, layer: nn.Module, offset: int, rows: torch.Tensor | Int8GroupRows, columns: Columns,
                  shard_id: object) -> None:
        """rows: [n, full K] of the checkpoint, float (quantized here) or Int8GroupRows (kept as they are)."""
        if isinstance(rows, Int8GroupRows):
            if rows.group_size != layer.group_size:
                raise ModelLoadError(f"int8 rows in groups of {rows.group_size} do not fit a layer built with "
                                     f"groups of {layer.group_size}")
        else:
            rows = quantize_int8_groups(rows.to(layer.weight.device), layer.group_size)
        _store(layer, offset, _narrow(rows, columns))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return int8_groups_linear(x, layer, bias)


def _narrow(rows: Int8GroupRows, columns: Columns) -> Int8GroupRows:
    """A row-parallel rank's columns: whole groups (create_weights checked that they divide)."""
    if columns is None:
        return rows
    start, size = columns
    group = rows.group_size
    return Int8GroupRows(rows.levels.narrow(1, start, size), rows.scale.narrow(1, start // group, size // group))


def _store(layer: nn.Module, offset: int, rows: Int8GroupRows) -> None:
    dst = rows_of(layer.weight.data, offset, rows.levels)
    if dst.shape != rows.levels.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(rows.shape)} does not fit parameter "
                         f"{tuple(layer.weight.shape)}")
    dst.copy_(rows.levels)
    rows_of(layer.weight_scale, offset, rows.scale).copy_(rows.scale)


@torch.no_grad()
def _init_dummy(layer: nn.Module, std: float, generator: torch.Generator) -> None:
    """Random weights (load_format="dummy"): Normal(0, std) drawn in float32, then quantized like a checkpoint."""
    drawn = torch.empty(layer.weight.shape, dtype=torch.float32, device=layer.weight.device)
    _store(layer, 0, quantize_int8_groups(drawn.normal_(0.0, std, generator=generator), layer.group_size))
