"""Tensor parallelism over T processes: rank 0 is this process (the engine's), ranks 1..T-1 are workers this
executor spawned (WorkerGroup) or that torchrun started. Each step is encoded once (StepEncoder), broadcast to
the workers over the control group, and run by rank 0's runner like theirs; the layers' collectives keep the
ranks together inside the step. Every rank samples the same tokens from the same gathered logits; rank 0's are
the answer.

A failure anywhere (a worker that dies or raises, a collective that times out, rank 0's own exception
mid-step) ends the run: the ranks are out of step and cannot be brought back. The error names the rank and
what happened; every later call raises it again. Should rank 0 stay blocked in a collective that never
returns (NCCL with a dead peer), the process reports the failure and exits with status 1 after GRACE_SECONDS.
"""

from __future__ import annotations

import contextvars
import logging
import os
import shutil
import sys
import threading
import weakref
from dataclasses import dataclass

from scaleinfer.errors import RankFailedError
from scaleinfer.executor.channel import StepChannel
from scaleinfer.executor.rank import RankRunnerSpec, build_rank_runner
from scaleinfer.executor.step_codec import StepEncoder
from scaleinfer.executor.workers import STOP_SECONDS, RankFailure, WorkerGroup
from scaleinfer.outputs import RunnerOutput, SchedulerOutput
from scaleinfer.parallel.groups import leave_tensor_parallel

logger = logging.getLogger(__name__)

GRACE_SECONDS = 15.0  # after a worker failed, how long rank 0 may stay blocked in a collective


@dataclass(slots=True)
class _Run:
    """What shutting the run down needs; kept apart from the executor so a finalizer can hold it."""

    workers: WorkerGroup | None
    rendezvous_dir: str | None
    channel: StepChannel | None = None
    failure: str | None = None
    num_steps: int = 0  # steps every rank has been sent
    in_step: bool = False
    closed: bool = False


class TensorParallelExecutor:
    num_stages = 1  # pipeline stages (executor/pipeline.py has more)

    def __init__(self, spec: RankRunnerSpec, specs: list[RankRunnerSpec] | None, rendezvous_dir: str | None,
                 progress: bool) -> None:
        """spec: rank 0's; specs: ranks 1..T-1 to spawn here (None: torchrun started them)."""
        self._run = _Run(workers=None, rendezvous_dir=rendezvous_dir)
        self._finalizer = weakref.finalize(self, _stop_run, self._run)
        if specs is not None:
            self._run.workers = WorkerGroup(specs, self._on_worker_failure)
        self._run.in_step = True  # building is collective too: a worker failing now must not leave us blocked
        try:  # in a context of its own: rank 0's groups stay the runner's, not this thread's (parallel/state.py)
            self.runner = contextvars.copy_context().run(build_rank_runner, spec, progress)
        except Exception as exc:
            raise self._fail(exc) from exc
        finally:
            self._run.in_step = False
        self._run.channel = StepChannel(self.runner.parallel_state.step_group)
        self._encoder = StepEncoder()

    @property
    def num_blocks(self) -> int:
        return self.runner.num_blocks

    @property
    def num_host_blocks(self) -> int:
        return self.runner.kv_host.num_blocks  # every rank holds as many

    @property
    def worker_pids(self) -> list[int]:
        return self._run.workers.pids if self._run.workers is not None else []

    def execute(self, output: SchedulerOutput) -> RunnerOutput:
        run = self._run
        if run.failure is not None:
            raise RankFailedError(run.failure)
        if output.is_empty and not output.finished_request_ids:
            return RunnerOutput(sampled={})
        run.in_step = True
        try:
            run.channel.send(self._encoder.encode(output))
            result = self.runner.execute(output)
        except Exception as exc:
            raise self._fail(exc) from exc
        finally:
            run.in_step = False
        run.num_steps += 1
        return result

    def any_rank_busy(self, busy: bool) -> bool:
        return busy  # the workers follow rank 0: only its scheduler has requests

    def shutdown(self) -> None:
        self._finalizer()
        if self.runner.streamer is not None:
            self.runner.streamer.close()

    # ---- failures -------------------------------------------------------------------------------------

    def _fail(self, exc: Exception) -> RankFailedError:
        """Name what ended the run, stop every worker and tear rank 0's groups down."""
        run = self._run
        if run.failure is None:
            run.failure = self._diagnose(exc)
        _stop_run(run)
        return RankFailedError(run.failure)

    def _diagnose(self, exc: Exception) -> str:
        workers, step = self._run.workers, self._run.num_steps + 1
        where = f"in step {step}" if self._run.channel is not None else "while starting"
        if workers is not None and workers.wait_for_failure(STOP_SECONDS) is not None:
            return str(workers.failure)
        lagging = workers.lagging_ranks(step) if workers is not None else []
        if "timed out" in str(exc).lower() and lagging:
            return (f"tensor-parallel rank(s) {lagging} did not finish step {step} within collective_timeout: "
                    f"hung (rank 0: {type(exc).__name__}: {exc})")
        return f"tensor-parallel rank 0 (pid {os.getpid()}) failed {where}: {type(exc).__name__}: {exc}"

    def _on_worker_failure(self, failure: RankFailure) -> None:
        """Supervisor thread: the run is over; unblock rank 0 or, failing that, end the process."""
        self._run.failure = self._run.failure or str(failure)
        if self._run.in_step:
            threading.Thread(target=_exit_if_still_blocked, args=(self._run, failure), daemon=True).start()


def _exit_if_still_blocked(run: _Run, failure: RankFailure) -> None:
    threading.Event().wait(GRACE_SECONDS)
    if run.in_step and not run.closed:
        print(f"scaleinfer: {failure}; rank 0 is still blocked in a collective after {GRACE_SECONDS:.0f} s, "
              "exiting", file=sys.stderr, flush=True)
        os._exit(1)


def _stop_run(run: _Run) -> None:
    """Shut the workers down (told, when they can still hear it; killed otherwise) and leave the groups."""
    if run.closed:
        return
    run.closed = True
    if run.failure is None and run.channel is not None and not run.in_step:
        try:
            run.channel.send_shutdown()
        except Exception as exc:  # a worker already gone: stop kills the rest
            logger.warning("could not tell the workers to stop: %s", exc)
    if run.workers is not None:
        run.workers.stop() if run.failure is None else run.workers.kill()
    leave_tensor_parallel()
    if run.rendezvous_dir is not None:
        shutil.rmtree(run.rendezvous_dir, ignore_errors=True)
