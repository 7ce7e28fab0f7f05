"""Building layers as a tensor-parallel rank would, in one process: the layers read the parallel state while
they are built, and the state goes back to one process afterwards, whatever the block raised."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from scaleinfer.parallel.state import ParallelState, set_parallel_state


@contextmanager
def as_tp_rank(rank: int, size: int = 2) -> Iterator[None]:
    set_parallel_state(ParallelState(tp_rank=rank, tp_size=size))
    try:
        yield
    finally:
        set_parallel_state(ParallelState())
