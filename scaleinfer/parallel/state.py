"""Process-group state that parallel layers read; a model file never sees it.

A single process is tensor-parallel rank 0 of 1. Multi-GPU launch sets this once per process, before
the model is built, so every ColumnParallelLinear / RowParallelLinear picks up its shard.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class ParallelState:
    tp_rank: int = 0
    tp_size: int = 1


_STATE = ParallelState()


def get_parallel_state() -> ParallelState:
    return _STATE


def set_parallel_state(state: ParallelState) -> None:
    global _STATE
    if not 0 <= state.tp_rank < state.tp_size:
        raise ValueError(f"tp_rank must be in [0, tp_size={state.tp_size}), got {state.tp_rank}")
    _STATE = state
