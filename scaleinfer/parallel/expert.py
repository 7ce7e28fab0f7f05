"""Expert-parallel groups: where a mixture-of-experts layer's experts live among one stage's T ranks.

The T tensor-parallel ranks of a stage (attention and dense layers sliced T ways) are seen by the MoE layers as
E x S: expert_parallel_size E groups of experts, each expert sliced S = T / E ways (expert slicing, the paper's
MoE tensor parallelism). Stage rank r = ep_rank * S + slice_rank:

    slice group of ep_rank e:  ranks e*S .. e*S + S-1   hold slices 0..S-1 of experts [e*M/E, (e+1)*M/E)
    EP group of slice_rank s:  ranks s, S + s, ...      hold slice s of every expert: the all-to-all's peers

E = 1 is expert slicing alone (every rank every expert, 1/T of each: no all-to-all); E = T is expert
parallelism alone (whole experts, S = 1).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch.distributed as dist

from scaleinfer.config import ArchConfig
from scaleinfer.errors import InvalidRequestError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


@dataclass(slots=True, frozen=True)
class ExpertParallelState:
    ep_rank: int = 0
    ep_size: int = 1
    ep_group: ProcessGroup | None = None  # the E ranks with this slice_rank; None with E = 1
    slice_rank: int = 0
    slice_size: int = 1
    slice_group: ProcessGroup | None = None  # the S ranks slicing this rank's experts; the TP group with E = 1
    coordinated: bool = True  # ParallelConfig.moe_all_to_all == "coordinated"

    @property
    def stage_rank(self) -> int:
        return self.ep_rank * self.slice_size + self.slice_rank

    @property
    def stage_size(self) -> int:
        return self.ep_size * self.slice_size


# A context variable, as parallel/state.py's ParallelState (the runner built under it sets it for its steps).
_STATE: ContextVar[ExpertParallelState | None] = ContextVar("expert_state", default=None)  # None: no experts split
_UNSPLIT = ExpertParallelState()


def get_expert_state() -> ExpertParallelState:
    return _STATE.get() or _UNSPLIT


def set_expert_state(state: ExpertParallelState) -> None:
    _STATE.set(state)


@contextmanager
def using_expert_state(state: ExpertParallelState) -> Iterator[None]:
    token = _STATE.set(state)
    try:
        yield
    finally:
        _STATE.reset(token)


def join_expert_parallel(ep_size: int, coordinated: bool, tp_rank: int, tp_size: int, tp_group: ProcessGroup | None,
                         world_size: int, backend: str, timeout: float) -> ExpertParallelState:
    """Create every stage's EP and slice groups (new_group is collective over the world: every rank creates
    every group, in one order) and return this rank's; tp_group is its stage's T ranks."""
    slice_size = tp_size // ep_size
    ep_rank, slice_rank = divmod(tp_rank, slice_size)
    if ep_size == 1:
        return ExpertParallelState(slice_rank=tp_rank, slice_size=tp_size, slice_group=tp_group,
                                   coordinated=coordinated)
    stage = dist.get_rank() // tp_size
    short = timedelta(seconds=timeout)
    mine_ep = mine_slice = None
    for base in range(0, world_size, tp_size):
        for s in range(slice_size):  # EP groups
            group = dist.new_group([base + e * slice_size + s for e in range(ep_size)], timeout=short, backend=backend)
            mine_ep = group if (base // tp_size, s) == (stage, slice_rank) else mine_ep
        for e in range(ep_size if slice_size > 1 else 0):  # slice groups
            group = dist.new_group([base + e * slice_size + s for s in range(slice_size)], timeout=short,
                                   backend=backend)
            mine_slice = group if (base // tp_size, e) == (stage, ep_rank) else mine_slice
    return ExpertParallelState(ep_rank=ep_rank, ep_size=ep_size, ep_group=mine_ep, slice_rank=slice_rank,
                               slice_size=slice_size, slice_group=mine_slice, coordinated=coordinated)


def check_expert_parallel(arch: ArchConfig, tp_size: int, ep_size: int) -> None:
    """Refuse placements that cannot run, naming the values, before any process starts."""
    experts = arch.num_local_experts
    if not experts:
        _require(ep_size == 1, f"expert_parallel_size={ep_size} needs a mixture-of-experts model; "
                               f"{arch.architecture} has no experts")
        return
    slice_size = tp_size // ep_size
    if experts % ep_size:
        divisors = [e for e in range(1, tp_size + 1) if tp_size % e == 0 and experts % e == 0]
        raise InvalidRequestError(
            f"expert_parallel_size={ep_size} does not divide the model's num_experts={experts}; over "
            f"tensor_parallel_size={tp_size} ranks choose one of {divisors} (each expert sliced over the rest)")
    width = arch.expert_intermediate_size
    _require(width % slice_size == 0,
             f"the experts' intermediate size {width} is not divisible by the expert-slicing size {slice_size} "
             f"(tensor_parallel_size={tp_size} / expert_parallel_size={ep_size})")
    shared = arch.shared_expert_intermediate_size
    _require(shared % tp_size == 0,
             f"tensor_parallel_size={tp_size} does not divide the shared expert's intermediate size {shared}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message)
