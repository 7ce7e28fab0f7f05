"""The batch-1 decode GEMMs of a shape with quantized weights, each alone: the int8, int4 and fp8 GEMV kernels
over a sweep of their tiles, against the bf16 weight through cuBLAS on the same shape. GPU time from CUDA-graph
replays over enough weight copies that none is read from L2 (bench/decode_gemms.py's method); each figure
counts the bytes the kernel reads (levels, scales, zeros) against the copy bandwidth measured in the run.

    python bench/decode_gemms_quant.py --shape llama3-8b [--schemes int8,int4,fp8]
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

from scaleinfer.kernels.gemv import GemvConfig  # noqa: E402
from scaleinfer.kernels.gemv_fp8 import FP8_DTYPE, fp8_gemv_triton  # noqa: E402
from scaleinfer.kernels.gemv_int4 import int4_gemv_triton  # noqa: E402
from scaleinfer.kernels.gemv_int8 import int8_gemv_triton  # noqa: E402

ROTATION_BYTES = 1 << 30
INT4_GROUP = 128
WIDE_CONFIGS = [GemvConfig(n, k, w, s, sums) for n, k, w, s, sums in
                itertools.product((4, 8, 16), (512, 1024, 2048), (4, 8), (2,), (False, True))
                if sums or n * k <= 8192]  # a [block_n, block_k] float32 tile past 8K values spills
INT4_CONFIGS = [GemvConfig(n, k, w, s, True) for n, k, w, s in itertools.product((4, 8, 16), (256, 512, 1024),
                                                                                  (4, 8), (2,))]


def scheme_weights(scheme: str, n: int, k: int, copies: int, device: torch.device) -> list[tuple]:
    """`copies` random weights of one scheme's layout (the kernels' argument tuples after x)."""
    def one() -> tuple:
        if scheme == "int8":
            q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
            return q, torch.rand(n, device=device) / 1000
        if scheme == "fp8":
            q = (torch.randn(n, k, device=device) * 50).to(FP8_DTYPE)
            return q, torch.rand(n, 1, device=device) / 1000
        packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
        groups = k // INT4_GROUP
        return packed, torch.rand(n, groups, device=device) / 1000, torch.randn(n, groups, device=device) / 1000
    return [one() for _ in range(copies)]


def scheme_bytes(scheme: str, n: int, k: int) -> int:
    if scheme == "int4":
        return n * k // 2 + 2 * n * (k // INT4_GROUP) * 4
    return n * k + n * 4


def kernel(scheme: str, x: torch.Tensor, config: GemvConfig) -> Callable[[tuple], torch.Tensor]:
    if scheme == "int8":
        return lambda w: int8_gemv_triton(x, w[0], w[1], None, config)
    if scheme == "fp8":
        return lambda w: fp8_gemv_triton(x, w[0], w[1], x.shape[1], None, config)
    return lambda w: int4_gemv_triton(x, w[0], w[1], w[2], None, config)


def measure(scheme: str, n: int, k: int, copy_gb_s: float) -> dict:
    device = torch.device("cuda")
    nbytes = scheme_bytes(scheme, n, k)
    weights = scheme_weights(scheme, n, k, max(2, ROTATION_BYTES // nbytes), device)
    x = torch.randn(1, k, dtype=torch.bfloat16, device=device)
    configs = INT4_CONFIGS if scheme == "int4" else WIDE_CONFIGS
    sweep = {_name(c): graph_us(kernel(scheme, x, c), weights) for c in configs}
    del weights
    best = min(sweep, key=sweep.get)
    copies = max(2, ROTATION_BYTES // (2 * n * k))
    bf16 = [torch.randn(n, k, dtype=torch.bfloat16, device=device) for _ in range(copies)]
    cublas_bf16 = graph_us(lambda w: F.linear(x, w), bf16)
    del bf16
    return {"bytes": nbytes, "best": best, "best_us": sweep[best],
            "best_fraction_of_copy": nbytes / (sweep[best] * 1e-6) / 1e9 / copy_gb_s,
            "cublas_bf16_us": cublas_bf16, "speedup_vs_cublas_bf16": cublas_bf16 / sweep[best], "sweep_us": sweep}


def _name(config: GemvConfig) -> str:
    sums = "sum" if config.step_sums else "tile"
    return f"{config.block_n}x{config.block_k}w{config.num_warps}s{config.num_stages}{sums}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--schemes", default="int8,int4,fp8")
    args = parser.parse_args()
    device = torch.device("cuda")
    limits = ceilings(device, torch.bfloat16)
    result = {"shape": args.shape, "batch": 1, "ceilings": limits, "int4_group_size": INT4_GROUP, "schemes": {}}
    for scheme in args.schemes.split(","):
        shapes = gemm_shapes(SHAPES[args.shape])
        gemms = {name: measure(scheme, *dims, limits["copy_gb_s"]) for name, dims in shapes.items()}
        result["schemes"][scheme] = gemms
        for name, g in gemms.items():
            print(f"{scheme} {name:14s} {g['best_us']:7.1f} us {g['best_fraction_of_copy']:6.1%} ({g['best']}); "
                  f"cuBLAS bf16 {g['cublas_bf16_us']:7.1f} us", flush=True)
    print(write_result(f"decode-gemms-quant-{args.shape}", device, result))


if __name__ == "__main__":
    main()
