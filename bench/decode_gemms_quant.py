"""The batch-1 decode GEMMs of a shape with quantized weights, each alone: the int8, int4 and fp8 GEMV kernels
over a sweep of their tiles, against the bf16 weight through cuBLAS on the same shape. GPU time from CUDA-graph
replays over enough weight copies that none is read from L2 (bench/decode_gemms.py's method); each figure
counts the bytes the kernel reads (levels, scales, zeros) against the copy bandwidth measured in the run.

int4 also times torch's tinygemm (aten._weight_int4pack_mm, kernels/int4_tinygemm.py) on the same weights: at
batch 1 against the GEMV's best tile ("batch1_faster" names the faster); the dequantization of its layout to bf16
alone (kernels/dequant_int4_tinygemm.py, against the copy bandwidth for the bytes it reads and writes); and at
--int4-rows rows the three paths of a layer tinygemm serves: tinygemm, its layout dequantized + cuBLAS, and the
Triton GEMM that dequantizes the layout in registers (kernels/gemm_int4_tinygemm.py, the best of GEMM_TILES, each
timed in "gemm_int4_tinygemm_sweep_us"). "faster" names the fastest: the layer's TINYGEMM_MAX_ROWS and
TINYGEMM_GEMM_MAX_ROWS should sit where it changes, and the kernel's GPU_TILES be the best tiles. Beside them the
group-wise Triton GEMM (kernels/gemm_int4.py) and our layout dequantized for cuBLAS (the paths where tinygemm does
not serve), and the bf16 weight through cuBLAS.

q8_0 (GGUF Q8_0 kept: int8 levels, a float32 scale per group of 32, kernels/gemv_int8_groups.py) sweeps its GEMV's
tiles and also times the weight dequantized to bf16 + cuBLAS at batch 1, the path it would otherwise take, and at
--int4-rows rows the weight-only GEMM (kernels/gemm_weight_only.py) against that dequant + cuBLAS and bf16 cuBLAS.

    python bench/decode_gemms_quant.py --shape llama3-8b [--schemes int8,int4,fp8,q8_0] [--int4-rows 16,32,64,512]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ceilings, write_result  # noqa: E402
from decode_gemms import gemm_shapes, graph_us  # noqa: E402
from shapes import SHAPES  # noqa: E402

from scaleinfer.kernels.dequant_int4_tinygemm import dequant_tinygemm_mm, dequantize_tinygemm  # noqa: E402
from scaleinfer.kernels.gemm_int4 import int4_gemm_triton  # noqa: E402
from scaleinfer.kernels.gemm_int4_tinygemm import GPU_TILES, GemmTiles, tinygemm_gemm_triton  # noqa: E402
from scaleinfer.kernels.gemm_weight_only import int8_groups_gemm_triton  # noqa: E402
from scaleinfer.kernels.gemv import GemvConfig  # noqa: E402
from scaleinfer.kernels.gemv_fp8 import FP8_DTYPE, fp8_gemv_triton  # noqa: E402
from scaleinfer.kernels.gemv_int4 import dequantize_int4, int4_gemv_triton  # noqa: E402
from scaleinfer.kernels.gemv_int8 import int8_gemv_triton  # noqa: E402
from scaleinfer.kernels.gemv_int8_groups import dequantize_int8_groups, int8_groups_gemv_triton  # noqa: E402
from scaleinfer.kernels.int4_tinygemm import pack_tinygemm, tinygemm_mm  # noqa: E402

ROTATION_BYTES = 1 << 30
INT4_GROUP = 128
WIDE_CONFIGS = [GemvConfig(n, k, w, s, sums) for n, k, w, s, sums in
                itertools.product((4, 8, 16), (512, 1024, 2048), (4, 8), (2,), (False, True))
                if sums or n * k <= 8192]  # a [block_n, block_k] float32 tile past 8K values spills
INT4_CONFIGS = [GemvConfig(n, k, w, s, True) for n, k, w, s in itertools.product((4, 8, 16), (256, 512, 1024),
                                                                                  (4, 8), (2,))]
# kernels/gemm_int4_tinygemm.py's tiles (max_block_m, block_n, block_k, num_warps, num_stages), each reading the
# layout a word at a time and a value at a time: narrow N tiles for the few-row, few-feature GEMMs (o_proj, down:
# 4096 features), tall M tiles to read the weight fewer times. Compiled for sm90 (no GPU) none spills registers;
# shared memory 20-86 KB a tile reading words, 49-131 KB reading values. GPU_TILES, the kernel's default, first.
GEMM_SHAPES = [(64, 32, 128, 4, 3), (16, 32, 128, 4, 3), (32, 32, 128, 4, 3), (64, 32, 64, 8, 4),
               (64, 64, 128, 8, 3), (64, 128, 64, 8, 3), (128, 32, 64, 8, 3), (128, 64, 64, 8, 3),
               (128, 128, 64, 8, 3), (128, 64, 128, 8, 2)]
GEMM_TILES = [GPU_TILES] + [tiles for words in (True, False) for tiles in (GemmTiles(*t, words=words)
                                                                           for t in GEMM_SHAPES) if tiles != GPU_TILES]
# split along K (float32 partial sums added by torch): more programs for the 4096-feature GEMMs at few rows
GEMM_TILES += [GemmTiles(*t, words=True, split_k=split) for t, split in [
    ((64, 32, 128, 4, 3), 2), ((64, 32, 128, 4, 3), 4), ((16, 32, 128, 4, 3), 4), ((64, 64, 128, 8, 3), 4),
    ((32, 64, 128, 4, 3), 8)]]
Q8_0_GROUP = 32
Q8_0_CONFIGS = [GemvConfig(n, k, w, s) for n, k, w, s in itertools.product((4, 8, 16), (256, 512, 1024, 2048),
                                                                          (4, 8), (2, 3))]


def scheme_weights(scheme: str, n: int, k: int, copies: int, device: torch.device) -> list[tuple]:
    """`copies` random weights of one scheme's layout (the kernels' argument tuples after x)."""
    def one() -> tuple:
        if scheme == "int8":
            q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
            return q, torch.rand(n, device=device) / 1000
        if scheme == "fp8":
            q = (torch.randn(n, k, device=device) * 50).to(FP8_DTYPE)
            return q, torch.rand(n, 1, device=device) / 1000
        if scheme == "q8_0":
            q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
            return q, torch.rand(n, k // Q8_0_GROUP, device=device) / 1000
        packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
        groups = k // INT4_GROUP
        return packed, torch.rand(n, groups, device=device) / 1000, torch.randn(n, groups, device=device) / 1000
    return [one() for _ in range(copies)]


def scheme_bytes(scheme: str, n: int, k: int) -> int:
    if scheme == "int4":
        return n * k // 2 + 2 * n * (k // INT4_GROUP) * 4
    if scheme == "q8_0":
        return n * k + n * (k // Q8_0_GROUP) * 4
    return n * k + n * 4


def kernel(scheme: str, x: torch.Tensor, config: GemvConfig) -> Callable[[tuple], torch.Tensor]:
    if scheme == "int8":
        return lambda w: int8_gemv_triton(x, w[0], w[1], None, config)
    if scheme == "fp8":
        return lambda w: fp8_gemv_triton(x, w[0], w[1], x.shape[1], None, config)
    if scheme == "q8_0":
        return lambda w: int8_groups_gemv_triton(x, w[0], w[1], None, config)
    return lambda w: int4_gemv_triton(x, w[0], w[1], w[2], None, config)


def measure(scheme: str, n: int, k: int, copy_gb_s: float, int4_rows: list[int]) -> dict:
    device = torch.device("cuda")
    nbytes = scheme_bytes(scheme, n, k)
    weights = scheme_weights(scheme, n, k, max(2, ROTATION_BYTES // nbytes), device)
    x = torch.randn(1, k, dtype=torch.bfloat16, device=device)
    configs = {"int4": INT4_CONFIGS, "q8_0": Q8_0_CONFIGS}.get(scheme, WIDE_CONFIGS)
    sweep = {_name(c): graph_us(kernel(scheme, x, c), weights) for c in configs}
    best = min(sweep, key=sweep.get)
    result = {"bytes": nbytes, "best": best, "best_us": sweep[best],
              "best_fraction_of_copy": nbytes / (sweep[best] * 1e-6) / 1e9 / copy_gb_s}
    if scheme == "int4":
        result |= int4_against_tinygemm(weights, x, sweep[best], int4_rows, copy_gb_s)
    if scheme == "q8_0":  # the path without the GEMV: the weight dequantized to bf16 each call, then cuBLAS
        result["dequant_cublas_us"] = graph_us(
            lambda w: F.linear(x, dequantize_int8_groups(w[0], w[1], torch.bfloat16)), weights)
        result["rows"] = {str(m): q8_0_rows_at(m, x, weights) for m in int4_rows}
    del weights
    copies = max(2, ROTATION_BYTES // (2 * n * k))
    bf16 = [torch.randn(n, k, dtype=torch.bfloat16, device=device) for _ in range(copies)]
    cublas_bf16 = graph_us(lambda w: F.linear(x, w), bf16)
    for m, row in result.get("rows", {}).items():
        row["cublas_bf16_us"] = graph_us(_cublas(torch.randn(int(m), k, dtype=torch.bfloat16, device=device)), bf16)
    del bf16
    return result | {"cublas_bf16_us": cublas_bf16, "speedup_vs_cublas_bf16": cublas_bf16 / sweep[best],
                     "sweep_us": sweep}


def int4_against_tinygemm(weights: list[tuple], x: torch.Tensor, gemv_us: float, int4_rows: list[int],
                          copy_gb_s: float) -> dict:
    """tinygemm on the same int4 weights (its own layout, packed once): at batch 1 against the GEMV's best tile;
    its layout dequantized alone; at each of int4_rows rows tinygemm and its dequantized layout through cuBLAS
    (the layer's two paths), the group-wise GEMM and our layout dequantized through cuBLAS."""
    packed = [(pack_tinygemm(*w),) for w in weights]
    (n, half_k), groups = weights[0][0].shape, weights[0][1].shape[1]
    tinygemm_us = graph_us(_tinygemm(x), packed)
    dequant_us = graph_us(lambda w: dequantize_tinygemm(w[0]), packed)
    dequant_bytes = n * half_k + 2 * n * 2 * half_k + 2 * n * groups * 2  # levels, scale_zero read; bf16 written
    rows = {str(m): int4_rows_at(m, x, weights, packed) for m in int4_rows}
    del packed
    return {"tinygemm_us": tinygemm_us,
            "tinygemm_fraction_of_copy": scheme_bytes("int4", n, 2 * half_k) / 1e9 / copy_gb_s / (tinygemm_us * 1e-6),
            "batch1_faster": "tinygemm" if tinygemm_us < gemv_us else "triton_gemv",
            "tinygemm_dequant_us": dequant_us,
            "tinygemm_dequant_fraction_of_copy": dequant_bytes / 1e9 / copy_gb_s / (dequant_us * 1e-6), "rows": rows}


def int4_rows_at(m: int, x: torch.Tensor, weights: list[tuple], packed: list[tuple]) -> dict:
    xm = torch.randn(m, x.shape[1], dtype=torch.bfloat16, device=x.device)
    row = {"tinygemm_us": graph_us(_tinygemm(xm), packed),
           "tinygemm_dequant_cublas_us": graph_us(lambda w: dequant_tinygemm_mm(xm, w[0]), packed),
           "gemm_int4_us": graph_us(lambda w: int4_gemm_triton(xm, *w), weights),
           "dequant_cublas_us": graph_us(lambda w: F.linear(xm, dequantize_int4(*w, dtype=torch.bfloat16)), weights)}
    gemm, failed = {}, {}
    for tiles in GEMM_TILES:  # a tile the compiler refuses (shared memory, registers) is named, not fatal
        try:
            gemm[tiles.name()] = graph_us(_tinygemm_gemm(xm, tiles), packed)
        except Exception as e:  # noqa: BLE001  (triton's compile errors have no common base)
            failed[tiles.name()] = f"{type(e).__name__}: {str(e)[:200]}"
    best = min(gemm, key=gemm.get)
    row |= {"gemm_int4_tinygemm_us": gemm[best], "gemm_int4_tinygemm_best": best, "gemm_int4_tinygemm_sweep_us": gemm,
            "gemm_int4_tinygemm_failed": failed}
    paths = ("tinygemm", "gemm_int4_tinygemm", "tinygemm_dequant_cublas")  # the layer's three on its layout
    return row | {"faster": min(paths, key=lambda path: row[f"{path}_us"])}


def q8_0_rows_at(m: int, x: torch.Tensor, weights: list[tuple]) -> dict:
    xm = torch.randn(m, x.shape[1], dtype=torch.bfloat16, device=x.device)
    dequant = lambda w: F.linear(xm, dequantize_int8_groups(w[0], w[1], torch.bfloat16))
    return {"gemm_us": graph_us(lambda w: int8_groups_gemm_triton(xm, *w), weights),
            "dequant_cublas_us": graph_us(dequant, weights)}


def _tinygemm(x: torch.Tensor) -> Callable[[tuple], torch.Tensor]:
    return lambda w: tinygemm_mm(x, w[0])


def _tinygemm_gemm(x: torch.Tensor, tiles: GemmTiles) -> Callable[[tuple], torch.Tensor]:
    return lambda w: tinygemm_gemm_triton(x, w[0], None, tiles)


def _cublas(x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda w: F.linear(x, w)


def _name(config: GemvConfig) -> str:
    sums = "sum" if config.step_sums else "tile"
    return f"{config.block_n}x{config.block_k}w{config.num_warps}s{config.num_stages}{sums}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--schemes", default="int8,int4,fp8")
    parser.add_argument("--int4-rows", default="16,32,64,128,256,512",
                        help="rows of x at which int4's matmuls are also timed")
    args = parser.parse_args()
    int4_rows = [int(m) for m in args.int4_rows.split(",") if m]
    device = torch.device("cuda")
    limits = ceilings(device, torch.bfloat16)
    result = {"shape": args.shape, "batch": 1, "ceilings": limits, "int4_group_size": INT4_GROUP,
              "int4_rows": int4_rows, "schemes": {}}
    for scheme in args.schemes.split(","):
        shapes = gemm_shapes(SHAPES[args.shape])
        gemms = {name: measure(scheme, *dims, limits["copy_gb_s"], int4_rows) for name, dims in shapes.items()}
        result["schemes"][scheme] = gemms
        for name, g in gemms.items():
            print(f"{scheme} {name:14s} {g['best_us']:7.1f} us {g['best_fraction_of_copy']:6.1%} ({g['best']}); "
                  f"cuBLAS bf16 {g['cublas_bf16_us']:7.1f} us", flush=True)
            if "tinygemm_us" in g:
                _print_int4(name, g)
            if "dequant_cublas_us" in g:
                print(f"{scheme} {name:14s} dequant+cuBLAS {g['dequant_cublas_us']:7.1f} us", flush=True)
                for m, row in g["rows"].items():
                    print(f"{scheme} {name:14s} M={m:>4s} gemm {row['gemm_us']:7.1f} us, dequant+cuBLAS "
                          f"{row['dequant_cublas_us']:7.1f} us, cuBLAS bf16 {row['cublas_bf16_us']:7.1f} us",
                          flush=True)
    print(write_result(f"decode-gemms-quant-{args.shape}", device, result))


def _print_int4(name: str, g: dict) -> None:
    print(f"int4 {name:14s} tinygemm {g['tinygemm_us']:7.1f} us {g['tinygemm_fraction_of_copy']:6.1%}; "
          f"batch 1 faster: {g['batch1_faster']}; its layout dequantized to bf16 {g['tinygemm_dequant_us']:7.1f} us "
          f"{g['tinygemm_dequant_fraction_of_copy']:6.1%}", flush=True)
    for m, row in g["rows"].items():
        print(f"int4 {name:14s} M={m:>4s} tinygemm {row['tinygemm_us']:7.1f} us, its layout's GEMM "
              f"{row['gemm_int4_tinygemm_us']:7.1f} us ({row['gemm_int4_tinygemm_best']}), dequant+cuBLAS "
              f"{row['tinygemm_dequant_cublas_us']:7.1f} us (faster: {row['faster']}); gemm_int4 "
              f"{row['gemm_int4_us']:7.1f} us, dequant+cuBLAS {row['dequant_cublas_us']:7.1f} us, cuBLAS bf16 "
              f"{row['cublas_bf16_us']:7.1f} us", flush=True)


if __name__ == "__main__":
    main()
