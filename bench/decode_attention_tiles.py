"""Paged decode attention's stage-1 tiling (kernels/decode_attention.py DecodeTile), timed per cache dtype.

    python bench/decode_attention_tiles.py [--shape llama3-8b] [--cases 64x4096,256x512,256x2048r,1x4096]

Why: on an H200 (profile_step 64 x 4096, d0a143c) the e4m3 cache's partition kernel takes 220 us a layer against
245 for bf16 while it reads half the bytes: at one 64-token tile in flight a program, half the bytes are in flight
too. This times every candidate tiling (tokens a tile, warps, pipelining stages) for both caches at each case
(sequences x context), CALLS calls replayed from one CUDA graph (at one sequence a call is a few microseconds of
kernel: launched from Python it would time the host), and reports the bytes of K and V read per second. A case
ending in r is ragged, as a throughput run's decode batch is: context lengths spread evenly from a tenth of the
context to all of it, under a max_context_len of the context (the graph bucket). The default tiling is also timed
at each partition size that splits the case's context (PARTITIONS): the automatic choice gives 256 sequences of
8 KV heads one partition each, and a short walk per program may be what costs there.
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
PARTITIONS = (128, 256, 512, 1024)
CALLS = 20  # per graph replay: one layer's call after another


def parse_case(text: str) -> tuple[int, int, bool]:
    """'256x512' -> (256, 512, False); '256x2048r' -> (256, 2048, True)."""
    ragged = text.endswith("r")
    num_seqs, context = (int(v) for v in text.removesuffix("r").split("x"))
    return num_seqs, context, ragged


def context_lengths(num_seqs: int, context: int, ragged: bool) -> torch.Tensor:
    if not ragged:
        return torch.full((num_seqs,), context, dtype=torch.int64)
    return torch.linspace(context // 10, context, num_seqs).round().to(torch.int64)


def case_inputs(arch: dict, num_seqs: int, context: int, ragged: bool, cache_dtype: torch.dtype,
                device: torch.device) -> dict:
    heads, kv_heads = arch["num_attention_heads"], arch["num_key_value_heads"]
    head_dim = arch.get("head_dim") or arch["hidden_size"] // heads
    blocks_per_seq = context // BLOCK_SIZE
    num_blocks = num_seqs * blocks_per_seq
    caches = [torch.randn(num_blocks, BLOCK_SIZE, kv_heads, head_dim, device=device).to(cache_dtype) for _ in "kv"]
    tables = torch.randperm(num_blocks, device=device).view(num_seqs, blocks_per_seq)  # pages scattered
    return dict(q=torch.randn(num_seqs, heads, head_dim, device=device, dtype=torch.bfloat16), k_cache=caches[0],
                v_cache=caches[1], block_tables=tables,
                context_lens=context_lengths(num_seqs, context, ragged).to(device),
                scale=head_dim ** -0.5, max_context_len=context)


def time_tile(inputs: dict, tile: DecodeTile, partition_size: int | None, device: torch.device) -> float:
    """Seconds a call, best of the timed replays (partition_size None: the automatic choice)."""
    out = torch.empty_like(inputs["q"])
    call = dict(inputs, out=out, tile=tile, partition_size=partition_size)
    decode_attention_triton(**call)  # compiled outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            decode_attention_triton(**call)
    return timed(graph.replay, repeats=5, device=device) / CALLS


def runs(context: int) -> list[tuple[DecodeTile, int | None]]:
    """Every candidate tiling at the automatic partition size, and the default one at each size splitting context."""
    return [(tile, None) for tile in CANDIDATES] + [(DEFAULT_TILE, p) for p in PARTITIONS if p < context]


def sweep(arch: dict, cases: list[tuple[int, int, bool]], device: torch.device) -> list[dict]:
    rows = []
    for (num_seqs, context, ragged), (name, dtype) in itertools.product(cases, CACHE_DTYPES.items()):
        inputs = case_inputs(arch, num_seqs, context, ragged, dtype, device)
        token_bytes = 2 * inputs["k_cache"][0, 0].numel() * dtype.itemsize  # K and V of one token, every head
        nbytes = int(inputs["context_lens"].sum()) * token_bytes  # each context token's K and V read once
        for tile, partition_size in runs(context):
            seconds = time_tile(inputs, tile, partition_size, device)
            rows.append({"num_seqs": num_seqs, "context": context, "ragged": ragged, "cache": name,
                         "block_n": tile.block_n, "num_warps": tile.num_warps, "num_stages": tile.num_stages,
                         "partition_size": partition_size, "default": tile == DEFAULT_TILE and partition_size is None,
                         "us": seconds * 1e6, "kv_bytes": nbytes, "gb_s": nbytes / seconds / 1e9})
        del inputs
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--cases", default="64x4096,256x512,256x2048r,1x4096",
                        help="sequences x context, comma-separated; a trailing r: ragged contexts")
    args = parser.parse_args()
    cases = [parse_case(case) for case in args.cases.split(",")]
    device = torch.device("cuda")
    result = {"shape": args.shape, "ceilings": ceilings(device, torch.bfloat16)}
    rows = sweep(SHAPES[args.shape], cases, device)
    for row in rows:
        row["fraction_of_copy_bandwidth"] = row["gb_s"] / result["ceilings"]["copy_gb_s"]
    result["rows"] = rows
    for (num_seqs, context, ragged), cache in itertools.product(cases, CACHE_DTYPES):
        key = (num_seqs, context, ragged, cache)
        mine = [r for r in rows if (r["num_seqs"], r["context"], r["ragged"], r["cache"]) == key]
        best, default = min(mine, key=lambda r: r["us"]), next(r for r in mine if r["default"])
        print(f"{num_seqs}x{context}{'r' if ragged else ''} {cache}: default {default['us']:.1f} us "
              f"({default['gb_s']:.0f} GB/s); best block_n {best['block_n']} warps {best['num_warps']} stages "
              f"{best['num_stages']} partition {best['partition_size'] or 'auto'} {best['us']:.1f} us "
              f"({best['gb_s']:.0f} GB/s)")
    print(f"wrote {write_result(f'decode-attention-tiles-{args.shape}', device, result)}")


if __name__ == "__main__":
    main()
