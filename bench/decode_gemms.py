"""The batch-1 decode GEMMs of a shape, each alone: cuBLAS (F.linear) against the Triton GEMV
(kernels/gemv.py) over a sweep of its tile sizes; GPU time from CUDA-graph replays, so no launch overhead,
over enough copies of each weight that none is read from L2 (as in a real step); the kernels cuBLAS
launches (a split-K GEMM adds a reduce kernel).

    python bench/decode_gemms.py --shape llama3-8b
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ceilings, write_result  # noqa: E402
from shapes import SHAPES  # noqa: E402

from scaleinfer.kernels.gemv import GemvConfig, gemv_triton  # noqa: E402

ROTATION_BYTES = 1 << 30  # weight copies cycled through per measurement: 20x the L2
CONFIGS = [GemvConfig(n, k, w, s) for n, k, w, s in itertools.product((8, 16, 32), (256, 512, 1024), (4, 8), (1, 3))]


def gemm_shapes(shape: dict) -> dict[str, tuple[int, int]]:
    """name -> (out_features, in_features) of each weight a decode step multiplies."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    head_dim = hidden // shape["num_attention_heads"]
    qkv = hidden + 2 * shape["num_key_value_heads"] * head_dim
    return {"qkv_proj": (qkv, hidden), "o_proj": (hidden, hidden), "gate_up_proj": (2 * inter, hidden),
            "down_proj": (hidden, inter), "lm_head": (shape["vocab_size"], hidden)}


def graph_us(fn: Callable[[torch.Tensor], torch.Tensor], weights: list[torch.Tensor]) -> float:
    """GPU microseconds per call of fn(weight), one call per weight, replayed in a CUDA graph."""
    fn(weights[0])
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for weight in weights:
            fn(weight)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * len(weights))


def cublas_kernels(x: torch.Tensor, weight: torch.Tensor) -> list[str]:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        F.linear(x, weight)
        torch.cuda.synchronize()
    return [e.name[:60] for e in prof.events() if e.device_type == DeviceType.CUDA]


def measure(out_features: int, in_features: int, copy_gb_s: float) -> dict:
    device = torch.device("cuda")
    nbytes = out_features * in_features * 2
    weights = [torch.randn(out_features, in_features, dtype=torch.bfloat16, device=device)
               for _ in range(max(2, ROTATION_BYTES // nbytes))]
    x = torch.randn(1, in_features, dtype=torch.bfloat16, device=device)
    cublas = graph_us(lambda w: F.linear(x, w), weights)
    sweep = {_name(c): graph_us(lambda w, c=c: gemv_triton(x, w, None, c), weights) for c in CONFIGS}
    best = min(sweep, key=sweep.get)
    del weights

    def fraction(us: float) -> float:
        return nbytes / (us * 1e-6) / 1e9 / copy_gb_s

    return {"cublas_us": cublas, "cublas_fraction_of_copy": fraction(cublas), "cublas_kernels": cublas_kernels(
        x, torch.randn(out_features, in_features, dtype=torch.bfloat16, device=device)),
        "gemv_best": best, "gemv_best_us": sweep[best], "gemv_fraction_of_copy": fraction(sweep[best]),
        "gemv_sweep_us": sweep}


def _name(config: GemvConfig) -> str:
    return f"{config.block_n}x{config.block_k}w{config.num_warps}s{config.num_stages}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    args = parser.parse_args()
    device = torch.device("cuda")
    limits = ceilings(device, torch.bfloat16)
    gemms = {name: measure(*dims, limits["copy_gb_s"]) for name, dims in gemm_shapes(SHAPES[args.shape]).items()}
    for name, g in gemms.items():
        print(f"{name:14s} cuBLAS {g['cublas_us']:7.1f} us {g['cublas_fraction_of_copy']:6.1%}  GEMV "
              f"{g['gemv_best_us']:7.1f} us {g['gemv_fraction_of_copy']:6.1%} ({g['gemv_best']})")
        print(f"{'':14s} {g['cublas_kernels']}")
    print(write_result(f"decode-gemms-{args.shape}", device, {"shape": args.shape, "batch": 1, "ceilings": limits,
                                                               "gemms": gemms}))


if __name__ == "__main__":
    main()
