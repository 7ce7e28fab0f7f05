"""Joining the tensor-parallel group: torch.distributed's default group over the T ranks, the layers' group of the
same ranks (NCCL on GPUs, gloo on CPUs; a short timeout), a gloo group for the engine's control messages (no
short timeout: its waits are idle time), and the layers' ParallelState."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from scaleinfer.config import disable_nvlink_multicast
from scaleinfer.parallel.expert import ExpertParallelState, join_expert_parallel, set_expert_state
from scaleinfer.parallel.state import ParallelState, set_parallel_state

# The control group's waits are a worker's idle time between steps: a server may idle for days.
CONTROL_TIMEOUT = timedelta(days=30)
# Joining waits for every rank to start (spawn, imports, CUDA); the default group keeps this timeout and is
# used for nothing after. The step collectives run on a group of their own with collective_timeout.
START_TIMEOUT = timedelta(minutes=10)


@dataclass(slots=True, frozen=True)
class RankSpec:
    """How one rank joins: its rank, the group size, the rendezvous and the step collectives' timeout."""

    rank: int
    world_size: int
    init_method: str  # file://... for ranks this process spawned, env:// under torchrun
    backend: str  # nccl | gloo
    collective_timeout: float  # seconds
    pipeline_parallel_size: int = 1  # stages; world_size // this ranks per stage
    expert_parallel_size: int = 1  # MoE expert groups inside each stage's ranks (parallel/expert.py)
    moe_all_to_all: str = "coordinated"  # ParallelConfig.moe_all_to_all

    @property
    def tp_size(self) -> int:
        return self.world_size // self.pipeline_parallel_size


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def join_tensor_parallel(spec: RankSpec, device: torch.device, dtype: torch.dtype) -> ParallelState:
    """Initialize torch.distributed for this rank and set the layers' state; returns it."""
    disable_nvlink_multicast()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(spec.backend, init_method=spec.init_method, world_size=spec.world_size,
                            rank=spec.rank, timeout=START_TIMEOUT)
    if spec.pipeline_parallel_size > 1:
        state = _join_pipeline(spec)
    else:
        ranks = list(range(spec.world_size))
        tp_group = dist.new_group(ranks, timeout=timedelta(seconds=spec.collective_timeout), backend=spec.backend)
        control = dist.new_group(ranks, backend="gloo", timeout=CONTROL_TIMEOUT)
        state = ParallelState(tp_rank=spec.rank, tp_size=spec.world_size, tp_group=tp_group, control_group=control)
    if state.tp_size > 1:
        state.small_all_reduce = _small_all_reduce(spec, device, dtype, state.tp_group)
    set_parallel_state(state)
    set_expert_state(join_expert_parallel(spec.expert_parallel_size, spec.moe_all_to_all == "coordinated",
                                          state.tp_rank, state.tp_size, state.tp_group, spec.world_size,
                                          spec.backend, spec.collective_timeout))
    return state


def _join_pipeline(spec: RankSpec) -> ParallelState:
    """Every rank creates every group, in one order (new_group is collective over the world): per stage its T
    ranks (the layers' group and a gloo one for the step broadcast), per tp_rank its P ranks (hidden states, with
    P x collective_timeout, and gloo for the step messages and sampled tokens), then the world's control group."""
    tp, pp = spec.tp_size, spec.pipeline_parallel_size
    tp_rank, pp_rank = spec.rank % tp, spec.rank // tp
    short = timedelta(seconds=spec.collective_timeout)
    stages = [list(range(p * tp, (p + 1) * tp)) for p in range(pp)]
    columns = [list(range(t, spec.world_size, tp)) for t in range(tp)]
    tp_group = [dist.new_group(r, timeout=short, backend=spec.backend) for r in stages][pp_rank]
    stage_control = [dist.new_group(r, timeout=CONTROL_TIMEOUT, backend="gloo") for r in stages][pp_rank]
    # A stage waits for the hidden states of a step the stages before it compute first (at the fill, all of them).
    pipe = timedelta(seconds=spec.collective_timeout * pp)
    pp_group = [dist.new_group(r, timeout=pipe, backend=spec.backend) for r in columns][tp_rank]
    pp_control = [dist.new_group(r, timeout=CONTROL_TIMEOUT, backend="gloo") for r in columns][tp_rank]
    control = dist.new_group(list(range(spec.world_size)), backend="gloo", timeout=CONTROL_TIMEOUT)
    return ParallelState(tp_rank=tp_rank, tp_size=tp, tp_group=tp_group, control_group=control, pp_rank=pp_rank,
                         pp_size=pp, pp_group=pp_group, pp_control_group=pp_control,
                         stage_control_group=stage_control)


def _small_all_reduce(spec: RankSpec, device: torch.device, dtype: torch.dtype, group: dist.ProcessGroup):
    if spec.backend != "nccl":
        return None
    from scaleinfer.parallel.symm_mem import SmallAllReduce

    return SmallAllReduce.create(device, group, dtype)


def leave_tensor_parallel() -> None:
    """Tear this rank's groups down (at shutdown; collectives in flight on other ranks then fail)."""
    set_parallel_state(ParallelState())
    set_expert_state(ExpertParallelState())
    if dist.is_initialized():
        dist.destroy_process_group()
