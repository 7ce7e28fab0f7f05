"""The heap built at start-up, kept out of the cyclic garbage collector's walks while the engine runs.

A full (generation 2) collection walks every tracked object. Once torch, transformers and a model are loaded
that is over 400,000 objects: on the 2-core CI machine one such collection in the middle of a batch-256 decode
run paused the engine for 130 ms (bench/host_step.py records the pauses), a step's worth of tokens late for every
stream. gc.freeze() moves what exists to a permanent generation that collections skip; objects made later are
collected as before.

Processes of our own (the engine core's, the server's, the workers') serve inside frozen_heap(): one collection,
then the heap frozen until they stop. In a user's process `LLM.generate` runs inside frozen_heap(collect=False):
what was alive when the call began is frozen for the call only (no collection first: a call should not start
with a full walk), and unfrozen when it returns, so what became garbage meanwhile is reclaimed by the next
collection. Nested and concurrent blocks share one freeze; the last to end unfreezes (so that the process's last
collection sees everything: xgrammar's bindings report objects left alive otherwise).
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0  # frozen_heap blocks running now, in any thread


@contextmanager
def frozen_heap(collect: bool = True) -> Iterator[None]:
    """Freeze every object alive now for the block (after one collection when collect), as vLLM freezes its
    start-up heap."""
    global _depth
    with _lock:
        if _depth == 0:
            if collect:
                gc.collect()
            gc.freeze()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                gc.unfreeze()
