"""What a step's forward takes from the previous pipeline stage and gives to the next: the hidden states (and the
residual), [stage_tensors, num_tokens, hidden_size], point to point on the pipeline group. One process is a
pipeline of one stage, first and last: nothing comes in, nothing goes out. Every stage builds the same step
inputs from the same SchedulerOutput, so the shapes agree without being sent.

The receive and the send happen around the forward, never inside a captured graph: a graph reads its input
from a static buffer the caller fills (worker/cuda_graph.py) and writes its output to one.
"""

from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist
from torch import nn

from scaleinfer.parallel.comm import recv_from_previous_stage, send_to_next_stage
from scaleinfer.parallel.state import get_parallel_state

MAX_PENDING_SENDS = 8  # sends in flight before the oldest is waited for


class StageIO:
    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
        self.stage, self.dtype, self.device = model.stage, dtype, device
        self.is_last = self.stage.is_last
        # What goes between stages (a family that runs in stages says how many tensors: x, and the residual).
        self.num_tensors = model.model.stage_tensors if self.stage.pp_size > 1 else 0
        self.hidden_size = model.arch.hidden_size
        self.sends: deque[tuple[dist.Work, torch.Tensor]] = deque()  # each tensor lives until its send is done

    def input_buffer(self, num_rows: int) -> torch.Tensor | None:
        """A zeroed [stage_tensors, num_rows, hidden_size] for a graph's static input; None on the first stage."""
        if self.stage.is_first:
            return None
        return torch.zeros((self.num_tensors, num_rows, self.hidden_size), dtype=self.dtype, device=self.device)

    def recv(self, num_tokens: int) -> torch.Tensor | None:
        """The previous stage's [stage_tensors, num_tokens, hidden_size] of this step; None on the first stage."""
        if self.stage.is_first:
            return None
        shape = (self.num_tensors, num_tokens, self.hidden_size)
        try:
            return recv_from_previous_stage(torch.empty(shape, dtype=self.dtype, device=self.device))
        except RuntimeError as exc:  # gloo's "Timed out waiting ...": the stage before did not deliver
            if "timed out" not in str(exc).lower():
                raise
            state, before = get_parallel_state(), self.stage.pp_rank - 1
            raise TimeoutError(f"pipeline stage {self.stage.pp_rank} got no hidden states from stage {before} (rank "
                               f"{state.rank - state.tp_size}) within pipeline_parallel_size x collective_timeout: "
                               f"stage {before} hung ({exc})") from exc

    def send(self, out: torch.Tensor) -> None:
        """out ([stage_tensors, num_tokens, hidden_size]) to the next stage, asynchronously. A copy goes: out may
        be a graph's static output, which the next replay rewrites while an NCCL send of it may still run."""
        while self.sends and (self.sends[0][0].is_completed() or len(self.sends) >= MAX_PENDING_SENDS):
            self.sends.popleft()[0].wait()
        x = out.clone(memory_format=torch.contiguous_format)
        self.sends.append((send_to_next_stage(x), x))
