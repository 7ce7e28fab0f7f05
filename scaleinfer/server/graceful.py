"""uvicorn with the shutdown a server behind a process manager needs.

On SIGTERM or SIGINT the server stops accepting connections at once and gives in-flight requests
`grace_s` seconds to finish. Past that it shuts the engine down, which ends every unfinished request
with EngineDeadError (on a stream an error event then [DONE], otherwise a 503), so their connections
close cleanly; uvicorn's own cancellation is only the backstop. The signal is not re-raised afterwards
(uvicorn's default), so the caller stops the engine thread and the process exits 0. A second SIGINT
forces the exit, as in uvicorn. If the engine dies (a tensor-parallel rank failed, the loop raised), the
server stops the same way and the caller raises the engine's error: the process exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn

from scaleinfer.engine.async_engine import AsyncLLMEngine

logger = logging.getLogger(__name__)
SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# After the engine ended the last requests, their connections need a moment to send [DONE] and close.
_CLOSE_MARGIN_S = 5.0
# A dead engine: /health and every request answer 503 this long before the server stops, so that a load
# balancer polling /health sees the failure, not only a refused connection.
DEAD_LINGER_S = 2.0


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: AsyncLLMEngine, grace_s: float) -> None:
        if grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {grace_s!r}")
        config.timeout_graceful_shutdown = int(grace_s + _CLOSE_MARGIN_S + 0.999)
        super().__init__(config)
        self.engine = engine
        self.grace_s = grace_s
        self.engine_failure: Exception | None = None  # set when a dead engine stopped the server
        self._dead_since: float | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Route SIGINT and SIGTERM to handle_exit while serving; restore the old handlers, raise nothing."""
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in SHUTDOWN_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's tick (every 0.1 s); a dead engine (a failed rank, a device fault, the core process gone) ends
        the server too, DEAD_LINGER_S later, so a process manager sees the exit and restarts it rather than a
        server answering 503 forever."""
        if not self.should_exit and self.engine.dead_error is not None:
            now = time.monotonic()
            if self._dead_since is None:
                self._dead_since = now
                logger.error("the engine died (%s): the server stops in %.0f s", self.engine.dead_error,
                             DEAD_LINGER_S)
            if now - self._dead_since >= DEAD_LINGER_S:
                self.engine_failure = self.engine.dead_error
                self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's shutdown (stop accepting, drain); past grace_s, end the engine's unfinished requests."""
        drain = asyncio.ensure_future(super().shutdown(sockets))
        done, _ = await asyncio.wait({drain}, timeout=self.grace_s)
        if not done:
            stats = self.engine.stats()
            logger.warning("grace period of %.1f s is over: aborting %d running and %d waiting requests",
                           self.grace_s, stats.num_running, stats.num_waiting)
            await asyncio.to_thread(self.engine.shutdown, reason="server is shutting down")
        await drain
