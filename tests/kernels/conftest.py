"""Kernel tests run each Triton kernel against its torch reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors. Triton decides at decoration time,
its own library functions included, so TRITON_INTERPRET must be set before triton is first imported: it is
set here, at import, before the test modules import the kernels.
"""

import os
import sys

import pytest
import torch

CPU_ONLY = not torch.cuda.is_available()
# Something collected earlier imported triton with the interpreter off: the CPU runs cannot work.
IMPORTED_TOO_EARLY = CPU_ONLY and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if CPU_ONLY:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from scaleinfer.kernels.dispatch import HAS_TRITON, force_triton  # noqa: E402  (after TRITON_INTERPRET)


@pytest.fixture
def device() -> torch.device:
    """Where the small comparisons run: the GPU when there is one, else the CPU under the interpreter."""
    return torch.device("cpu" if CPU_ONLY else "cuda")


@pytest.fixture
def triton_path():
    """Route every op through its Triton kernel for the test (skipped without triton)."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed: the kernels cannot run, the torch references serve")
    if IMPORTED_TOO_EARLY:
        pytest.fail("triton was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1, so its "
                    "kernels cannot run on CPU: set TRITON_INTERPRET=1 in the environment or in tests/conftest.py")
    with force_triton():
        yield


@pytest.fixture
def cuda():
    if CPU_ONLY:
        pytest.skip("needs a CUDA GPU")
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    return torch.device("cuda")
