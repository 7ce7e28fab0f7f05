"""Pipeline parallelism over T x P processes: rank 0 (this process, the engine's) is stage 0's tp_rank 0.

submit(step) broadcasts the step to stage 0, hands it on to stage 1 (stage_link.py), runs rank 0's part of
stage 0 (its hidden states go on to stage 1 asynchronously) and returns a handle at once; collect(handle) waits
for that micro-batch's sampled tokens from the last stage. Several micro-batches are in flight at once, each
stage computing a different one; handles are collected in submit order. execute() = collect(submit()).
Failures are TensorParallelExecutor's: a dead or raising rank of any stage ends the run, named, and every later
call raises it. A stage that hangs without dying is named too. A stage waits for the previous one's hidden
states at most P x collective_timeout (at the fill it waits for every stage before it to compute the step), then
raises naming that stage (worker/stage_io.py). Rank 0 waits for a micro-batch's tokens at most (P + 1) x
collective_timeout (once every earlier one is back, this one has at most one step left on each stage; the one
more lets a stage waiting on a hung predecessor say so first), then names the first stage whose ranks did not
finish that step, or, when every rank finished it, the last stage's rank that sends the tokens.
"""

from __future__ import annotations

import msgspec

from scaleinfer.errors import RankFailedError
from scaleinfer.executor.multiproc import TensorParallelExecutor
from scaleinfer.executor.rank import RankRunnerSpec
from scaleinfer.executor.stage_link import FirstStageLink, results_channel
from scaleinfer.executor.workers import WorkerGroup
from scaleinfer.outputs import RunnerOutput, SchedulerOutput


class PipelineParallelExecutor(TensorParallelExecutor):
    def __init__(self, spec: RankRunnerSpec, specs: list[RankRunnerSpec] | None, rendezvous_dir: str | None,
                 progress: bool) -> None:
        super().__init__(spec, specs, rendezvous_dir, progress)
        state = self.runner.parallel_state
        self.num_stages, self._tp_size = state.pp_size, state.tp_size
        self._result_timeout = (state.pp_size + 1) * spec.rank.collective_timeout  # seconds
        self._run.channel = FirstStageLink(state)
        self._results = results_channel(state)
        self._decoder = msgspec.msgpack.Decoder(RunnerOutput)
        self._num_submitted = self._num_collected = 0

    def execute(self, output: SchedulerOutput) -> RunnerOutput:
        return self.collect(self.submit(output))

    def submit(self, output: SchedulerOutput) -> int:
        """Start one micro-batch through the stages; its handle for collect."""
        self._in_step(lambda: (self._run.channel.send(self._encoder.encode(output)), self.runner.execute(output)))
        self._run.num_steps += 1
        self._num_submitted += 1
        return self._num_submitted - 1

    def collect(self, handle: int) -> RunnerOutput:
        """The sampled tokens of the micro-batch `handle`, the oldest not collected."""
        if handle != self._num_collected:
            raise ValueError(f"micro-batch {handle} collected out of order (next is {self._num_collected})")
        payload = self._in_step(lambda: self._results.recv(self._result_timeout))
        self._num_collected += 1
        return self._decoder.decode(payload)

    def _stage_hang_report(self, exc: TimeoutError, workers: WorkerGroup) -> str:
        """The first stage with ranks that did not finish the step (the stages after it wait on it); when every
        rank finished it, the last stage's rank that sends the tokens."""
        step = self._num_collected + 1
        lagging = workers.lagging_ranks(step) or [self._results.peer]
        stage = min(lagging) // self._tp_size  # rank = tp_rank + T * pp_rank
        ranks = [r for r in lagging if r // self._tp_size == stage]
        return (f"pipeline stage {stage}, rank(s) {ranks}, did not finish step {step} within (pipeline_parallel_size "
                f"+ 1) x collective_timeout = {self._result_timeout:g} s: hung (rank 0: {exc})")

    def _in_step(self, work):
        run = self._run
        if run.failure is not None:
            raise RankFailedError(run.failure)
        run.in_step = True
        try:
            return work()
        except Exception as exc:
            if isinstance(exc, TimeoutError) and run.workers is not None:
                # Rank 0's wait for tokens ran out: the hang is the cause, whatever fails after (gloo closes the
                # timed-out group's connections, and ranks waiting on them raise).
                run.failure = self._stage_hang_report(exc, run.workers)
            raise self._fail(exc) from exc
        finally:
            run.in_step = False

    def shutdown(self) -> None:
        """Take back the micro-batches still in flight (the last stage is sending them), then stop."""
        while self._run.failure is None and not self._run.closed and self._num_collected < self._num_submitted:
            self.collect(self._num_collected)
        super().shutdown()
