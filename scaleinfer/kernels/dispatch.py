"""When a kernel op runs its Triton kernel and when its torch reference.

Triton runs for CUDA tensors when it imports. Tests force it for CPU tensors, which Triton's interpreter
runs when TRITON_INTERPRET=1 was set before triton was first imported (tests/kernels/conftest.py does).
Without triton installed the kernel modules still import: `triton.jit` becomes a no-op and every op
takes its reference.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs: the references serve

    class _NoTriton:
        constexpr = None

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton()
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "force_triton", "mma", "tl", "triton", "use_triton"]

_forced = False


@contextmanager
def force_triton() -> Iterator[None]:
    """Within the block, every op takes its Triton kernel whatever the device (CPU needs the interpreter)."""
    global _forced
    if not HAS_TRITON:
        raise RuntimeError("force_triton() needs triton installed")
    previous, _forced = _forced, True
    try:
        yield
    finally:
        _forced = previous


def use_triton(x: torch.Tensor) -> bool:
    return HAS_TRITON and (x.is_cuda or _forced)


def dot_args(x: torch.Tensor) -> dict[str, object]:
    """Constexpr arguments for `mma`: how a kernel on x's device and dtype multiplies tiles."""
    return dict(UPCAST=not x.is_cuda, PRECISION="ieee" if x.dtype == torch.float32 else "tf32")


@triton.jit
def mma(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b with float32 accumulation. float32 operands use exact (ieee) products, never tf32.

    UPCAST is set off the GPU: Triton's interpreter multiplies bfloat16 tiles as their raw 16-bit
    patterns, so there the operands go through float32, which gives the same exact products.
    """
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out
