"""The worker processes an executor spawned on this machine: start, watch, stop.

Each worker is a spawned process (CUDA cannot be forked) holding one rank. A supervisor thread waits on every
worker's exit and error pipe: the first failure is recorded with the rank, the pid and why (its exception,
its exit code or signal), the other workers are stopped so that no collective waits on them, and on_failure
is called. A worker whose parent disappears exits by itself (its end of a pipe reaches EOF), so no worker
outlives the engine, even one killed with SIGKILL.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from scaleinfer.executor.rank import RankRunnerSpec
from scaleinfer.executor.worker_main import spawned_worker_main

logger = logging.getLogger(__name__)

STOP_SECONDS = 5.0  # a worker told to stop gets this long before SIGKILL
ALIVE_SECONDS = 1.0


@dataclass(slots=True, frozen=True)
class RankFailure:
    rank: int
    pid: int | None
    reason: str

    def __str__(self) -> str:
        return f"tensor-parallel rank {self.rank} (pid {self.pid}) {self.reason}"


@dataclass(slots=True)
class _Worker:
    rank: int
    process: mp.process.BaseProcess
    errors: Connection  # the engine's end of the worker's error pipe
    keepalive: Connection  # held open while the engine lives


class WorkerGroup:
    def __init__(self, specs: list[RankRunnerSpec], on_failure: Callable[[RankFailure], None]) -> None:
        """specs: ranks 1..T-1 (rank 0 is the engine's process)."""
        context = mp.get_context("spawn")
        self.steps_done = context.Array("q", [-1] * (len(specs) + 1), lock=False)  # -1: still building
        self.on_failure = on_failure
        self.failure: RankFailure | None = None
        self._stopping = False
        self._kill_lock, self._killed = threading.Lock(), False
        self.workers = [self._start(context, spec) for spec in specs]
        self._supervisor = threading.Thread(target=self._supervise, name="scaleinfer-supervisor", daemon=True)
        self._supervisor.start()

    def _start(self, context, spec: RankRunnerSpec) -> _Worker:
        errors_read, errors_write = context.Pipe(duplex=False)
        keepalive_read, keepalive_write = context.Pipe(duplex=False)
        process = context.Process(target=spawned_worker_main, name=f"scaleinfer-rank{spec.rank.rank}",
                                  args=(spec, self.steps_done, errors_write, keepalive_read), daemon=True)
        process.start()
        errors_write.close()
        keepalive_read.close()
        return _Worker(spec.rank.rank, process, errors_read, keepalive_write)

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self.workers]

    def _supervise(self) -> None:
        """Until the group is stopped: the first worker to exit or report an error ends the run."""
        owners = {w.process.sentinel: w for w in self.workers} | {w.errors: w for w in self.workers}
        while not self._stopping:
            try:
                ready = wait(list(owners), timeout=1.0)
            except (OSError, ValueError):  # the handles were closed under us: the group is being stopped
                return
            if ready and not self._stopping:
                self._fail(self._failure_of(owners[ready[0]]))
                return

    def _failure_of(self, worker: _Worker) -> RankFailure:
        """Its exception when it sent one (it exits right after), else how it exited."""
        pid = worker.process.pid
        try:
            if worker.errors.poll(STOP_SECONDS):
                return RankFailure(worker.rank, pid, f"raised {worker.errors.recv()}")
        except (EOFError, OSError):
            pass  # the pipe closed without a message: the process died
        worker.process.join(STOP_SECONDS)
        return RankFailure(worker.rank, pid, _exit_reason(worker.process.exitcode))

    def _fail(self, failure: RankFailure) -> None:
        if self.failure is not None:
            return
        self.failure = failure
        logger.error("%s; stopping the other ranks", failure)
        self.kill()
        self.on_failure(failure)

    def wait_for_failure(self, timeout: float) -> RankFailure | None:
        """The recorded failure, waiting up to timeout for one; None once every worker has stayed alive for
        ALIVE_SECONDS (a worker that raised reports it and exits within that)."""
        start = time.monotonic()
        while self.failure is None and (elapsed := time.monotonic() - start) < timeout:
            if elapsed > ALIVE_SECONDS and all(w.process.is_alive() for w in self.workers):
                return None
            time.sleep(0.05)
        return self.failure

    def lagging_ranks(self, num_steps: int) -> list[int]:
        """The worker ranks that have not finished step num_steps (1-based) or are still building."""
        return [w.rank for w in self.workers if self.steps_done[w.rank] < num_steps]

    def stop(self) -> None:
        """The workers were told to shut down: wait for them, kill what remains."""
        self._stopping = True
        for worker in self.workers:
            worker.process.join(STOP_SECONDS)
        self.kill()

    def kill(self) -> None:
        """SIGKILL every worker still running and reap it; once, whichever thread (supervisor, engine) is first."""
        with self._kill_lock:
            if self._killed:
                return
            self._killed, self._stopping = True, True  # the supervisor reads no exit of ours as a failure
            for worker in self.workers:
                if worker.process.is_alive():
                    worker.process.kill()
            for worker in self.workers:
                worker.process.join(STOP_SECONDS)
                worker.keepalive.close()
                worker.errors.close()


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is None:
        return "did not exit when asked"
    if exitcode < 0:
        return f"was killed by signal {signal.Signals(-exitcode).name}"
    return f"exited with status {exitcode}"
