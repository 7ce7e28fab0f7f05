"""Compile kernels/moe_router.py's router kernel for a GPU without one: registers a thread, stack bytes (spills) and
shared memory at the models' expert counts and top_k, one token a program (GPU_ROWS) and bfloat16 logits, from
Triton's compiler and its wheel's cuobjdump (bench/gpu_compile.py).

    python bench/compile_moe_router.py [--arch 90]

Needs TRITON_INTERPRET unset (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_compile import compile_for_gpu, registers_and_stack  # noqa: E402

from scaleinfer.kernels.moe_router import GPU_ROWS, MAX_EXPERTS, MAX_TOP_K, _router_kernel  # noqa: E402

SIGNATURE = {"logits_ptr": "*bf16", "weights_ptr": "*fp32", "ids_ptr": "*i64", "num_tokens": "i32",
             "num_experts": "i32", "stride_t": "i32"}
# (num_experts, top_k): Mixtral, Qwen1.5-MoE, Qwen3-30B-A3B, DeepSeek-V3, Qwen3-Next, the kernel's bounds
CASES = ((8, 2), (60, 4), (128, 8), (256, 8), (512, 10), (MAX_EXPERTS, MAX_TOP_K))


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def compile_case(num_experts: int, top_k: int, arch: int, renormalize: bool = True) -> dict:
    consts = dict(TOP_K=top_k, RENORMALIZE=renormalize, ROWS=GPU_ROWS, BLOCK=next_power_of_2(num_experts),
                  BLOCK_K=next_power_of_2(top_k))
    compiled = compile_for_gpu(_router_kernel, SIGNATURE, consts, ("logits_ptr", "weights_ptr", "ids_ptr"), arch,
                               num_warps=min(GPU_ROWS, 4), num_stages=1)
    registers, stack = registers_and_stack(compiled)
    return {"num_experts": num_experts, "top_k": top_k, "renormalize": renormalize, "rows": GPU_ROWS,
            "registers": registers, "stack_bytes": stack, "shared_bytes": compiled.metadata.shared}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args()
    for num_experts, top_k in CASES:
        print(json.dumps(compile_case(num_experts, top_k, args.arch)), flush=True)


if __name__ == "__main__":
    main()
