"""The heap built at start-up, kept out of the cyclic garbage collector's walks while a process serves.

A full (generation 2) collection walks every tracked object. Once torch, transformers and a model are loaded
that is over 400,000 objects: on the 2-core CI machine one such collection in the middle of a batch-256 decode
run paused the engine for 130 ms (bench/host_step.py records the pauses), a step's worth of tokens late for every
stream. gc.freeze() moves what exists to a permanent generation that collections skip; objects made later are
collected as before. Only in processes of our own (the engine core's, the server's, the workers'): in a user's
process, frozen objects that become garbage would never be reclaimed. Unfrozen when the block ends, so that
the process's last collection sees everything (xgrammar's bindings report objects left alive otherwise).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Collect once, then freeze every object alive now for the block (vLLM freezes its start-up heap too)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
