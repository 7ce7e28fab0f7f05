"""How a step's hidden states are computed: built inputs through the model (EagerForward), or, on a GPU,
decode steps replayed from CUDA graphs with the same sequences' next step prepared on the device while the
current one runs (GraphedForward, which owns DecodeGraphs and NextDecode). The runner calls run, then,
after sampling, sampled_on_device and sampled_on_host, the same way whichever it has.

Either runs one pipeline stage's part of the step (one process is a stage that is first and last): the previous
stage's hidden states in (the first embeds the tokens), this stage's layers, and out to the next stage
(StageIO, around the forward and outside any graph); only the last stage's rows are sampled."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from scaleinfer.kernels.checks import trusted_inputs
from scaleinfer.outputs import ScheduledSequence, SchedulerOutput
from scaleinfer.worker.cuda_graph import DecodeGraphs
from scaleinfer.worker.next_step import NextDecode
from scaleinfer.worker.stage_io import StageIO
from scaleinfer.worker.staging import StagingBuffer
from scaleinfer.worker.step_inputs import StepInputs, build_step_inputs


class EagerForward:
    def __init__(self, model: nn.Module, block_size: int, device: torch.device, staging: StagingBuffer,
                 io: StageIO) -> None:
        self.model, self.block_size, self.device, self.staging, self.io = model, block_size, device, staging, io
        # [num_tokens, hidden] of the last step built from its inputs, every row (prompt logprobs read them).
        self.hidden: torch.Tensor | None = None
        # (has decodes, has prompt chunks) of the steps whose kernel launches checked their arguments once
        self.checked_kinds: set[tuple[bool, bool]] = set()

    def run(self, output: SchedulerOutput) -> tuple[torch.Tensor, list[ScheduledSequence]]:
        """(the sampled rows' hidden states [num_sampled, hidden], the sampled sequences in row order); on a stage
        before the last, (an empty [0, hidden], []): its output went to the next stage."""
        inputs = build_step_inputs(output, self.block_size, self.device, self.staging)
        out = self.forward_inputs(inputs, self.io.recv(inputs.input_ids.shape[0]))
        if not self.io.is_last:  # out: [stage_tensors, num_tokens, hidden]
            self.io.send(out)
            return out[0, :0], []
        self.hidden = out
        return inputs.sampled_hidden(out), inputs.sampled

    def forward_inputs(self, inputs: StepInputs, hidden: torch.Tensor | None) -> torch.Tensor:
        """hidden: the previous stage's [stage_tensors, num_tokens, hidden_size] (None on the first stage). The first
        step of each kind runs the launchers' argument checks; later ones skip them (kernels/checks.py)."""
        kind = (inputs.attn.num_decodes > 0, inputs.attn.prefill is not None)
        with trusted_inputs() if kind in self.checked_kinds else nullcontext():
            out = self.model(inputs.input_ids, inputs.positions, inputs.attn, hidden)
        self.checked_kinds.add(kind)
        return out

    def sampled_on_device(self, sampled: list[ScheduledSequence], token_ids: torch.Tensor) -> None:
        """The step's tokens, still on the device."""

    def sampled_on_host(self, token_ids: list[int]) -> None:
        """The same tokens, once copied to the host."""

    def skip(self) -> None:
        """A step with nothing to compute ran in between."""

    def replay_ahead(self) -> tuple[NextDecode, torch.Tensor] | None:
        """The prepared next step's (rows, hidden states [n, hidden]), computed now; None: none is prepared."""
        return None

    def adopt(self, prepared: NextDecode, scheduled: list[ScheduledSequence]) -> bool:
        """Whether `scheduled` is the step computed ahead over `prepared` (then it is this step's run)."""
        return False


class GraphedForward(EagerForward):
    def __init__(self, model: nn.Module, block_size: int, device: torch.device, staging: StagingBuffer,
                 io: StageIO, graphs: DecodeGraphs) -> None:
        super().__init__(model, block_size, device, staging, io)
        self.graphs = graphs
        self.next_decode: NextDecode | None = None  # the step the graph's rows are prepared for
        self._ran_graph = False  # whether the last built step ran a graph
        self._advanceable = False  # whether this step's rows can be advanced to the next one

    def run(self, output: SchedulerOutput) -> tuple[torch.Tensor, list[ScheduledSequence]]:
        prepared, self.next_decode = self.next_decode, None
        scheduled = output.scheduled
        if prepared is not None and prepared.matches(scheduled):
            key = self.graphs.key(len(scheduled), max(s.start_pos for s in scheduled) + 1)
            if key is not None:  # (only a stage that samples, the last, prepares: nothing goes on from here)
                self._advanceable = True
                return self.graphs.replay(key, len(scheduled), self.io.recv(len(scheduled))), scheduled
        hidden, sampled = super().run(output)
        # Only a graph step whose every row samples can be advanced row for row (a one-token prompt chunk
        # mid-prompt is a graph row that does not).
        self._advanceable = self._ran_graph and len(sampled) == len(scheduled)
        return hidden, sampled

    def forward_inputs(self, inputs: StepInputs, hidden: torch.Tensor | None) -> torch.Tensor:
        self._ran_graph = self.graphs.can_run(inputs)
        return self.graphs.run(inputs, hidden) if self._ran_graph else super().forward_inputs(inputs, hidden)

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

    def replay_ahead(self) -> tuple[NextDecode, torch.Tensor] | None:
        prepared = self.next_decode
        if prepared is None or self.io.stage.pp_size > 1:  # one stage: no hidden states come in or go out
            return None
        key = self.graphs.key(len(prepared.request_ids), max(prepared.start_pos) + 1)
        return None if key is None else (prepared, self.graphs.replay(key, len(prepared.request_ids)))

    def adopt(self, prepared: NextDecode, scheduled: list[ScheduledSequence]) -> bool:
        if self.next_decode is not prepared or not prepared.matches(scheduled):
            return False
        self.next_decode, self._advanceable = None, True  # its rows advance to the step after, as a replay's do
        return True
