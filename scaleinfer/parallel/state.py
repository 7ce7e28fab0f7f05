"""Process-group state that parallel layers read; a model file never sees it.

A single process is tensor-parallel rank 0 of 1. A tensor-parallel rank sets this once, before the model is
built, so every ColumnParallelLinear / RowParallelLinear picks up its shard and every collective its group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


@dataclass(slots=True)
class ParallelState:
    tp_rank: int = 0
    tp_size: int = 1
    tp_group: ProcessGroup | None = None  # the layers' all-reduces and gathers; None: one process
    # CPU (gloo) group of the same ranks for the engine's per-step broadcast and start-up agreement: its waits
    # are the idle time between steps, so it has no short timeout.
    control_group: ProcessGroup | None = None
    small_all_reduce: Any = None  # parallel.symm_mem.SmallAllReduce on GPUs where it serves, else None


_STATE = ParallelState()


def get_parallel_state() -> ParallelState:
    return _STATE


def set_parallel_state(state: ParallelState) -> None:
    global _STATE
    if not 0 <= state.tp_rank < state.tp_size:
        raise ValueError(f"tp_rank must be in [0, tp_size={state.tp_size}), got {state.tp_rank}")
    _STATE = state
