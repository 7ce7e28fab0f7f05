"""y = x @ W.T with W in torch's tinygemm layout (kernels/int4_tinygemm.py), dequantized in registers: the int4
layers' matmul between tinygemm's rows and the dequantized weight's (layers/quant_int4.py), read from the one
copy of the weight such a layer holds, without a temporary.

Past 16 rows tinygemm dequantizes the whole weight again for every 16 rows of x (its m-tile), and writing the
weight to bf16 for cuBLAS (kernels/dequant_int4_tinygemm.py) moves five times the bytes of the levels every step.
Here each program owns a [BLOCK_M, BLOCK_N] tile of y and walks K in BLOCK_K steps: it reads the int32 words of
its [BLOCK_N, BLOCK_K] weight tile (the layout's index math: kernels/dequant_int4_tinygemm.py's jit helpers, which
its dequantizing kernel calls too), turns them into tinygemm's bf16 values to the bit (`tinygemm_values`:
(q - 8) * scale + zero in float32, rounded to bf16, as tinygemm_weight_ref), and multiplies them with the x tile
on the tensor cores (float32 sums). So the weight is read once per BLOCK_M rows of x: at up to BLOCK_M rows, once.

Two ways to read a tile (GemmTiles.words): each value its word (`layout_levels`: 8 loads of every word from L1,
index math per value), or each word once (`layout_words`), unpacked nibble by nibble and put in feature order in
registers (`word_levels`). Compiled for sm90 (no GPU here) neither spills at the bench's tiles; the word read
stages less in shared memory (64 x 32 x 128, 4 warps: 129 registers and 60 KB, against 126 and 88 KB for the value
read, which stages a word per value). The bench times both.

BLOCK_K divides the group size (32..256), so a step reads one scale and one zero per output feature; K is a
multiple of the group, so no step is partial. x is bfloat16 (the layout's only run dtype), as is the output.
GemmTiles.split_k splits K over more programs (float32 partial sums torch adds) where the output has few tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scaleinfer.kernels.checks import check_bias, check_contiguous, check_dtype, check_power_of_two, check_shape
from scaleinfer.kernels.dequant_int4_tinygemm import (
    layout_levels,
    layout_words,
    tinygemm_values,
    weight_shape,
    word_levels,
)
from scaleinfer.kernels.dispatch import dot_args, mma, tl, triton, use_triton
from scaleinfer.kernels.int4_tinygemm import TinygemmWeight, tinygemm_mm_ref


@dataclass(frozen=True, slots=True)
class GemmTiles:
    """A launch's tiles: BLOCK_M is the next power of two of M within [16, max_block_m] (a dot needs 16 rows);
    BLOCK_K is block_k or the group size, whichever is smaller (32 or more where words: whole k-tile pairs).
    words: read each int32 word of the layout once (else once per value it holds). split_k: programs along K, each
    writing float32 partial sums that torch adds (in a fixed order: deterministic), for GEMMs with few output tiles
    (4096 features at few rows: 128 tiles of 32 for 132 SMs, each walking all of K)."""

    max_block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    words: bool = False
    split_k: int = 1

    def name(self) -> str:
        read = "words" if self.words else "values"
        split = f"split{self.split_k}" if self.split_k > 1 else ""
        return f"m{self.max_block_m}n{self.block_n}k{self.block_k}w{self.num_warps}s{self.num_stages}{read}{split}"


# Untimed (the bench's sweep decides). Compiled for sm90 without a GPU (triton.compile, GPUTarget("cuda", 90,
# 32), groups of 128, arguments 16-divisible as at launch): 129 registers a thread, no spills, 60 KB of shared
# memory; 32 features a tile so that the 4096-feature GEMMs (o_proj, down) have 128 tiles at up to 64 rows.
GPU_TILES = GemmTiles(max_block_m=64, block_n=32, block_k=128, num_warps=4, num_stages=3, words=True)
INTERPRETER_TILES = GemmTiles(max_block_m=32, block_n=16, block_k=64, num_warps=1, num_stages=1, words=True)
INTERPRETER_VALUE_TILES = GemmTiles(max_block_m=32, block_n=16, block_k=64, num_warps=1, num_stages=1)


def tinygemm_gemm(x: torch.Tensor, weight: TinygemmWeight, bias: torch.Tensor | None = None,
                  tiles: GemmTiles | None = None) -> torch.Tensor:
    """x: [M, K] -> [M, N] in x's dtype, computed in bfloat16 activations; off the GPU (unforced) through
    tinygemm_mm_ref, bias added as tinygemm_mm adds it."""
    x16 = x.to(torch.bfloat16).contiguous()
    if not use_triton(x16):
        y = tinygemm_mm_ref(x16, weight)
        return (y if bias is None else y + bias.to(y.dtype)).to(x.dtype)
    return tinygemm_gemm_triton(x16, weight, None if bias is None else bias.to(torch.bfloat16), tiles).to(x.dtype)


def tinygemm_gemm_triton(x: torch.Tensor, weight: TinygemmWeight, bias: torch.Tensor | None = None,
                         tiles: GemmTiles | None = None) -> torch.Tensor:
    """x: [M, K] bfloat16, contiguous -> [M, N] bfloat16 (bias [N] bfloat16 added to the float32 sums)."""
    n, k = _check(x, weight, bias)
    m = x.shape[0]
    tiles = tiles or (GPU_TILES if x.is_cuda else INTERPRETER_TILES)
    block_m = min(tiles.max_block_m, max(16, triton.next_power_of_2(m)))
    block_k = min(tiles.block_k, weight.group_size)
    if tiles.words and block_k % 32:
        raise ValueError(f"words tiles read whole k-tile pairs: BLOCK_K={block_k} is not a multiple of 32")
    steps = triton.cdiv(k // block_k, max(1, tiles.split_k))  # BLOCK_K steps a split
    split = triton.cdiv(k // block_k, steps)  # none empty
    out = torch.empty(split, m, n, dtype=torch.bfloat16 if split == 1 else torch.float32, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, tiles.block_n), split)
    _tinygemm_gemm_kernel[grid](
        x, weight.packed, weight.scale_zero, bias if bias is not None else out, out, m, n, k, steps * block_k,
        HAS_BIAS=bias is not None and split == 1, BLOCK_M=block_m, BLOCK_N=tiles.block_n, BLOCK_K=block_k,
        T=2 * weight.packed.shape[3], GROUP=weight.group_size, WORDS=tiles.words, **dot_args(x),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    if split == 1:
        return out[0]
    y = out.sum(0)  # [M, N] float32
    return (y if bias is None else y + bias.float()).to(torch.bfloat16)


def _check(x: torch.Tensor, weight: TinygemmWeight, bias: torch.Tensor | None) -> tuple[int, int]:
    """-> (N, K) of the weight, once x, the layout, scale_zero and the bias fit it."""
    check_dtype("packed", weight.packed, (torch.int32,))
    check_shape("packed", weight.packed, [None, None, 32, None])
    check_contiguous("packed", weight.packed)
    n, k = weight_shape(weight)
    check_shape("x", x, [None, k])
    check_dtype("x", x, (torch.bfloat16,))
    check_contiguous("x", x)
    check_power_of_two("group_size", weight.group_size)
    if weight.group_size < 16 or k % weight.group_size:
        raise ValueError(f"group_size={weight.group_size} does not split K={k} into groups of 16 or more")
    check_shape("scale_zero", weight.scale_zero, [k // weight.group_size, n, 2])
    check_dtype("scale_zero", weight.scale_zero, (torch.bfloat16,))
    check_contiguous("scale_zero", weight.scale_zero)
    check_bias(bias, n, torch.bfloat16)
    return n, k


@triton.jit(do_not_specialize=["m"])
def _tinygemm_gemm_kernel(x_ptr, packed_ptr, sz_ptr, bias_ptr, out_ptr, m, n, k, k_per_split, HAS_BIAS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, T: tl.constexpr,
                          GROUP: tl.constexpr, WORDS: tl.constexpr, UPCAST: tl.constexpr,
                          PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # rows of x [BLOCK_M]
    features = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # output features = weight rows [BLOCK_N]
    row_mask, feature_mask = rows < m, features < n
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * k  # [BLOCK_M, 1]
    cols = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = tl.program_id(2) * k_per_split  # this split's input features: [k_start, k_end)
    k_end = tl.minimum(k_start + k_per_split, k)
    for start in range(k_start, k_end, BLOCK_K):  # BLOCK_K divides the group, the group K: whole steps, one group each
        f = start + cols  # input features [BLOCK_K]
        xs = tl.load(x_rows + f[None, :], mask=row_mask[:, None], other=0.0)  # [BLOCK_M, BLOCK_K]
        if WORDS:
            words = layout_words(packed_ptr, features[:, None], start, k, feature_mask[:, None], T, BLOCK_K)
            q = word_levels(words, BLOCK_N, BLOCK_K)  # [BLOCK_N, BLOCK_K]
        else:
            q = layout_levels(packed_ptr, features[:, None], f[None, :], k, feature_mask[:, None], T)  # [BN, BK]
        sz = sz_ptr + ((start // GROUP) * n + features).to(tl.int64) * 2  # scale_zero [G, N, 2]: (scale, zero)
        scale = tl.load(sz, mask=feature_mask, other=0.0).to(tl.float32)  # [BLOCK_N]
        zero = tl.load(sz + 1, mask=feature_mask, other=0.0).to(tl.float32)
        w = tinygemm_values(q, scale[:, None], zero[:, None])  # [BLOCK_N, BLOCK_K] bfloat16
        acc += mma(xs, tl.trans(w), UPCAST, PRECISION)  # [BLOCK_M, BLOCK_N]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + features, mask=feature_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + (tl.program_id(2) * m + rows).to(tl.int64)[:, None] * n + features[None, :]  # out [split, M, N]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & feature_mask[None, :])
