"""The engine core's step over a pipeline: up to scheduler.num_micro_batches() micro-batches in flight.

schedule() fills the executor's free slots (schedule, submit, again) and hands back the oldest micro-batch in
flight; execute() takes its result back. The core's step calls the two where it otherwise calls
scheduler.schedule() and executor.execute(): with one stage it is given exactly those (pipelined_steps).
A sequence is in one micro-batch at a time (the scheduler skips those in flight), and every stage runs the
micro-batches in the order they were submitted, so KV written by an earlier one is there for a later one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from scaleinfer.engine.scheduler import Scheduler
from scaleinfer.outputs import RunnerOutput, SchedulerOutput


class MicroBatchQueue:
    def __init__(self, scheduler: Scheduler, executor: Any) -> None:
        """executor: submit(SchedulerOutput) -> handle and collect(handle) -> RunnerOutput, in order."""
        self.scheduler, self.executor = scheduler, executor
        self.in_flight: deque[tuple[SchedulerOutput, Any]] = deque()

    def schedule(self) -> SchedulerOutput:
        while len(self.in_flight) < self.scheduler.num_micro_batches():
            output = self.scheduler.schedule()
            if output.is_empty and not output.finished_request_ids:
                break
            self.in_flight.append((output, self.executor.submit(output)))
        return self.in_flight[0][0] if self.in_flight else SchedulerOutput([])

    def execute(self, output: SchedulerOutput) -> RunnerOutput:
        if not self.in_flight or self.in_flight[0][0] is not output:
            return RunnerOutput(sampled={})  # the empty step schedule() gave when nothing was in flight
        _, handle = self.in_flight.popleft()
        return self.executor.collect(handle)


def pipelined_steps(scheduler: Scheduler, executor: Any) -> tuple[Callable[[], SchedulerOutput],
                                                                  Callable[[SchedulerOutput], RunnerOutput]]:
    """(schedule, execute) for the core's step: the scheduler's and the executor's own with one micro-batch
    slot, else a MicroBatchQueue's."""
    if executor.num_stages == 1:
        return scheduler.schedule, executor.execute
    queue = MicroBatchQueue(scheduler, executor)
    return queue.schedule, queue.execute
