"""A weight in torch's tinygemm layout (kernels/int4_tinygemm.py) dequantized to bfloat16 in one pass, for cuBLAS:
the int4 layers' matmul past TINYGEMM_MAX_ROWS rows (layers/quant_int4.py), where the layer holds only that
layout. tinygemm dequantizes the whole weight again for every 16 rows of x (its m-tile), so its time grows with
M / 16 (gate_up of Llama 3 8B on an H200: 136 us at 16 rows, 516 at 64, 16 ms at 2048); writing the weight once
in bf16 and running cuBLAS costs about the bytes moved (4096 x 28672: 59 MB of levels read, 235 MB written)
plus the bf16 matmul, whatever M.

The values are tinygemm's own, to the bit of `tinygemm_weight_ref`: w = (q - 8) * scale + zero from the bf16
scale and zero, the exact product plus the zero in float32, rounded to bfloat16, so a layer gives the same
weights at 16 rows and at 17.

The kernel: each program writes a [BLOCK_N, BLOCK_K] tile of the bf16 weight, contiguous along K (vector stores,
coalesced), and reads the int32 words that tile's values come from: 8 rows and 16 t features of a tile are the
t / 2 words of 32 lanes (`_layout_index`), a row's 16 t features 2 t consecutive words, each word read once per
value from L1 (the levels read are a quarter of the bytes written; the writes set the time). Its reading of the
layout (`layout_levels`; `layout_words` and `word_levels`) and its value rule (`tinygemm_values`) are jit helpers
that kernels/gemm_int4_tinygemm.py calls too: the one place the Triton kernels index the layout.

The temporary: the dequantized weight lives for one matmul, never beside the packed one between steps, and is
bounded by DEQUANT_CHUNK_BYTES: a weight larger than it is dequantized and multiplied in slices of output rows
into one output. Llama 3 8B's largest int4 linear, gate_up, is 235 MB in bf16 (one piece); its 128256 x 4096 head
would be 1.05 GB (4 slices: the bench's lm_head; the engine keeps the LM head in the run dtype or int8); a 70B
gate_up, 940 MB, takes 4.
Under CUDA graph capture the temporary comes from the caching allocator, as every activation does; no host sync.
"""

from __future__ import annotations

import torch

from scaleinfer.kernels.dispatch import tl, triton, use_triton
from scaleinfer.kernels.int4_tinygemm import K_TILE, N_TILE, TinygemmWeight, tinygemm_weight_ref

DEQUANT_CHUNK_BYTES = 256 << 20  # the largest bf16 temporary; past it the matmul runs in slices of rows
CHUNK_ROW_MULTIPLE = 128  # slices of whole cuBLAS tiles (and of whole 8-row layout tiles)
GPU_TILES = dict(block_n=16, block_k=256, num_warps=4)  # 32 values a thread (untuned: the bench times it)
INTERPRETER_TILES = dict(block_n=16, block_k=128, num_warps=1)


def weight_shape(weight: TinygemmWeight) -> tuple[int, int]:
    """[N, K] of a weight in tinygemm's layout [N / 8, K / (16 t), 32, t / 2]."""
    layout = weight.packed.shape
    return layout[0] * N_TILE, layout[1] * K_TILE * 2 * layout[3]


def dequantize_tinygemm(weight: TinygemmWeight, start: int = 0, rows: int | None = None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [start, start + rows) of the weight (all by default) -> [rows, K] bfloat16, into `out` when given.
    start and rows: multiples of 8 (whole layout tiles)."""
    n, k = weight_shape(weight)
    rows = n - start if rows is None else rows
    if out is None:
        out = torch.empty(rows, k, dtype=torch.bfloat16, device=weight.packed.device)
    if not use_triton(weight.packed):
        return out.copy_(tinygemm_weight_ref(weight)[start:start + rows])
    tiles = GPU_TILES if weight.packed.is_cuda else INTERPRETER_TILES
    grid = (triton.cdiv(rows, tiles["block_n"]), triton.cdiv(k, tiles["block_k"]))
    _dequant_kernel[grid](weight.packed, weight.scale_zero, out, n, k, start, start + rows,
                          T=2 * weight.packed.shape[3], GROUP=weight.group_size, BLOCK_N=tiles["block_n"],
                          BLOCK_K=tiles["block_k"], num_warps=tiles["num_warps"])
    return out


def dequant_tinygemm_mm(x: torch.Tensor, weight: TinygemmWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K] -> [M, N] in x's dtype: the weight dequantized to bf16 (in slices of chunk_rows rows) through
    cuBLAS in bfloat16 activations, bias added as tinygemm_mm adds it."""
    x16 = x.to(torch.bfloat16).contiguous()
    n, k = weight_shape(weight)
    step = chunk_rows(n, k)
    if step >= n:
        y = torch.mm(x16, dequantize_tinygemm(weight).T)
    else:
        y = torch.empty(x16.shape[0], n, dtype=torch.bfloat16, device=x16.device)
        w = torch.empty(step, k, dtype=torch.bfloat16, device=x16.device)  # one temporary, reused by each slice
        for start in range(0, n, step):
            size = min(step, n - start)
            torch.mm(x16, dequantize_tinygemm(weight, start, size, w[:size]).T, out=y[:, start:start + size])
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype)


