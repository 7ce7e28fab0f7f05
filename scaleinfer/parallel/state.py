"""Process-group state that parallel layers read; a model file never sees it.

A single process is tensor-parallel rank 0 of 1. A rank's state is set before its model is built, so every
ColumnParallelLinear / RowParallelLinear picks up its shard, and around each of its steps, so every collective
finds its group: the runner that was built under it owns it (worker/model_runner.py) and sets it for its
forward. It lives in a context variable, not in the process: an engine built beside a live rank 0 (on the
same thread or another) sees one process's state, and its steps do not change rank 0's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
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
    # Pipeline stages (parallel/pipeline.py): the T ranks above are one stage's; world rank = tp_rank + T * pp_rank.
    pp_rank: int = 0
    pp_size: int = 1
    pp_group: ProcessGroup | None = None  # this tp_rank's rank in every stage: hidden states (NCCL on GPUs)
    pp_control_group: ProcessGroup | None = None  # the same ranks over gloo, no short timeout: step messages
    stage_control_group: ProcessGroup | None = None  # gloo over this stage's T ranks: the step broadcast

    @property
    def rank(self) -> int:
        return self.tp_rank + self.tp_size * self.pp_rank

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def step_group(self) -> ProcessGroup | None:
        """Where rank 0's step broadcast goes: the whole world with one stage, the first stage's ranks else."""
        return self.stage_control_group if self.pp_size > 1 else self.control_group


_STATE: ContextVar[ParallelState | None] = ContextVar("parallel_state", default=None)  # None: one process
_ONE_PROCESS = ParallelState()


def get_parallel_state() -> ParallelState:
    return _STATE.get() or _ONE_PROCESS


def set_parallel_state(state: ParallelState) -> None:
    """The state from now on, in this context (a worker process's main thread: the whole process)."""
    _check(state)
    _STATE.set(state)


@contextmanager
def using_parallel_state(state: ParallelState) -> Iterator[None]:
    """state inside the block; whatever was before after it."""
    _check(state)
    token = _STATE.set(state)
    try:
        yield
    finally:
        _STATE.reset(token)


def _check(state: ParallelState) -> None:
    if not 0 <= state.tp_rank < state.tp_size:
        raise ValueError(f"tp_rank must be in [0, tp_size={state.tp_size}), got {state.tp_rank}")
    if not 0 <= state.pp_rank < state.pp_size:
        raise ValueError(f"pp_rank must be in [0, pp_size={state.pp_size}), got {state.pp_rank}")
