"""Paged decode attention's stage-1 tiling (kernels/decode_attention.py DecodeTile), timed per cache dtype.

    python bench/decode_attention_tiles.py [--shape llama3-8b] [--cases 64x4096,1x4096]

Why: on an H200 (profile_step 64 x 4096, d0a143c) the e4m3 cache's partition kernel takes 220 us a layer against
245 for bf16 while it reads half the bytes: at one 64-token tile in flight a program, half the bytes are in flight
too. This times every candidate tiling (tokens a tile, warps, pipelining stages) for both caches at each case
(sequences x context), CALLS calls replayed from one CUDA graph (at one sequence a call is a few microseconds of
kernel: launched from Python it would time the host), and reports the bytes of K and V read per second.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ceilings, timed, write_result  # noqa: E402
from shapes import SHAPES  # noqa: E402

from scaleinfer.kernels.decode_attention import DEFAULT_TILE, DecodeTile, decode_attention_triton  # noqa: E402

BLOCK_SIZE = 16
CANDIDATES = [DecodeTile(block_n=n, num_warps=w, num_stages=s)
              for n, w, s in itertools.product((64, 128), (4, 8), (2, 3, 4))]
CACHE_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
CALLS = 20  # per graph replay: one layer's call after another


def case_inputs(arch: dict, num_seqs: int, context: int, cache_dtype: torch.dtype, device: torch.device) -> dict:
    heads, kv_heads = arch["num_attention_heads"], arch["num_key_value_heads"]
    head_dim = arch.get("head_dim") or arch["hidden_size"] // heads
    blocks_per_seq = context // BLOCK_SIZE
    num_blocks = num_seqs * blocks_per_seq
    caches = [torch.randn(num_blocks, BLOCK_SIZE, kv_heads, head_dim, device=device).to(cache_dtype) for _ in "kv"]
    tables = torch.randperm(num_blocks, device=device).view(num_seqs, blocks_per_seq)  # pages scattered
    return dict(q=torch.randn(num_seqs, heads, head_dim, device=device, dtype=torch.bfloat16), k_cache=caches[0],
                v_cache=caches[1], block_tables=tables,
                context_lens=torch.full((num_seqs,), context, device=device, dtype=torch.int64),
                scale=head_dim ** -0.5, max_context_len=context)


def time_tile(inputs: dict, tile: DecodeTile, device: torch.device) -> float:
    """Seconds a call, best of the timed replays."""
    out = torch.empty_like(inputs["q"])
    decode_attention_triton(**inputs, out=out, tile=tile)  # compiled outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            decode_attention_triton(**inputs, out=out, tile=tile)
    return timed(graph.replay, repeats=5, device=device) / CALLS


def sweep(arch: dict, cases: list[tuple[int, int]], device: torch.device) -> list[dict]:
    rows = []
    for (num_seqs, context), (name, dtype) in itertools.product(cases, CACHE_DTYPES.items()):
        inputs = case_inputs(arch, num_seqs, context, dtype, device)
        nbytes = 2 * inputs["k_cache"].numel() * dtype.itemsize  # every page of K and V is read once
        for tile in CANDIDATES:
            seconds = time_tile(inputs, tile, device)
            rows.append({"num_seqs": num_seqs, "context": context, "cache": name, "block_n": tile.block_n,
                         "num_warps": tile.num_warps, "num_stages": tile.num_stages, "default": tile == DEFAULT_TILE,
                         "us": seconds * 1e6, "kv_bytes": nbytes, "gb_s": nbytes / seconds / 1e9})
        del inputs
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--cases", default="64x4096,1x4096", help="sequences x context, comma-separated")
    args = parser.parse_args()
    cases = [tuple(int(v) for v in case.split("x")) for case in args.cases.split(",")]
    device = torch.device("cuda")
    result = {"shape": args.shape, "ceilings": ceilings(device, torch.bfloat16)}
    rows = sweep(SHAPES[args.shape], cases, device)
    for row in rows:
        row["fraction_of_copy_bandwidth"] = row["gb_s"] / result["ceilings"]["copy_gb_s"]
    result["rows"] = rows
    for (num_seqs, context), cache in itertools.product(cases, CACHE_DTYPES):
        mine = [r for r in rows if (r["num_seqs"], r["context"], r["cache"]) == (num_seqs, context, cache)]
        best, default = min(mine, key=lambda r: r["us"]), next(r for r in mine if r["default"])
        print(f"{num_seqs}x{context} {cache}: default {default['us']:.1f} us ({default['gb_s']:.0f} GB/s); best "
              f"block_n {best['block_n']} warps {best['num_warps']} stages {best['num_stages']} {best['us']:.1f} us "
              f"({best['gb_s']:.0f} GB/s)")
    print(f"wrote {write_result(f'decode-attention-tiles-{args.shape}', device, result)}")


if __name__ == "__main__":
    main()
