"""How a step's hidden states are computed: built inputs through the model (EagerForward), or, on a GPU,
decode steps replayed from CUDA graphs with the same sequences' next step prepared on the device while the
current one runs (GraphedForward, which owns DecodeGraphs and NextDecode). The runner calls run, then,
after sampling, sampled_on_device and sampled_on_host, the same way whichever it has."""

from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist
from torch import nn

from scaleinfer.outputs import ScheduledSequence, SchedulerOutput
from scaleinfer.parallel.comm import recv_from_previous_stage, send_to_next_stage
from scaleinfer.worker.cuda_graph import DecodeGraphs
from scaleinfer.worker.next_step import NextDecode
from scaleinfer.worker.staging import StagingBuffer
from scaleinfer.worker.step_inputs import StepInputs, build_step_inputs


class EagerForward:
    def __init__(self, model: nn.Module, block_size: int, device: torch.device, staging: StagingBuffer) -> None:
        self.model, self.block_size, self.device, self.staging = model, block_size, device, staging
        # [num_tokens, hidden] of the last step built from its inputs, every row (prompt logprobs read them).
        self.hidden: torch.Tensor | None = None

    def run(self, output: SchedulerOutput) -> tuple[torch.Tensor, list[ScheduledSequence]]:
        """(the sampled rows' hidden states [num_sampled, hidden], the sampled sequences in row order)."""
        inputs = build_step_inputs(output, self.block_size, self.device, self.staging)
        self.hidden = self.forward_inputs(inputs)
        return inputs.sampled_hidden(self.hidden), inputs.sampled

    def forward_inputs(self, inputs: StepInputs) -> torch.Tensor:
        return self.model(inputs.input_ids, inputs.positions, inputs.attn)

    def sampled_on_device(self, sampled: list[ScheduledSequence], token_ids: torch.Tensor) -> None:
        """The step's tokens, still on the device."""

    def sampled_on_host(self, token_ids: list[int]) -> None:
        """The same tokens, once copied to the host."""

    def skip(self) -> None:
        """A step with nothing to compute ran in between."""


class GraphedForward(EagerForward):
    def __init__(self, model: nn.Module, block_size: int, device: torch.device, staging: StagingBuffer,
                 graphs: DecodeGraphs) -> None:
        super().__init__(model, block_size, device, staging)
        self.graphs = graphs
        self.next_decode: NextDecode | None = None  # the step the graph's rows are prepared for
        self._ran_graph = False  # whether the last built step ran a graph
        self._advanceable = False  # whether this step's rows can be advanced to the next one

    def run(self, output: SchedulerOutput) -> tuple[torch.Tensor, list[ScheduledSequence]]:
        prepared, self.next_decode = self.next_decode, None
        scheduled = output.scheduled
        if prepared is not None and prepared.matches(scheduled):
            hidden = self.graphs.replay(len(scheduled), max(s.start_pos for s in scheduled) + 1)
            if hidden is not None:
                self._advanceable = True
                return hidden, scheduled
        hidden, sampled = super().run(output)
        # Only a graph step whose every row samples can be advanced row for row (a one-token prompt chunk
        # mid-prompt is a graph row that does not).
        self._advanceable = self._ran_graph and len(sampled) == len(scheduled)
        return hidden, sampled

    def forward_inputs(self, inputs: StepInputs) -> torch.Tensor:
        self._ran_graph = self.graphs.can_run(inputs)
        return self.graphs.run(inputs) if self._ran_graph else super().forward_inputs(inputs)

    def sampled_on_device(self, sampled: list[ScheduledSequence], token_ids: torch.Tensor) -> None:
        """Set the graph's rows up for the same sequences' next token while this step runs."""
        if self._advanceable:
            self.next_decode = NextDecode.after(sampled, self.block_size)
            if self.next_decode is not None:
                self.graphs.advance(len(sampled), token_ids)

    def sampled_on_host(self, token_ids: list[int]) -> None:
        if self.next_decode is not None:
            self.next_decode.token_ids = token_ids

    def skip(self) -> None:
        self.next_decode = None


class StageForward(EagerForward):
    """A pipeline stage's step: the previous stage's hidden states in (the first embeds the tokens), this stage's
    layers, and out to the next stage asynchronously; only the last stage's rows are sampled. Every stage builds
    the same step inputs from the same SchedulerOutput, so the shapes agree without being sent."""

    MAX_PENDING_SENDS = 8  # sends in flight before the oldest is waited for

    def __init__(self, model: nn.Module, block_size: int, device: torch.device, staging: StagingBuffer,
                 dtype: torch.dtype) -> None:
        super().__init__(model, block_size, device, staging)
        self.stage, self.dtype = model.stage, dtype
        self.shape = (model.model.stage_tensors, model.arch.hidden_size)
        self.sends: deque[tuple[dist.Work, torch.Tensor]] = deque()  # each tensor lives until its send is done

    def run(self, output: SchedulerOutput) -> tuple[torch.Tensor, list[ScheduledSequence]]:
        inputs = build_step_inputs(output, self.block_size, self.device, self.staging)
        hidden = None
        if not self.stage.is_first:  # [stage_tensors, num_tokens, hidden_size]
            shape = (self.shape[0], inputs.input_ids.shape[0], self.shape[1])
            hidden = recv_from_previous_stage(torch.empty(shape, dtype=self.dtype, device=self.device))
        out = self.model(inputs.input_ids, inputs.positions, inputs.attn, hidden)
        if self.stage.is_last:
            self.hidden = out
            return inputs.sampled_hidden(out), inputs.sampled
        self._send(out.contiguous())
        return out[0, :0], []

    def _send(self, x: torch.Tensor) -> None:
        while self.sends and (self.sends[0][0].is_completed() or len(self.sends) >= self.MAX_PENDING_SENDS):
            self.sends.popleft()[0].wait()
        self.sends.append((send_to_next_stage(x), x))
