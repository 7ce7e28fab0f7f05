"""The runner in this process: one GPU (or the CPU), or one of several processes streaming one model's layers
together (offload shards), which step in lockstep: a rank without work runs a one-token padding step so that
its layers' all-gathers meet the others'."""

from __future__ import annotations

import dataclasses

from scaleinfer.outputs import RunnerOutput, ScheduledSequence, SchedulerOutput
from scaleinfer.sampling_params import SamplingParams
from scaleinfer.worker.model_runner import ModelRunner
from scaleinfer.worker.step_ahead import LaunchedStep


class UniprocExecutor:
    num_stages = 1  # pipeline stages: one micro-batch in flight, execute() the whole step

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        streamer = runner.streamer
        self.shard = streamer.shard if streamer is not None else None  # None: nobody to keep in step with

    @property
    def steps_ahead(self) -> bool:
        """Whether its runner may compute a decode step ahead (worker/step_ahead.py): alone, not in step with others."""
        return self.shard is None

    @property
    def num_blocks(self) -> int:
        return self.runner.num_blocks

    @property
    def num_host_blocks(self) -> int:
        return self.runner.kv_host.num_blocks

    def execute(self, output: SchedulerOutput) -> RunnerOutput:
        return self.complete(self.launch(output))

    def launch(self, output: SchedulerOutput) -> LaunchedStep:
        """Queue the step on the device; complete() takes its tokens (ModelRunner.launch)."""
        if not output.scheduled and self.shard is not None:
            output = dataclasses.replace(output, scheduled=[self._padding_chunk()])
        return self.runner.launch(output)

    def complete(self, launched: LaunchedStep) -> RunnerOutput:
        return self.runner.complete(launched)

    def any_rank_busy(self, busy: bool) -> bool:
        """Whether this process or any process streaming the weights with it has work: they step together."""
        return self.shard.any(busy, self.runner.device) if self.shard is not None else busy

    def _padding_chunk(self) -> ScheduledSequence:
        """One token at position 0 whose KV goes to the scratch block; nothing is sampled."""
        return ScheduledSequence("padding", [0], 0, [self.runner.num_blocks], False, SamplingParams())

    def shutdown(self) -> None:
        """No process to stop; streamed layers' files and buffers go now rather than at exit."""
        if self.runner.streamer is not None:
            self.runner.streamer.close()
