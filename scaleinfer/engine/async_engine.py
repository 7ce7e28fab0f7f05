"""AsyncLLMEngine: the asyncio front of the synchronous LLMEngine, shared by every server request.

The LLMEngine is not thread-safe, so one dedicated thread owns it and is the only caller of its methods.
Coroutines hand that thread commands through an inbox (add, abort); the thread runs step() while there is
work and passes each RequestOutput to its request's stream on the stream's event loop with
call_soon_threadsafe. Invariants:
  - a request whose add_request raises fails alone: only its caller sees the exception;
  - a stream closed before its request finished aborts it, which frees its KV blocks after the current step;
  - if the loop itself fails, every stream and every later call gets EngineDeadError, and is_healthy is False.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scaleinfer.errors import EngineDeadError, InvalidRequestError, RequestFailedError
from scaleinfer.outputs import RequestOutput
from scaleinfer.sampling_params import SamplingParams

if TYPE_CHECKING:
    from scaleinfer.config import EngineConfig
    from scaleinfer.engine.llm_engine import EngineStats, LLMEngine

logger = logging.getLogger(__name__)


class RequestStream:
    """The outputs of one request, in order. Iterate it; close() it when done (aborts it if unfinished)."""

    __slots__ = ("request_id", "loop", "finished", "_queue", "_abort", "_closed")

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, abort: Any) -> None:
        self.request_id = request_id
        self.loop = loop
        self.finished = False
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._abort = abort
        self._closed = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def put(self, item: RequestOutput | BaseException) -> None:
        """Called on self.loop only."""
        self._queue.put_nowait(item)

    def close(self) -> bool:
        """Abort the request if it is unfinished; True when this call aborted it."""
        aborted = not self.finished and not self._closed
        if aborted:
            self._abort(self.request_id)
        self._closed = True
        return aborted


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    stream: RequestStream
    added: asyncio.Future[None]  # resolved on stream.loop once the engine accepted or refused the request


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.model_name: str = engine.model_name
        self.max_model_len: int = engine.max_model_len
        self.max_waiting: int | None = engine.config.scheduler.max_waiting  # sequences queued at most
        # The event loop's own copy: HF fast tokenizers are not safe to share across threads.
        self.tokenizer = copy.deepcopy(engine.tokenizer)
        self._engine = engine  # after __init__, touched by the engine thread only
        self._stats = engine.stats()
        self._cond = threading.Condition()
        self._inbox: list[_Add | str] = []  # a str is a request id to abort
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._dead: EngineDeadError | None = None
        self._stopping = False
        self._stop_reason = "engine was shut down"
        self._thread = threading.Thread(target=self._run, name="scaleinfer-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncLLMEngine:
        from scaleinfer.engine.llm_engine import LLMEngine

        return cls(LLMEngine(config))

    # ---- the asyncio side -------------------------------------------------------------------------

    @property
    def is_healthy(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    @property
    def dead_error(self) -> EngineDeadError | None:
        return self._dead

    def stats(self) -> EngineStats:
        """The engine's stats as of its last step (a snapshot the engine thread refreshes)."""
        return self._stats

    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> RequestStream:
        """Admit a request; raises what LLMEngine.add_request raises (InvalidRequestError, QueueFullError)."""
        loop = asyncio.get_running_loop()
        stream = RequestStream(request_id, loop, self.abort)
        added: asyncio.Future[None] = loop.create_future()
        self._submit(_Add(request_id, prompt, params, stream, added))
        try:
            await added
        except asyncio.CancelledError:
            self.abort(request_id)  # it may have been admitted just before the caller went away
            raise
        return stream

    async def generate(self, request_id: str, prompt: str | list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one request; closing or cancelling the iterator aborts the request."""
        stream = await self.add_request(request_id, prompt, params)
        try:
            async for output in stream:
                yield output
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        with self._cond:
            if self._dead is None:
                self._inbox.append(request_id)
                self._cond.notify()

    def shutdown(self, timeout_s: float = 30.0, reason: str = "engine was shut down") -> None:
        """Stop the loop after its current step; unfinished streams get EngineDeadError(reason)."""
        with self._cond:
            if not self._stopping:
                self._stop_reason = reason
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout_s)

    def _submit(self, command: _Add) -> None:
        with self._cond:
            if self._dead is not None:
                raise self._dead
            self._inbox.append(command)
            self._cond.notify()

    # ---- the engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._wait_for_work():
                self._process_inbox()
                if self._engine.has_unfinished_requests():
                    self._dispatch(self._engine.step())
                self._stats = self._engine.stats()
        except BaseException as exc:  # the loop is gone; every waiter must hear why
            logger.exception("engine loop failed")
            error = EngineDeadError(f"engine loop failed: {type(exc).__name__}: {exc}")
            error.__cause__ = exc
            self._die(error)
        else:
            self._die(EngineDeadError(self._stop_reason))
        finally:
            self._engine.shutdown()  # worker processes of a tensor-parallel engine stop with the loop

    def _wait_for_work(self) -> bool:
        with self._cond:
            while not (self._inbox or self._stopping or self._engine.has_unfinished_requests()):
                self._cond.wait()
            return not self._stopping

    def _process_inbox(self) -> None:
        with self._cond:
            commands, self._inbox = self._inbox, []
        for command in commands:
            if isinstance(command, _Add):
                self._add(command)
        self._abort_running([command for command in commands if isinstance(command, str)])

    def _add(self, command: _Add) -> None:
        error: Exception | None = None
        if command.request_id in self._streams:
            error = InvalidRequestError(f"request_id {command.request_id!r} is already running")
        else:
            try:
                self._engine.add_request(command.request_id, command.prompt, command.params)
                self._streams[command.request_id] = command.stream
            except Exception as exc:  # this request fails alone; the engine carries on
                error = exc
        if not _call_soon(command.stream.loop, _resolve, command.added, error) and error is None:
            self._abort_running([command.request_id])

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput]]] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue  # aborted while this step ran
            if output.finished:
                del self._streams[output.request_id]
            by_loop.setdefault(stream.loop, []).append((stream, output))
        for loop, items in by_loop.items():
            if not _call_soon(loop, _deliver, items):
                self._abort_running([s.request_id for s, out in items if not out.finished])

    def _abort_running(self, request_ids: list[str]) -> None:
        """Abort the requests among these still running: closed by their reader, or their loop is gone."""
        request_ids = [rid for rid in request_ids if self._streams.pop(rid, None) is not None]
        if request_ids:
            self._engine.abort_request(request_ids)

    def _die(self, error: EngineDeadError) -> None:
        with self._cond:
            self._dead = error
            pending, self._inbox = self._inbox, []
        for command in pending:
            if isinstance(command, _Add):
                _call_soon(command.stream.loop, _resolve, command.added, error)
        for stream in self._streams.values():
            _call_soon(stream.loop, stream.put, error)
        self._streams.clear()


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> bool:
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:  # the loop is closed
        return False


def _resolve(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _deliver(items: list[tuple[RequestStream, RequestOutput]]) -> None:
    for stream, output in items:
        stream.put(RequestFailedError(output.error) if output.error else output)
