"""FP8 (e4m3) weights for the parallel linears: quantized as a bf16/fp16 checkpoint loads, or loaded as an FP8
checkpoint stores them (HF fine-grained block-wise, compressed-tensors per channel or per tensor).

A linear's weight [N, K] is q [N, K] float8_e4m3fn and scale [N, G] float32, w ~ q * scale over groups of
group_k input features (kernels/gemv_fp8.py). Quantized on load: one scale per output row, max |w| / 448 over
the whole row (also under tensor parallelism: a row-parallel rank takes its columns with the whole row's
scale, so the levels are the same at every tensor-parallel size). A checkpoint's per-tensor scale is kept on
each of its rows (fused q/k/v keep their own, exactly) and a 128 x 128 block scale on each of the block's rows
(G = K / 128 columns): checkpoint scales are stored as rows, so they shard with their rows as the weights do.

The matmul: up to MAX_GEMV_ROWS rows, on a GPU, the Triton GEMV reads the fp8 weight (per-row or block
scales). Past it, per-row scales go through torch._scaled_mm with per-token activation scales (dynamic, each
token's max |x| / 448, or a checkpoint's static input_scale) where it runs: GPUs of compute capability >= 8.9
(Hopper is the target), and the CPU, whose torch has an fp8 _scaled_mm (not fast: fp8 on CPU is for tests).
Block scales past the GEMV, and fp8 matmuls a device lacks, run weight-only: on a GPU the Triton GEMM of
kernels/gemm_weight_only.py dequantizes tile by tile (group by group for block scales), on a CPU the weight is
dequantized to the activations' dtype (block-wise checkpoints are weight-only throughout: HF's own kernel
quantizes activations per 1 x 128 group, which a row-wise _scaled_mm cannot take).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from scaleinfer.errors import ModelLoadError
from scaleinfer.kernels.dispatch import use_triton
from scaleinfer.kernels.gemm_weight_only import fp8_gemm_triton
from scaleinfer.kernels.gemv_fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    MAX_GEMV_ROWS,
    dequantize_fp8,
    fp8_gemv_triton,
    num_groups,
    quantize_per_token,
)
from scaleinfer.layers.linear import Columns, RowParallelLinear, narrow_columns, rows_of

DUMMY_INPUT_SCALE = 0.05  # load_format="dummy" with a static activation scale: |x| up to 22 is representable


def quantize_rows(rows: torch.Tensor, columns: Columns = None) -> tuple[torch.Tensor, torch.Tensor]:
    """rows: [N, K] float -> (e4m3 [N, K'] of the kept columns, scales [N, 1] float32 over all K)."""
    rows = rows.float()
    scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / FP8_MAX  # [N, 1]
    levels = (narrow_columns(rows, columns) / scale).clamp_(-FP8_MAX, FP8_MAX)
    return levels.to(FP8_DTYPE), scale


def fp8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, group_k: int,
               bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None,
               weight_only: bool = False) -> torch.Tensor:
    """x: [..., K] -> [..., N] in x's dtype; q [N, K] e4m3, scale [N, G] float32 (G == 1: per row).
    input_scale: [1] a static activation scale, None: per-token dynamic. weight_only: x is never quantized (a
    block-wise scheme, whose rank may hold one block of columns: G == 1 there too). No host syncs."""
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    if use_triton(x) and x2.shape[0] <= MAX_GEMV_ROWS:
        y = fp8_gemv_triton(x2.contiguous(), q, scale, group_k, bias)
    elif not weight_only and scale.shape[1] == 1 and _scaled_mm_runs(x2, q):
        xq, x_scale = quantize_per_token(x2, input_scale)  # [M, K] e4m3, [M, 1]
        y = torch._scaled_mm(xq, q.T, scale_a=x_scale, scale_b=scale.view(1, -1), bias=bias, out_dtype=x.dtype)
    elif use_triton(x):  # weight-only past the GEMV: dequantized tile by tile
        y = fp8_gemm_triton(x2.contiguous(), q, scale, group_k, bias)
    else:
        y = F.linear(x2, dequantize_fp8(q, scale, group_k, x.dtype), bias)
    return y.view(*x.shape[:-1], -1)


def _scaled_mm_runs(x: torch.Tensor, q: torch.Tensor) -> bool:
    """Whether torch._scaled_mm takes these operands with row-wise scales on their device."""
    if x.device.type == "cpu":
        return _cpu_scaled_mm()
    n, k = q.shape
    major, minor = torch.cuda.get_device_capability(x.device)
    return (major, minor) >= (8, 9) and x.dtype == torch.bfloat16 and k % 16 == 0 and n % 16 == 0


@functools.cache
def _cpu_scaled_mm() -> bool:
    try:
        a = torch.ones(1, 16, dtype=FP8_DTYPE)
        torch._scaled_mm(a, a.T, scale_a=torch.ones(1, 1), scale_b=torch.ones(1, 1), out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError):
        return False
    return True


class Fp8Scheme:
    """FP8 weights with per-output-channel scales, quantized as the checkpoint loads (quantization="fp8")."""

    name = "fp8"

    def create_weights(self, layer: nn.Module, output_size: int, input_size: int) -> None:
        layer.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=FP8_DTYPE), requires_grad=False)
        # A buffer: the checkpoint has no tensor for it (the weight's loader writes it), and with offload it
        # stays resident while the weight streams.
        layer.register_buffer("weight_scale", torch.ones(output_size, 1, dtype=torch.float32))
        layer.weight.dummy_init = lambda std, generator: _init_dummy(layer, "weight_scale", std, generator)

    def load_rows(self, layer: nn.Module, offset: int, rows: torch.Tensor, columns: Columns,
                  shard_id: object) -> None:
        """rows: [n, full K] of the checkpoint (any float dtype); quantized on the weight's device."""
        levels, scale = quantize_rows(rows.to(layer.weight.device), columns)
        _copy_rows(layer.weight, offset, levels, rows)
        rows_of(layer.weight_scale, offset, scale).copy_(scale)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return fp8_linear(x, layer.weight, layer.weight_scale, layer.weight.shape[1], bias)


