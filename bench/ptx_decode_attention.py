"""What the decode attention kernel compiles to for a GPU, without one: the shared-memory and global loads, the
conversions and the tensor-core ops in the PTX of kernels/decode_attention.py's partition kernel, for a bf16 cache
and an FP8 (e4m3) one, at the Llama-3-8B decode shape (GROUP 4, head_dim 128, 16-token blocks, BLOCK_N 64).

    python bench/ptx_decode_attention.py [--arch 90] [--num-stages 2]

Why: on an H200 (profile_step 64 x 4096) the FP8 cache's partition kernel takes 342 us a layer against the bf16
cache's 251 us for half the bytes. The PTX shows where: the e4m3 V tile, staged in shared memory, is read back a
byte at a time (ld.shared.b8) for the P @ V product, as no 8-bit ldmatrix.trans exists; a bf16 tile takes
ldmatrix.trans. attention_tile.fp8_v_tile now keeps the tile converted where it is loaded, so it goes through shared
memory as float16 and comes back with ldmatrix.trans. Needs TRITON_INTERPRET unset (the interpreter replaces the
compiler).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_compile import compile_for_gpu, registers_and_stack  # noqa: E402

from scaleinfer.kernels.decode_attention import _partition_kernel  # noqa: E402

POINTERS = {"q_ptr": "*bf16", "block_tables_ptr": "*i64", "context_lens_ptr": "*i64", "out_ptr": "*bf16",
            "part_out_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32"}
SCALARS = {"qk_scale": "fp32", "v_scale": "fp32", "q_stride_s": "i32", "q_stride_h": "i32",
           "cache_stride_block": "i32", "cache_stride_slot": "i32", "cache_stride_head": "i32", "bt_stride": "i32",
           "out_stride_s": "i32", "out_stride_h": "i32", "num_partitions": "i32", "partition_size": "i32"}
NOT_DIVISIBLE = ("qk_scale", "v_scale", "bt_stride", "num_partitions")  # launched unspecialized or not integers
CONSTANTS = dict(GROUP=4, BLOCK_G=16, HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16, BLOCK_N=64,
                 ONE_PARTITION=False, UPCAST=False, PRECISION="tf32", WINDOW=0, SOFTCAP=0)
PATTERNS = {"global_loads": r"ld\.global[\w.]*", "async_copies": r"cp\.async\.c[ag][\w.]*",
            "shared_loads": r"ld\.shared[\w.]*", "shared_stores": r"st\.shared[\w.]*", "ldmatrix": r"ldmatrix[\w.]*",
            "conversions": r"cvt\.rn[\w.]*",
            "mma": r"mma\.sync[\w.]*"}


def compile_partition_kernel(cache_dtype: str, arch: int, num_stages: int) -> Any:
    """The partition kernel compiled for a cache of cache_dtype ('*bf16' or '*fp8e4nv')."""
    signature = {**POINTERS, "k_cache_ptr": cache_dtype, "v_cache_ptr": cache_dtype, **SCALARS}
    divisible = [name for name in signature if name not in NOT_DIVISIBLE]
    return compile_for_gpu(_partition_kernel, signature, CONSTANTS, divisible, arch, 4, num_stages)


def instruction_counts(cache_dtype: str, arch: int, num_stages: int) -> dict[str, dict[str, int]]:
    """The kernel's PTX instructions by kind, and its "resources": registers, stack and shared bytes."""
    kernel = compile_partition_kernel(cache_dtype, arch, num_stages)
    ptx = kernel.asm["ptx"]
    counts = {kind: dict(Counter(re.findall(pattern, ptx))) for kind, pattern in PATTERNS.items()}
    registers, stack = registers_and_stack(kernel)
    return counts | {"resources": dict(registers=registers, stack_bytes=stack, shared_bytes=kernel.metadata.shared)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--num-stages", type=int, default=2, help="as decode_attention launches it")
    args = parser.parse_args()
    for cache in ("*bf16", "*fp8e4nv"):
        print(cache, json.dumps(instruction_counts(cache, args.arch, args.num_stages)))


if __name__ == "__main__":
    main()
