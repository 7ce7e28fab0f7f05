"""torch's CUDA int4 "tinygemm" (aten._weight_int4pack_mm, the kernel gpt-fast runs) on our int4 format.

Its arithmetic is exactly kernels/gemv_int4.py's: per group of input features of a row a scale and a zero,
w = (q - 8) * scale + zero (aten/src/ATen/native/cuda/int4mm.cu: the levels become q - 8 in bf16, then one
bf16 fma with the group's scale and zero), so our levels, scales and zeros map onto it without requantizing.
What differs is the layout, and the precision of the scales:

  - aten._convert_weight_to_int4pack (torch >= 2.5 on CUDA) takes [N, K // 2] uint8 with the EVEN input
    feature in the HIGH nibble (torch's tests and torchao pack `q[:, ::2] << 4 | q[:, 1::2]`); ours has it in
    the low one, so each byte's nibbles are swapped first. It returns int32 [N / 8, K / (16 t), 32, t / 2]
    (t = inner_k_tiles: the m16n8k16 B fragments of t k-tiles per lane); `tinygemm_layout_ref` is that
    packing in torch, so a test on the GPU checks our reading of it against torch's.
  - scales_and_zeros: [K // group_size, N, 2] bfloat16, [..., 0] the scale and [..., 1] the zero.

What it takes (int4mm.cu's checks): bfloat16 activations [M, K] contiguous (the output is bfloat16), any M;
group sizes 32, 64, 128, 256; K a multiple of 16 t (t = 8, 4 or 2: the largest that divides) and of the group;
N a multiple of 8; compute capability 8.0 or newer (its mma.sync is sm80's). `tinygemm_takes` says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scaleinfer.kernels.gemv_int4 import ZERO_POINT, unpack_int4

GROUP_SIZES = (32, 64, 128, 256)
INNER_K_TILES = (8, 4, 2)  # 16-, 8- and 4-byte loads per lane; the largest that divides K
N_TILE = 8  # output features per mma tile
K_TILE = 16  # input features per mma tile
LANES = 32


@dataclass(slots=True)
class TinygemmWeight:
    """A weight in tinygemm's layout: packed int32 [N / 8, K / (16 t), 32, t / 2], scale_zero [G, N, 2] bf16."""

    packed: torch.Tensor
    scale_zero: torch.Tensor
    group_size: int


