"""Compile kernels/moe_decode.py's two GEMVs for a GPU without one: registers a thread, stack bytes (spills) and
shared memory of GPU_CONFIG's tiles and of bench/moe_decode_tiles.py's CANDIDATES, from Triton's compiler and
its wheel's cuobjdump. A tile that spills is not worth timing. Pointer and size arguments are 16-divisible as at
the models' shapes.

    python bench/compile_moe_decode.py [--arch 90] [--top-k 8] [--all]

Needs TRITON_INTERPRET unset (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_compile import compile_for_gpu, registers_and_stack  # noqa: E402

from scaleinfer.kernels.moe_decode import GPU_CONFIG, DecodeTiles, _down_kernel, _gate_up_kernel  # noqa: E402

KERNELS = {  # name: (kernel, signature, arguments divisible by 16)
    "gate_up": (_gate_up_kernel, {"x_ptr": "*bf16", "w13_ptr": "*bf16", "ids_ptr": "*i64", "act_ptr": "*bf16",
                                  "inter": "i32", "hidden": "i32", "stride_xm": "i32", "stride_we": "i32"},
                ("x_ptr", "w13_ptr", "act_ptr", "inter", "hidden", "stride_xm", "stride_we")),
    "down": (_down_kernel, {"act_ptr": "*bf16", "w2_ptr": "*bf16", "weights_ptr": "*fp32", "ids_ptr": "*i64",
                            "out_ptr": "*bf16", "hidden": "i32", "inter": "i32", "stride_we": "i32"},
             ("act_ptr", "w2_ptr", "out_ptr", "hidden", "inter", "stride_we")),
}


@dataclass(slots=True)
class TileCost:
    kernel: str
    tiles: str
    registers: int
    stack_bytes: int  # spills (the kernels have no local arrays)
    shared_bytes: int


def compile_tiles(kernel: str, tiles: DecodeTiles, arch: int, top_k: int) -> TileCost:
    fn, signature, divisible = KERNELS[kernel]
    consts = dict(TOP_K=top_k, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k)
    compiled = compile_for_gpu(fn, signature, consts, divisible, arch, tiles.num_warps, tiles.num_stages)
    registers, stack = registers_and_stack(compiled)
    name = f"n{tiles.block_n}k{tiles.block_k}w{tiles.num_warps}s{tiles.num_stages}"
    return TileCost(kernel, name, registers, stack, compiled.metadata.shared)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--all", action="store_true", help="also moe_decode_tiles.CANDIDATES")
    args = parser.parse_args()
    tiles = {"gate_up": [GPU_CONFIG.gate_up], "down": [GPU_CONFIG.down]}
    if args.all:
        from moe_decode_tiles import CANDIDATES

        tiles = {kernel: chosen + CANDIDATES for kernel, chosen in tiles.items()}
    for kernel, choices in tiles.items():
        for choice in choices:
            print(json.dumps(asdict(compile_tiles(kernel, choice, args.arch, args.top_k))), flush=True)


if __name__ == "__main__":
    main()
