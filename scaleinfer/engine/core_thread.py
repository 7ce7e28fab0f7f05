"""An engine core driven by a thread of the front's process: CoreProcess's interface over a core built here
(AsyncLLMEngine(LLMEngine), e.g. for an engine already loaded). The same CoreLoop runs it; commands pass
through a queue and messages reach on_message on the core's thread, with no encoding.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any

from scaleinfer.engine.core_loop import CoreLoop
from scaleinfer.engine.core_types import CoreCommand, CoreMessage, CoreReady, Shutdown

THREAD_NAME = "scaleinfer-engine"


class CoreThread:
    def __init__(self, core: Any, on_message: Callable[[CoreMessage], None]) -> None:
        self.core = core
        self.on_message = on_message
        self._inbox: queue.SimpleQueue[CoreCommand] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)

    def wait_ready(self) -> CoreReady:
        ready = self.core.ready()  # before the thread owns the core
        self._thread.start()
        return ready

    def _run(self) -> None:
        with contextlib.suppress(Exception):  # the loop logged it and told on_message (CoreFailed)
            CoreLoop(self.core, self._recv, self.on_message).run()

    def _recv(self, timeout_s: float | None) -> list[CoreCommand]:
        try:
            commands = [self._inbox.get(timeout=timeout_s) if timeout_s else self._inbox.get_nowait()]
        except queue.Empty:
            return []
        while not self._inbox.empty():
            commands.append(self._inbox.get_nowait())
        return commands

    def send(self, command: CoreCommand) -> None:
        self._inbox.put(command)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self, timeout_s: float = 30.0) -> None:
        if self._thread.is_alive():
            self.send(Shutdown())
            self._thread.join(timeout_s)