def chunk_rows(n: int, k: int) -> int:
    """Output rows per slice: as many as keep the bf16 temporary within DEQUANT_CHUNK_BYTES, in whole tiles."""
    rows = DEQUANT_CHUNK_BYTES // (2 * k) // CHUNK_ROW_MULTIPLE * CHUNK_ROW_MULTIPLE
    return max(rows, CHUNK_ROW_MULTIPLE)


@triton.jit
def _dequant_kernel(packed_ptr, sz_ptr, out_ptr, n, k, row_start, row_end, T: tl.constexpr,
                    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = row_start + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # weight rows [BLOCK_N]
    features = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)  # [BLOCK_K]
    mask = (rows < row_end)[:, None] & (features < k)[None, :]
    r, f = rows[:, None], features[None, :]  # [BLOCK_N, 1], [1, BLOCK_K]
    q = layout_levels(packed_ptr, r, f, k, mask, T)  # [BLOCK_N, BLOCK_K]
    sz = sz_ptr + ((f // GROUP) * n + r).to(tl.int64) * 2  # scale_zero [G, N, 2]: (scale, zero)
    scale = tl.load(sz, mask=mask, other=0.0).to(tl.float32)
    zero = tl.load(sz + 1, mask=mask, other=0.0).to(tl.float32)
    out = out_ptr + (r - row_start).to(tl.int64) * k + f
    tl.store(out, tinygemm_values(q, scale, zero), mask=mask)


@triton.jit
def layout_levels(packed_ptr, r, f, k, mask, T: tl.constexpr):
    """The levels 0..15 of weight rows r [BLOCK_N, 1] at input features f [1, BLOCK_K] -> [BLOCK_N, BLOCK_K] int32,
    read from the layout [N / 8, K / (16 T), 32, T / 2] (the one place the kernels index it)."""
    # int4mm.cu's layout: lane (r % 8) * 4 + (f % 8) // 2 of 8-row tile r // 8 holds, in the word of its k-tile
    # pair (f % 16 T) // 32, feature f in nibble (f % 32) // 8 + 4 (f % 2).
    lane = (r % 8) * 4 + (f % 8) // 2
    word = ((r // 8 * (k // (16 * T)) + f // (16 * T)) * 32 + lane) * (T // 2) + (f % (16 * T)) // 32
    nibble = (f % 32) // 8 + 4 * (f % 2)
    return (tl.load(packed_ptr + word, mask=mask, other=0) >> (4 * nibble)) & 0xF


@triton.jit
def layout_words(packed_ptr, r, start, k, mask, T: tl.constexpr, BLOCK_K: tl.constexpr):
    """The int32 words that hold weight rows r [BLOCK_N, 1] at input features [start, start + BLOCK_K), each read
    once -> [BLOCK_N, BLOCK_K // 8]; start and BLOCK_K multiples of 32 (whole k-tile pairs). Word 4 b + j of a row
    is lane j of its k-tile pair b (word_levels has which features its nibbles hold)."""
    c = tl.arange(0, BLOCK_K // 8)[None, :]
    pair = start // 32 + c // 4  # the k-tile pair [1, BLOCK_K // 8]: 4 words of a row each (lanes 4 (r % 8) + j)
    lane = (r % 8) * 4 + c % 4
    word = ((r // 8 * (k // (16 * T)) + pair // (T // 2)) * 32 + lane) * (T // 2) + pair % (T // 2)
    return tl.load(packed_ptr + word, mask=mask, other=0)


@triton.jit
def word_levels(words, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """layout_words' words [BLOCK_N, BLOCK_K // 8] -> their levels in feature order [BLOCK_N, BLOCK_K]. Word 4 b + j
    of a row is lane j of k-tile pair b; its nibble 4 e + i holds feature 32 b + 8 i + 2 j + e."""
    nibbles = (words[:, :, None] >> (4 * tl.arange(0, 8))[None, None, :]) & 0xF  # [BLOCK_N, BLOCK_K // 8, 8]
    by_lane = tl.reshape(nibbles, (BLOCK_N, BLOCK_K // 32, 4, 2, 4))  # [row, b, j, e, i]
    return tl.reshape(tl.permute(by_lane, (0, 1, 4, 2, 3)), (BLOCK_N, BLOCK_K))  # [row, b, i, j, e]


@triton.jit
def tinygemm_values(q, scale, zero):
    """Levels q with their float32 scale and zero (broadcast to q) -> tinygemm's bfloat16 weights, to the bit of
    tinygemm_weight_ref: (q - 8) * scale is exact in float32, then one rounding for the zero, then bf16's."""
    return _round_to_bf16((q.to(tl.float32) - 8.0) * scale + zero)


@triton.jit
def _round_to_bf16(x):
    """float32 -> bfloat16 rounded to nearest, ties to even (torch's cast) in integer ops: Triton's interpreter
    casts by truncating (and its rtne mode rounds ties up); on the GPU these are cvt.rn.bf16.f32's bits."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
