"""The batch-1 decode GEMMs of a shape, each alone: time, weight GB/s against the copy bandwidth, and the
kernels cuBLAS launches for it (a split-K GEMM adds a reduce kernel).

    python bench/decode_gemms.py --shape llama3-8b [--batch 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ceilings, timed, write_result  # noqa: E402
from shapes import SHAPES  # noqa: E402


def gemm_shapes(shape: dict) -> dict[str, tuple[int, int]]:
    """name -> (out_features, in_features) of each weight a decode step multiplies."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    head_dim = hidden // shape["num_attention_heads"]
    qkv = hidden + 2 * shape["num_key_value_heads"] * head_dim
    return {"qkv_proj": (qkv, hidden), "o_proj": (hidden, hidden), "gate_up_proj": (2 * inter, hidden),
            "down_proj": (hidden, inter), "lm_head": (shape["vocab_size"], hidden)}


def measure(out_features: int, in_features: int, batch: int, copy_gb_s: float) -> dict:
    device = torch.device("cuda")
    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16, device=device)
    x = torch.randn(batch, in_features, dtype=torch.bfloat16, device=device)
    seconds = timed(lambda: [F.linear(x, weight) for _ in range(20)], device=device) / 20
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        F.linear(x, weight)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
    gb_s = weight.numel() * 2 / seconds / 1e9
    return {"us": seconds * 1e6, "weight_gb_s": gb_s, "fraction_of_copy": gb_s / copy_gb_s, "kernels": kernels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    device = torch.device("cuda")
    limits = ceilings(device, torch.bfloat16)
    gemms = {name: measure(*dims, args.batch, limits["copy_gb_s"]) for name, dims in
             gemm_shapes(SHAPES[args.shape]).items()}
    for name, figures in gemms.items():
        print(f"{name:14s} {figures['us']:8.1f} us {figures['fraction_of_copy']:6.1%} {figures['kernels']}")
    print(write_result(f"decode-gemms-{args.shape}", device, {"shape": args.shape, "batch": args.batch,
                                                               "ceilings": limits, "gemms": gemms}))


if __name__ == "__main__":
    main()