class Fp8CheckpointScheme:
    """FP8 weights as a pre-quantized checkpoint stores them: the e4m3 weight, its scale tensor (named
    `scale_name`: per tensor [1], per channel [N, 1] or per block [cdiv(N, bn), cdiv(K, bk)]) and, with a
    static activation scheme, `input_scale` [1]. Scales arrive before or after their weight, in any order."""

    name = "fp8"

    def __init__(self, scale_name: str, block: tuple[int, int] | None, static_input: bool) -> None:
        self.scale_name, self.block, self.static_input = scale_name, block, static_input

    def create_weights(self, layer: nn.Module, output_size: int, input_size: int) -> None:
        group_k = self.block[1] if self.block else input_size
        if self.block and layer.tp_size > 1 and input_size % group_k:
            raise ModelLoadError(f"block-wise fp8 at tensor_parallel_size={layer.tp_size}: a rank's {input_size} "
                                 f"input features are not a multiple of the block's {group_k}")
        layer.weight_group_k = group_k
        layer.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=FP8_DTYPE), requires_grad=False)
        groups = num_groups(input_size, group_k)
        scale = nn.Parameter(torch.ones(output_size, groups, dtype=torch.float32), requires_grad=False)
        scale.weight_loader = lambda param, loaded, *shard: self._load_scale(layer, param, loaded, *shard)
        scale.dummy_init = lambda std, generator: None  # the weight's draw writes it
        setattr(layer, self.scale_name, scale)
        layer.weight.dummy_init = lambda std, generator: _init_dummy(layer, self.scale_name, std, generator)
        if self.static_input:
            layer.input_scale = nn.Parameter(torch.zeros(1, dtype=torch.float32), requires_grad=False)
            layer.input_scale.weight_loader = _load_max
            layer.input_scale.dummy_init = lambda std, generator: layer.input_scale.fill_(DUMMY_INPUT_SCALE)

    def load_rows(self, layer: nn.Module, offset: int, rows: torch.Tensor, columns: Columns,
                  shard_id: object) -> None:
        if rows.dtype != FP8_DTYPE:
            raise ModelLoadError(f"fp8 checkpoint: a linear weight of dtype {rows.dtype} where {FP8_DTYPE} was "
                                 f"expected (layers the quantization_config leaves unquantized are not supported)")
        _copy_rows(layer.weight, offset, narrow_columns(rows, columns), rows)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        input_scale = layer.input_scale if self.static_input else None
        return fp8_linear(x, layer.weight, getattr(layer, self.scale_name), layer.weight_group_k, bias,
                          input_scale, weight_only=self.block is not None)

    def _load_scale(self, layer: nn.Module, param: nn.Parameter, loaded: torch.Tensor, *shard_id: object) -> None:
        rows = self._as_rows(layer, loaded)
        if self.block is None and isinstance(layer, RowParallelLinear):  # a whole row's scale on every rank
            _copy_rows(param, 0, rows, loaded)
        else:
            layer.weight_loader(param, rows, *shard_id)

    def _as_rows(self, layer: nn.Module, loaded: torch.Tensor) -> torch.Tensor:
        """A checkpoint scale tensor as rows of the full weight ([rows, G]), which the linear's loader narrows
        to this rank's rows (and, row-parallel, its groups of columns) like the weight."""
        loaded = loaded.float()
        # A row-parallel rank holds every row; a column-parallel one takes its rows of at most this many.
        full_rows = layer.weight.shape[0] * (1 if isinstance(layer, RowParallelLinear) else layer.tp_size)
        if loaded.numel() == 1:  # per tensor: on every row; expanded, not copied (the loader narrows it)
            return loaded.reshape(1, 1).expand(full_rows, 1)
        if self.block is None:
            return loaded.reshape(-1, 1)  # per channel: [N] or [N, 1]
        if loaded.dim() != 2:
            raise ModelLoadError(f"fp8 checkpoint: a block scale of shape {tuple(loaded.shape)}, expected 2-D")
        return loaded.repeat_interleave(self.block[0], dim=0)[:full_rows]  # [N, cdiv(K, bk)]


def _load_max(param: nn.Parameter, loaded: torch.Tensor, *shard_id: object) -> None:
    """A static input scale of fused shards (q, k, v; gate, up): they share the input, so the largest serves."""
    param.data.copy_(torch.maximum(param.data, loaded.float().reshape(1).to(param.device)))


def _copy_rows(weight: nn.Parameter, offset: int, levels: torch.Tensor, rows: torch.Tensor) -> None:
    dst = rows_of(weight.data, offset, levels)
    if dst.shape != levels.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(rows.shape)} does not fit parameter "
                         f"{tuple(weight.shape)}")
    dst.copy_(levels)


@torch.no_grad()
def _init_dummy(layer: nn.Module, scale_name: str, std: float, generator: torch.Generator) -> None:
    """Random weights (load_format="dummy"): Normal(0, std) drawn in float32, quantized per row; a grouped
    scale gets the row's scale in every group."""
    weight = layer.weight
    drawn = torch.empty(weight.shape, dtype=torch.float32, device=weight.device).normal_(0.0, std, generator=generator)
    levels, scale = quantize_rows(drawn)
    weight.data.copy_(levels)
    target = getattr(layer, scale_name)
    target.data.copy_(scale.expand_as(target))
