"""Tiles of the fused MoE's decode GEMVs (kernels/moe_decode.py) on the card: each kernel alone, replayed from a
CUDA graph over moe.GRAPH_LAYERS expert stacks, at decode batches with random routing, for each candidate tile;
GB/s of the weights the routing touches (GEMM 1: w13 rows, GEMM 2: w2 rows) against the copy bandwidth.

    python bench/moe_decode_tiles.py --shape qwen3-30b-a3b|mixtral-8x7b [--batches 1,8]

The defaults (moe_decode.GPU_CONFIG) are starting points; the fastest tile per kernel and batch goes there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ceilings, timed, write_result  # noqa: E402
from moe import _expert_stack, _graph_layers, _graphed, _num_experts  # noqa: E402
from shapes import SHAPES  # noqa: E402

from scaleinfer.kernels.moe_decode import DecodeTiles, down_gemv, gate_up_gemv  # noqa: E402

CANDIDATES = [DecodeTiles(n, k, w, s) for n, k, w, s in (
    (4, 512, 4, 3), (8, 512, 4, 3), (4, 1024, 4, 3), (16, 512, 8, 3), (8, 1024, 8, 3), (16, 256, 4, 3),
    (8, 256, 2, 3), (2, 1024, 4, 3), (8, 512, 4, 1), (4, 512, 4, 2),
)]


def sweep(arch_config: dict, batches: list[int], device: torch.device, dtype: torch.dtype) -> list[dict]:
    hidden, experts, top_k = arch_config["hidden_size"], _num_experts(arch_config), arch_config["num_experts_per_tok"]
    width = arch_config.get("moe_intermediate_size") or arch_config["intermediate_size"]
    layers = [_expert_stack(experts, hidden, width, device, dtype) for _ in range(_graph_layers(device))]
    rows = []
    for batch in batches:
        x = torch.randn(batch, hidden, device=device, dtype=dtype)
        weights, ids = torch.randn(batch, experts, device=device).softmax(-1).topk(top_k, dim=-1)
        act = torch.randn(batch * top_k, width, device=device, dtype=dtype)
        touched = int(ids.unique().numel())
        kernels = {"gate_up": (lambda w13, w2, t, x=x, i=ids: gate_up_gemv(x, w13, i, t), 2 * width * hidden),
                   "down": (lambda w13, w2, t, a=act, w=weights, i=ids: down_gemv(a, w2, w, i, t), hidden * width)}
        for name, (fn, elements) in kernels.items():
            for tiles in CANDIDATES:
                seconds = _per_layer(fn, layers, tiles, device)
                nbytes = touched * elements * dtype.itemsize
                rows.append({"kernel": name, "batch": batch, "pairs": batch * top_k, "tiles": _name(tiles),
                             "us": seconds * 1e6, "bytes": nbytes, "gb_s": nbytes / seconds / 1e9})
    return rows


def _per_layer(fn, layers, tiles: DecodeTiles, device: torch.device) -> float:
    def step():
        for w13, w2 in layers:
            fn(w13, w2, tiles)

    return timed(_graphed(step, device), repeats=20, device=device) / len(layers)


def _name(tiles: DecodeTiles) -> str:
    return f"n{tiles.block_n}k{tiles.block_k}w{tiles.num_warps}s{tiles.num_stages}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-30b-a3b")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), torch.bfloat16
    result = {"shape": args.shape, "ceilings": ceilings(device, dtype)}
    rows = sweep(SHAPES[args.shape], [int(b) for b in args.batches.split(",")], device, dtype)
    for row in rows:
        row["fraction_of_copy_bandwidth"] = row["gb_s"] / result["ceilings"]["copy_gb_s"]
    result["rows"] = rows
    for kernel in ("gate_up", "down"):
        for batch in sorted({r["batch"] for r in rows}):
            best = min((r for r in rows if r["kernel"] == kernel and r["batch"] == batch), key=lambda r: r["us"])
            print(f"{kernel} batch {batch}: best {best['tiles']} {best['us']:.1f} us "
                  f"{best['fraction_of_copy_bandwidth']:.0%} of copy")
    print(f"wrote {write_result(f'moe-decode-tiles-{args.shape}', device, result)}")


if __name__ == "__main__":
    main()
