"""The engine core's busy loop, the same wherever the core runs (its own process, or a thread of the front):
take the commands that arrived, then step while there is work, sending each step's outputs.

Sending a step's outputs runs under the next step's device time: the commands that came meanwhile are taken,
the next step is launched (EngineCore.launch), and only then are the last step's outputs sent and the new
step completed. A request that arrives while a step runs joins the next one, as without the overlap; a
sequence's token reaches the front once the step after it is queued.

The transport is two callables: recv(timeout_s) -> the commands waiting (blocks up to timeout_s for the first;
None: until one comes), and send(message). A refused request comes back as an error EngineCoreOutput in the
next message; a loop that fails sends CoreFailed naming why, then raises.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from scaleinfer.engine.core_types import (
    ERROR_FAILED,
    ERROR_INVALID,
    ERROR_QUEUE_FULL,
    AbortRequests,
    CoreCommand,
    CoreFailed,
    CoreMessage,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    Shutdown,
)
from scaleinfer.engine.scheduler import QueueFullError
from scaleinfer.errors import InvalidRequestError

logger = logging.getLogger(__name__)
IDLE_POLL_S = 1.0  # an idle core wakes this often to check that it is still wanted (is_wanted)


class CoreLoop:
    def __init__(self, core: Any, recv: Callable[[float | None], list[CoreCommand]],
                 send: Callable[[CoreMessage], None], is_wanted: Callable[[], bool] = lambda: True) -> None:
        """core: an EngineCore (add_request, abort, launch, complete, has_unfinished, stats). is_wanted: False once
        the front is gone (its process died), checked at every command batch."""
        self.core, self.recv, self.send, self.is_wanted = core, recv, send, is_wanted
        self.refused: list[EngineCoreOutput] = []  # sent with the next message

    def run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # the core is gone; the front must hear why
            logger.exception("engine core loop failed")
            self.send(CoreFailed(f"engine core failed: {type(exc).__name__}: {exc}"))
            raise
        finally:
            self.core.shutdown()  # worker processes of a tensor-parallel core stop with the loop

    def _serve(self) -> None:
        done: tuple[list[EngineCoreOutput], float] | None = None  # the last step's outputs and its time, unsent
        while self.is_wanted():
            commands = self.recv(0.0 if done is not None or self.core.has_unfinished() else IDLE_POLL_S)
            if not self._apply(commands):
                if done is not None:
                    self._send_outputs(*done)
                return
            start = time.perf_counter()
            launched = self.core.launch() if self.core.has_unfinished() else None
            if done is not None or self.refused:  # while the device runs the step just launched
                self._send_outputs(*(done or ([], None)))
            done = None
            if launched is not None:
                done = self.core.complete(launched), time.perf_counter() - start

    def _send_outputs(self, outputs: list[EngineCoreOutput], step_time_s: float | None) -> None:
        outputs, self.refused = self.refused + outputs, []
        self.send(EngineCoreOutputs(outputs, self.core.stats(), step_time_s))

    def _apply(self, commands: list[CoreCommand]) -> bool:
        """False on Shutdown. A batch that changed the queues is answered with fresh stats if no step follows."""
        for command in commands:
            if isinstance(command, EngineCoreRequest):
                self._add(command)
            elif isinstance(command, AbortRequests):
                self.core.abort(command.request_ids, command.sequences)
            elif isinstance(command, Shutdown):
                return False
        if commands and not self.core.has_unfinished() and not self.refused:
            self._send_outputs([], None)
        return True

    def _add(self, request: EngineCoreRequest) -> None:
        try:
            self.core.add_request(request)
        except Exception as exc:  # this request fails alone; the core carries on
            kind, message = _refusal(exc)
            self.refused.append(EngineCoreOutput(request.request_id, 0, [], error=message, error_kind=kind))


def _refusal(exc: Exception) -> tuple[str, str]:
    if isinstance(exc, InvalidRequestError):
        return ERROR_INVALID, str(exc)
    if isinstance(exc, QueueFullError):
        return ERROR_QUEUE_FULL, str(exc)
    logger.error("adding request failed", exc_info=exc)
    return ERROR_FAILED, f"{type(exc).__name__}: {exc}"
