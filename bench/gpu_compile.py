"""A Triton kernel compiled for an NVIDIA GPU on a machine without one (Triton's compiler and its wheel's ptxas),
and what the cubin asks of the card: registers a thread and stack bytes (spills) from cuobjdump, shared memory
from the compiler. The compile_*.py and ptx_*.py scripts beside it use this. Needs TRITON_INTERPRET unset."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def compile_for_gpu(fn: Any, signature: dict[str, str], constexprs: dict[str, Any], divisible_16: list[str] | tuple,
                    arch: int, num_warps: int, num_stages: int) -> Any:
    """fn (a @triton.jit kernel) for sm_<arch>: signature names each runtime argument's type ('*bf16', 'i32'),
    divisible_16 the arguments launched as multiples of 16 (Triton specializes on that), constexprs the rest."""
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible_16}
    source = ASTSource(fn, signature | {name: "constexpr" for name in constexprs}, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def registers_and_stack(compiled: Any) -> tuple[int, int]:
    """(registers a thread, stack bytes) of a compiled kernel's cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", cubin.name], capture_output=True,
                               text=True, check=True).stdout
    registers, stack = (int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK"))
    return registers, stack
