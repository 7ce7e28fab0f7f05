"""Tiles of the fused MoE's decode GEMVs (kernels/moe_decode.py) on the card: each kernel alone, replayed from a
CUDA graph over moe.GRAPH_LAYERS expert stacks, at decode batches with random routing, for each candidate tile;
GB/s of the weights the routing touches (GEMM 1: w13 rows, GEMM 2: w2 rows) against the copy bandwidth. And the
router before them (select_experts): kernels/moe_router.py's one launch against the torch path (float32 cast,
softmax, topk, renormalize), us per layer replayed from a graph over num_hidden_layers logits buffers.

    python bench/moe_decode_tiles.py --shape qwen3-30b-a3b|mixtral-8x7b [--batches 1,8] [--kernels router]

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
from scaleinfer.kernels.moe_router import route, route_ref  # noqa: E402

KERNELS = ("gate_up", "down", "router")

CANDIDATES = [DecodeTiles(n, k, w, s) for n, k, w, s in (
    (4, 512, 4, 3), (8, 512, 4, 3), (4, 1024, 4, 3), (16, 512, 8, 3), (8, 1024, 8, 3), (16, 256, 4, 3),
    (8, 256, 2, 3), (2, 1024, 4, 3), (8, 512, 4, 1), (4, 512, 4, 2),
)]


def sweep(arch_config: dict, batches: list[int], device: torch.device, dtype: torch.dtype,
          kernels: tuple[str, ...] = ("gate_up", "down")) -> list[dict]:
    hidden, experts, top_k = arch_config["hidden_size"], _num_experts(arch_config), arch_config["num_experts_per_tok"]
    width = arch_config.get("moe_intermediate_size") or arch_config["intermediate_size"]
    layers = [_expert_stack(experts, hidden, width, device, dtype) for _ in range(_graph_layers(device))]
    rows = []
    for batch in batches:
        x = torch.randn(batch, hidden, device=device, dtype=dtype)
        weights, ids = torch.randn(batch, experts, device=device).softmax(-1).topk(top_k, dim=-1)
        act = torch.randn(batch * top_k, width, device=device, dtype=dtype)
        touched = int(ids.unique().numel())
        gemvs = {"gate_up": (lambda w13, w2, t, x=x, i=ids: gate_up_gemv(x, w13, i, t), 2 * width * hidden),
                 "down": (lambda w13, w2, t, a=act, w=weights, i=ids: down_gemv(a, w2, w, i, t), hidden * width)}
        for name, (fn, elements) in gemvs.items():
            if name not in kernels:
                continue
            for tiles in CANDIDATES:
                seconds = _per_layer(fn, layers, tiles, device)
                nbytes = touched * elements * dtype.itemsize
                rows.append({"kernel": name, "batch": batch, "pairs": batch * top_k, "tiles": _name(tiles),
                             "us": seconds * 1e6, "bytes": nbytes, "gb_s": nbytes / seconds / 1e9})
    return rows


def router(arch_config: dict, batches: list[int], device: torch.device, dtype: torch.dtype) -> list[dict]:
    """select_experts' two paths at each batch: us per MoE layer, from a graph over the model's layers' logits."""
    experts, top_k = _num_experts(arch_config), arch_config["num_experts_per_tok"]
    renormalize, layers = arch_config.get("norm_topk_prob", True), arch_config["num_hidden_layers"]
    rows = []
    for batch in batches:
        logits = [torch.randn(batch, experts, device=device, dtype=dtype) for _ in range(layers)]
        for path, fn in (("triton", route), ("torch", route_ref)):
            def step(fn=fn, logits=logits):
                for layer in logits:
                    fn(layer, top_k, renormalize)

            us = timed(_graphed(step, device), repeats=20, device=device) / layers * 1e6
            rows.append({"batch": batch, "path": path, "experts": experts, "top_k": top_k,
                         "renormalize": renormalize, "us": us})
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
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"a subset of {','.join(KERNELS)}")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    kernels, batches = tuple(args.kernels.split(",")), [int(b) for b in args.batches.split(",")]
    if unknown := set(kernels) - set(KERNELS):
        parser.error(f"unknown --kernels {sorted(unknown)}")
    device, dtype = torch.device(args.device), torch.bfloat16
    result = {"shape": args.shape, "ceilings": ceilings(device, dtype)}
    rows = sweep(SHAPES[args.shape], batches, device, dtype, kernels)
    for row in rows:
        row["fraction_of_copy_bandwidth"] = row["gb_s"] / result["ceilings"]["copy_gb_s"]
    result["rows"] = rows
    for kernel in ("gate_up", "down"):
        for batch in sorted({r["batch"] for r in rows if r["kernel"] == kernel}):
            best = min((r for r in rows if r["kernel"] == kernel and r["batch"] == batch), key=lambda r: r["us"])
            print(f"{kernel} batch {batch}: best {best['tiles']} {best['us']:.1f} us "
                  f"{best['fraction_of_copy_bandwidth']:.0%} of copy")
    if "router" in kernels:
        result["router"] = router(SHAPES[args.shape], batches, device, dtype)
        for batch in batches:
            us = {r["path"]: r["us"] for r in result["router"] if r["batch"] == batch}
            print(f"router batch {batch}: triton {us['triton']:.1f} us, torch {us['torch']:.1f} us a layer")
    print(f"wrote {write_result(f'moe-decode-tiles-{args.shape}', device, result)}")


if __name__ == "__main__":
    main()
