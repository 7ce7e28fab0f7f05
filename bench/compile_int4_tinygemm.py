"""Compile kernels/gemm_int4_tinygemm.py's GEMM for a GPU without one: registers a thread, stack bytes (spills) and
shared memory of each of bench/decode_gemms_quant.py's GEMM_TILES, from Triton's own compiler and ptxas (its
wheel's) and cuobjdump. What a tile costs before any GPU run: a tile that spills or asks for more shared memory
than the card has (227 KB a block on Hopper) is not worth a lease. The arguments are 16-divisible as at launch.

    python bench/compile_int4_tinygemm.py [--arch 90] [--group 128] [--inner-k-tiles 8]

Needs TRITON_INTERPRET unset (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_gemms_quant import GEMM_TILES  # noqa: E402
from gpu_compile import compile_for_gpu, registers_and_stack  # noqa: E402

from scaleinfer.kernels.gemm_int4_tinygemm import GemmTiles, _tinygemm_gemm_kernel  # noqa: E402

SIGNATURE = {"x_ptr": "*bf16", "packed_ptr": "*i32", "sz_ptr": "*bf16", "bias_ptr": "*bf16", "out_ptr": "*bf16",
             "m": "i32", "n": "i32", "k": "i32", "k_per_split": "i32"}
DIVISIBLE_16 = ("x_ptr", "packed_ptr", "sz_ptr", "bias_ptr", "out_ptr", "n", "k", "k_per_split")  # m is not


@dataclass(slots=True)
class TileCost:
    tiles: str
    registers: int
    stack_bytes: int  # spills (the kernel has no local arrays)
    shared_bytes: int


def compile_tiles(tiles: GemmTiles, block_m: int, arch: int, group: int, t: int) -> TileCost:
    """One launch's kernel (BLOCK_M rows of x, bias on where the kernel adds it) compiled for sm_<arch>."""
    consts = dict(HAS_BIAS=tiles.split_k == 1, BLOCK_M=block_m, BLOCK_N=tiles.block_n,
                  BLOCK_K=min(tiles.block_k, group), T=t, GROUP=group, WORDS=tiles.words, UPCAST=False,
                  PRECISION="tf32")
    kernel = compile_for_gpu(_tinygemm_gemm_kernel, SIGNATURE, consts, DIVISIBLE_16, arch, tiles.num_warps,
                             tiles.num_stages)
    registers, stack = registers_and_stack(kernel)
    return TileCost(f"{tiles.name()}@m{block_m}", registers, stack, kernel.metadata.shared)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--inner-k-tiles", type=int, default=8, help="t of the layout (8 where 128 divides K)")
    args = parser.parse_args()
    for tiles in GEMM_TILES:
        cost = compile_tiles(tiles, tiles.max_block_m, args.arch, args.group, args.inner_k_tiles)
        print(json.dumps(asdict(cost)), flush=True)


if __name__ == "__main__":
    main()