def tinygemm_takes(n: int, k: int, group_size: int, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel serves a weight [N, K] in groups of group_size for activations of `dtype` on `device`
    (the module docstring has the constraints)."""
    if device.type != "cuda" or torch.version.cuda is None or dtype != torch.bfloat16:
        return False
    if group_size not in GROUP_SIZES or k % group_size or k % (K_TILE * INNER_K_TILES[-1]) or n % N_TILE:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def inner_k_tiles(k: int) -> int:
    return next(t for t in INNER_K_TILES if k % (K_TILE * t) == 0)


def pack_tinygemm(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> TinygemmWeight:
    """Our packed levels [N, K // 2] uint8, scale and zero [N, G] float32 -> the kernel's layout (new tensors)."""
    k = 2 * packed.shape[1]
    if packed.is_cuda:
        swapped = (packed << 4) | (packed >> 4)  # uint8: the even feature into the high nibble
        layout = torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), inner_k_tiles(k))
    else:  # torch has no CPU kernel for this layout (its CPU int4 kernel packs its own): the reference
        layout = tinygemm_layout_ref(packed, inner_k_tiles(k))
    return TinygemmWeight(layout, scale_zero(scale, zero), k // scale.shape[1])


def scale_zero(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """[N, G] scale and zero -> [G, N, 2] bfloat16 (scale, zero)."""
    return torch.stack([scale.T, zero.T], dim=-1).to(torch.bfloat16).contiguous()


def tinygemm_mm(x: torch.Tensor, weight: TinygemmWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K] -> [M, N] in x's dtype, computed in bfloat16 activations (the kernel's only dtype); off the GPU
    through tinygemm_mm_ref."""
    x16 = x.to(torch.bfloat16).contiguous()
    if x.is_cuda:
        y = torch.ops.aten._weight_int4pack_mm(x16, weight.packed, weight.group_size, weight.scale_zero)
    else:
        y = tinygemm_mm_ref(x16, weight)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype)


def _layout_index(n: int, k: int, t: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For each int32 word of the layout [N / 8, K / (16 t), 32, t / 2], the row and the 4 byte columns of our
    [N, K // 2] bytes it holds (int4mm.cu's matrix_to_m16n8k16_Bint4_layout): rows [..., 1], columns [..., 4]."""
    n_tile = torch.arange(n // N_TILE, device=device).view(-1, 1, 1, 1)
    k_outer = torch.arange(k // (K_TILE * t), device=device).view(1, -1, 1, 1)
    lane = torch.arange(LANES, device=device).view(1, 1, -1, 1)
    pair = torch.arange(t // 2, device=device).view(1, 1, 1, -1)  # two k-tiles per word
    rows = n_tile * N_TILE + lane // 4
    first = (k_outer * t + 2 * pair) * (K_TILE // 2) + lane % 4  # byte columns: +0, +4 (k-tile), +8, +12 (next)
    shape = torch.broadcast_shapes(rows.shape, first.shape)
    columns = first.expand(shape)[..., None] + torch.tensor([0, 4, 8, 12], device=device)
    return rows.expand(shape)[..., None], columns


def tinygemm_layout_ref(packed: torch.Tensor, t: int) -> torch.Tensor:
    """Our bytes [N, K // 2] (even feature in the low nibble) -> what aten._convert_weight_to_int4pack returns
    for them nibble-swapped (pack_tinygemm): word nibble i < 4 holds the even feature of byte i, 4 + i its odd."""
    n, half_k = packed.shape
    rows, columns = _layout_index(n, 2 * half_k, t, packed.device)
    b = packed[rows, columns].to(torch.int64)  # [N / 8, K / (16 t), 32, t / 2, 4]
    shift = 4 * torch.arange(4, device=packed.device)
    word = (((b & 0xF) << shift) | ((b >> 4) << (shift + 16))).sum(-1)  # disjoint bits: the sum is the or
    return torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32)


def from_tinygemm_layout(layout: torch.Tensor) -> torch.Tensor:
    """The inverse of tinygemm_layout_ref: int32 [N / 8, K / (16 t), 32, t / 2] -> our bytes [N, K // 2]."""
    n, k, t = layout.shape[0] * N_TILE, layout.shape[1] * K_TILE * 2 * layout.shape[3], 2 * layout.shape[3]
    rows, columns = _layout_index(n, k, t, layout.device)
    word = layout.to(torch.int64)[..., None] & 0xFFFFFFFF
    shift = 4 * torch.arange(4, device=layout.device)
    b = ((word >> shift) & 0xF) | (((word >> (shift + 16)) & 0xF) << 4)  # [..., 4]
    out = torch.empty(n, k // 2, dtype=torch.uint8, device=layout.device)
    out[rows.expand(columns.shape), columns] = b.to(torch.uint8)
    return out


def tinygemm_weight_ref(weight: TinygemmWeight) -> torch.Tensor:
    """The weights the kernel multiplies, in torch: each (q - 8) * scale + zero from the bf16 scale and zero,
    rounded to bfloat16 (its one bf16 fma; here exact products, the sum in float32, then rounded). -> [N, K]."""
    levels = unpack_int4(from_tinygemm_layout(weight.packed)).float() - ZERO_POINT  # [N, K]
    s, z = (weight.scale_zero[..., i].T.float().repeat_interleave(weight.group_size, dim=1) for i in (0, 1))
    return (levels * s + z).to(torch.bfloat16)


def tinygemm_mm_ref(x: torch.Tensor, weight: TinygemmWeight) -> torch.Tensor:
    """The kernel's arithmetic in torch: tinygemm_weight_ref's weights, products summed in float32, the output in
    bfloat16. x: [M, K] bfloat16 -> [M, N] bfloat16."""
    return (x.float() @ tinygemm_weight_ref(weight).float().T).to(torch.bfloat16)
