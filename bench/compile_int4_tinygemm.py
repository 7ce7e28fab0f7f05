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
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_gemms_quant import GEMM_TILES  # noqa: E402

from scaleinfer.kernels.gemm_int4_tinygemm import GemmTiles, _tinygemm_gemm_kernel  # noqa: E402

SIGNATURE = {"x_ptr": "*bf16", "packed_ptr": "*i32", "sz_ptr": "*bf16", "bias_ptr": "*bf16", "out_ptr": "*bf16",
             "m": "i32", "n": "i32", "k": "i32", "k_per_split": "i32"}
DIVISIBLE_16 = ("x_ptr", "packed_ptr", "sz_ptr", "bias_ptr", "out_ptr", "n", "k", "k_per_split")  # m is not
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


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
    names = _tinygemm_gemm_kernel.arg_names
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in DIVISIBLE_16}
    source = ASTSource(_tinygemm_gemm_kernel, SIGNATURE | {name: "constexpr" for name in consts}, constexprs=consts,
                       attrs=attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", cubin.name], capture_output=True,
                               text=True, check=True).stdout
    registers, stack = (int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK"))
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
