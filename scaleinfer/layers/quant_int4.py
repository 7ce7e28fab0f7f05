"""INT4 weight-only quantization, group-wise: quantized as a float checkpoint loads, or kept as GGUF stores it.

A linear's weight [N, K] becomes packed levels [N, K // 2] uint8 and a scale and a zero per group of
`group_size` input features of a row, [N, G] float32 each (kernels/gemv_int4.py has the format). Asymmetric:
each group maps its [min, max] onto the 16 levels (scale = (max - min) / 15, zero = min + 8 * scale), which
loses less than a symmetric grid on the skewed groups of real weights, and is what GGUF Q4_1 stores (Q4_0,
symmetric, is the case zero = 0), so one layout and one kernel serve both.

Groups are 128 input features, or 64 or 32 where a layer's input features are not a multiple of 128
(SmolLM2's 576). A row-parallel rank's columns must hold whole groups, so the levels, scales and zeros are
the same at every tensor-parallel size; a group size that does not divide them is an error at start. Scales
and zeros are rows of the weight: they shard with their rows (column-parallel) or by groups (row-parallel).

The matmul. On the GPU, where torch's int4 tinygemm takes the layer (kernels/int4_tinygemm.py: bfloat16 runs,
sm80+, groups of 32-256, N a multiple of 8; `_tinygemm_serves`), once the layer's last rows are stored
(`rows_stored` reaches N) its weight is repacked into tinygemm's layout in the same parameter's place (one copy
on the GPU; the fp32 scales and zeros stay, bf16 copies of them beside), and rows stored again into it first
unpack the weight back to our layout, exactly. From that layout: up to TINYGEMM_MAX_ROWS rows (decode) that
kernel, up to TINYGEMM_GEMM_MAX_ROWS the Triton GEMM that reads the layout and dequantizes in registers
(kernels/gemm_int4_tinygemm.py), more rows (long prefills) the weight dequantized to a bf16 temporary, tinygemm's
own values to the bit, and cuBLAS (kernels/dequant_int4_tinygemm.py). Where tinygemm does not take
it (fp16 / fp32 runs, odd shapes, older GPUs): the Triton GEMV up to MAX_GEMV_ROWS rows, the Triton GEMM that
dequantizes group by group (kernels/gemm_int4.py) up to MAX_DEQUANT_GEMM_ROWS, past it the weight dequantized
to the run dtype and cuBLAS. On the CPU torch's int4 kernel (aten._weight_int4pack_mm_for_cpu) for up to
CPU_KERNEL_ROWS rows, in bfloat16 activations whatever the run dtype (its float32 path is a scalar loop,
20-50x slower), with its own packing of the levels and bf16 scales made once from the stored tensors on the
first call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scaleinfer.errors import ModelLoadError
from scaleinfer.kernels.dequant_int4_tinygemm import dequant_tinygemm_mm
from scaleinfer.kernels.dispatch import use_triton
from scaleinfer.kernels.gemm_int4 import int4_gemm_triton
from scaleinfer.kernels.gemm_int4_tinygemm import tinygemm_gemm
from scaleinfer.kernels.gemv_int4 import MAX_GEMV_ROWS, ZERO_POINT, dequantize_int4, int4_gemv_triton, pack_int4
from scaleinfer.kernels.int4_tinygemm import from_tinygemm_layout, pack_tinygemm, tinygemm_mm, tinygemm_takes
from scaleinfer.layers.linear import Columns, GroupRows, RowParallelLinear, rows_of

GROUP_SIZES = (128, 64, 32)  # the first that divides a layer's input features
CPU_KERNEL_ROWS = 16  # past it dequantize + matmul (torch's kernel recomputes the weight per row block)
CPU_GROUP_SIZES = (32, 64, 128, 256)  # what torch's CPU kernel takes
CPU_BLOCK_N = 16  # its packing needs N divisible by this
# Past it the GPU casts the whole weight for cuBLAS (as quant_int8.py): writing 2 bytes per weight every step
# costs less than the group-by-group GEMM's lower matmul rate once the step computes enough (a long prefill).
MAX_DEQUANT_GEMM_ROWS = 512
# Where tinygemm serves, past this many rows the weight is dequantized from its layout to bf16 for cuBLAS
# (kernels/dequant_int4_tinygemm.py): tinygemm dequantizes again per 16 rows of x, so its time grows with M / 16.
# H200, Llama 3 8B, groups of 128 (bench/results/decode-gemms-quant-llama3-8b-h200-20261202-183328.json): at 16
# rows gate_up 136.5 us against cuBLAS bf16's 62.6 (plus about 100 us to write the bf16 weight), at 64 rows 516.0.
TINYGEMM_MAX_ROWS = 16
# Past TINYGEMM_MAX_ROWS and up to this many rows the Triton GEMM that reads tinygemm's layout and dequantizes in
# registers (kernels/gemm_int4_tinygemm.py); past it the dequantized weight through cuBLAS. From an H200 run of
# bench/decode_gemms_quant.py at efa46e5 (its log only: it hit its time limit before writing the JSON; Llama-3-8B's
# four linears summed, each at its best of 19 tiles): at 32 rows the GEMM 464 us against dequant+cuBLAS 469, at 64
# rows 530 against 473, at 128 573 against 486 (it wins only on gate_up there); so past 32 rows the dequantized
# weight. Re-measure with a run that writes its result.
TINYGEMM_GEMM_MAX_ROWS = 32


@dataclass(slots=True)
class Int4Rows(GroupRows):
    """Rows of a weight already quantized in this format (a GGUF Q4_0 / Q4_1 / Q4_K tensor, an AWQ / GPTQ one): levels
    [n, K] uint8 in 0..15, scale and zero [n, K // group_size] float32; g_idx [K] the group of each input feature
    where they are not contiguous (GPTQ's act-order), else None. Narrows by rows like the tensor it stands for."""

    zero: torch.Tensor
    g_idx: torch.Tensor | None = None

    def numel(self) -> int:
        """The bytes these rows fill in a packed weight [n, K // 2] (what offload's loader counts)."""
        return self.levels.numel() // 2

    def narrow(self, dim: int, start: int, length: int) -> Int4Rows:
        if dim != 0:
            raise ValueError(f"int4 rows narrow by rows only, got dim={dim}")
        return Int4Rows(*(t.narrow(0, start, length) for t in (self.levels, self.scale, self.zero)), self.g_idx)

    def dequantize(self) -> torch.Tensor:
        """[n, K] float32."""
        if self.g_idx is None:
            return dequantize_int4(pack_int4(self.levels), self.scale, self.zero)
        return (self.levels.float() - ZERO_POINT) * self.scale[:, self.g_idx] + self.zero[:, self.g_idx]


def group_size_for(input_size: int) -> int:
    for size in GROUP_SIZES:
        if input_size % size == 0:
            return size
    raise ModelLoadError(f"int4: input_size={input_size} is not a multiple of any group size {GROUP_SIZES}")


def quantize_groups(rows: torch.Tensor, group_size: int) -> Int4Rows:
    """rows: [N, K] float -> levels, scales and zeros over groups of group_size columns."""
    n, k = rows.shape
    groups = rows.float().reshape(n, k // group_size, group_size)
    low, high = groups.amin(dim=2), groups.amax(dim=2)  # [N, G]
    scale = ((high - low) / 15).clamp_min(torch.finfo(torch.float32).tiny)
    levels = torch.round((groups - low[..., None]) / scale[..., None]).clamp_(0, 15)
    return Int4Rows(levels.to(torch.uint8).reshape(n, k), scale, low + ZERO_POINT * scale)


def int4_linear(x: torch.Tensor, layer: nn.Module, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., K] -> [..., N] in x's dtype through the layer's int4 weight. No host syncs."""
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    rows = x2.shape[0]
    if layer.tinygemm is not None:  # the layer's weight is in its layout now: the one copy its paths read
        return _tinygemm_matmul(rows)(x2, layer.tinygemm, bias).view(*x.shape[:-1], -1)
    if use_triton(x) and rows <= MAX_DEQUANT_GEMM_ROWS:
        kernel = int4_gemv_triton if rows <= MAX_GEMV_ROWS else int4_gemm_triton
        y = kernel(x2.contiguous(), layer.weight, layer.weight_scale, layer.weight_zero, bias)
        return y.view(*x.shape[:-1], -1)
    if x.device.type == "cpu" and rows <= CPU_KERNEL_ROWS and _cpu_kernel_takes(layer):
        y = _cpu_int4_mm(x2, layer)
    else:
        y = F.linear(x2, dequantize_int4(layer.weight, layer.weight_scale, layer.weight_zero, x.dtype))
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], -1)


def _tinygemm_matmul(rows: int) -> Callable[..., torch.Tensor]:
    """The matmul of a layer in tinygemm's layout for `rows` rows of x (all three read that one copy)."""
    if rows <= TINYGEMM_MAX_ROWS:
        return tinygemm_mm
    return tinygemm_gemm if rows <= TINYGEMM_GEMM_MAX_ROWS else dequant_tinygemm_mm


def _tinygemm_serves(layer: nn.Module) -> bool:
    """Whether the layer's matmul is torch's tinygemm (kernels/int4_tinygemm.py), decided once its rows are all
    stored: a CUDA weight in memory of its own (offload's streamed weights are views of a shared slot or scratch
    buffer, rebound every step: they keep our layout), a bfloat16 run (the dtype the layer was built in), and
    shapes and a GPU the kernel takes."""
    weight = layer.weight.data
    if not weight.is_cuda or weight.untyped_storage().nbytes() != weight.numel():  # uint8: a byte each
        return False
    return tinygemm_takes(weight.shape[0], 2 * weight.shape[1], layer.group_size, weight.device, layer.run_dtype)


def _to_tinygemm(layer: nn.Module) -> None:
    """Repack the layer's weight into tinygemm's layout, which then takes the parameter's place (same bytes):
    the old layout's memory goes when this returns, so the GPU holds one copy of the weight."""
    layer.tinygemm = pack_tinygemm(layer.weight.data, layer.weight_scale, layer.weight_zero)
    layer.weight.data = layer.tinygemm.packed.view(torch.uint8).view(layer.weight.shape)


def _from_tinygemm(layer: nn.Module) -> None:
    """Back to our layout (rows are about to be stored into it), exactly: the levels are only moved."""
    layer.weight.data = from_tinygemm_layout(layer.tinygemm.packed)
    layer.tinygemm, layer.rows_stored = None, 0


def _cpu_kernel_takes(layer: nn.Module) -> bool:
    return layer.group_size in CPU_GROUP_SIZES and layer.weight.shape[0] % CPU_BLOCK_N == 0


def _cpu_int4_mm(x2: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    if layer.cpu_int4 is None:
        layer.cpu_int4 = _cpu_pack(layer)
    packed, scale_zero = layer.cpu_int4
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), packed, layer.group_size,
                                                   scale_zero)
    return y.to(x2.dtype)


def _cpu_pack(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's CPU layout: its packing of the levels, and [G, N, 2] (scale, zero) in bfloat16."""
    levels = torch.stack([layer.weight & 0xF, layer.weight >> 4], dim=-1).flatten(1).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels, 1)
    scale_zero = torch.stack([layer.weight_scale.T, layer.weight_zero.T], dim=-1).to(torch.bfloat16).contiguous()
    return packed, scale_zero


class Int4Scheme:
    """Group-wise INT4 weights for the parallel linears (layers/linear.py). group_size None: per layer, the
    first of GROUP_SIZES that divides its input features; a GGUF file's kept weights fix it (32)."""

    name = "int4"

    def __init__(self, group_size: int | None = None, lm_head_int8: bool = False) -> None:
        self.group_size = group_size
        self.lm_head_int8 = lm_head_int8  # the embedding / LM head as int8 rows too (layers/embedding.py)

    def create_weights(self, layer: nn.Module, output_size: int, input_size: int) -> None:
        group = self._group_size(layer, input_size)
        num_groups = input_size // group
        layer.group_size, layer.cpu_int4, layer.tinygemm, layer.rows_stored = group, None, None, 0
        layer.run_dtype = torch.get_default_dtype()  # the model's dtype, which its layers are built in (a bias's)
        layer.weight = nn.Parameter(torch.empty(output_size, input_size // 2, dtype=torch.uint8), requires_grad=False)
        layer.register_buffer("weight_scale", torch.ones(output_size, num_groups, dtype=torch.float32))
        layer.register_buffer("weight_zero", torch.zeros(output_size, num_groups, dtype=torch.float32))
        layer.weight.dummy_init = lambda std, generator: _init_dummy(layer, std, generator)

    def _group_size(self, layer: nn.Module, input_size: int) -> int:
        """The group size of the whole layer's input features, which must split a row-parallel rank's evenly."""
        row_parallel = isinstance(layer, RowParallelLinear)
        full = input_size * layer.tp_size if row_parallel else input_size
        group = self.group_size or group_size_for(full)
        if input_size % group or full % group:
            where = f" at tensor_parallel_size={layer.tp_size}" if row_parallel and layer.tp_size > 1 else ""
            raise ModelLoadError(f"int4 group size {group} does not divide the {input_size} input features of "
                                 f"each rank{where} (input_size={full}); use a tensor_parallel_size whose share "
                                 f"is a multiple of {group}")
        return group

    def load_rows(self, layer: nn.Module, offset: int, rows: torch.Tensor | Int4Rows, columns: Columns,
                  shard_id: object) -> None:
        """rows: [n, full K] of the checkpoint, float (quantized here) or Int4Rows (kept as they are)."""
        if isinstance(rows, Int4Rows):
            if rows.group_size != layer.group_size:
                raise ModelLoadError(f"int4 checkpoint rows in groups of {rows.group_size} do not fit a layer "
                                     f"built with groups of {layer.group_size}")
            kept = _narrow_int4(rows, columns)
        else:
            rows = rows.to(layer.weight.device)
            kept = quantize_groups(rows if columns is None else rows.narrow(1, *columns), layer.group_size)
        self._store(layer, offset, kept)

    @staticmethod
    def _store(layer: nn.Module, offset: int, rows: Int4Rows) -> None:
        if layer.tinygemm is not None:
            _from_tinygemm(layer)
        packed = pack_int4(rows.levels.to(layer.weight.device))
        dst = rows_of(layer.weight.data, offset, packed)
        if dst.shape != packed.shape:
            raise ValueError(f"checkpoint tensor of shape {tuple(rows.shape)} does not fit parameter "
                             f"{(layer.weight.shape[0], 2 * layer.weight.shape[1])}")
        dst.copy_(packed)
        rows_of(layer.weight_scale, offset, rows.scale).copy_(rows.scale)
        rows_of(layer.weight_zero, offset, rows.zero).copy_(rows.zero)
        layer.cpu_int4 = None  # the CPU kernel's copy is rebuilt from the stored tensors on its next call
        layer.rows_stored += rows.shape[0]
        if layer.rows_stored >= layer.weight.shape[0] and _tinygemm_serves(layer):
            _to_tinygemm(layer)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return int4_linear(x, layer, bias)


def _narrow_int4(rows: Int4Rows, columns: Columns) -> Int4Rows:
    """A row-parallel rank's columns of kept rows: whole groups (the layer checked that they divide)."""
    if columns is None:
        return rows
    start, size = columns
    group = rows.group_size
    return Int4Rows(rows.levels.narrow(1, start, size), rows.scale.narrow(1, start // group, size // group),
                    rows.zero.narrow(1, start // group, size // group))


@torch.no_grad()
def _init_dummy(layer: nn.Module, std: float, generator: torch.Generator) -> None:
    """Random weights (load_format="dummy"): Normal(0, std) drawn in float32, then quantized like a checkpoint."""
    n, k = layer.weight.shape[0], 2 * layer.weight.shape[1]
    drawn = torch.empty(n, k, dtype=torch.float32, device=layer.weight.device).normal_(0.0, std, generator=generator)
    Int4Scheme._store(layer, 0, quantize_groups(drawn, layer.group_size))
