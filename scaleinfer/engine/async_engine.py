"""AsyncLLMEngine: the asyncio front the server shares; the engine core runs apart from it.

from_config starts the core in a process of its own (engine/core_proc.py); AsyncLLMEngine(llm_engine) drives
an engine already loaded here from a thread (engine/core_thread.py). Either way the front owns the
tokenizer, the OutputProcessor (text, stop strings, logprobs, RequestOutputs) and admission; the core owns
scheduling and the model. Outputs arrive on the core's side (the reader thread, or the core's thread), are
processed there under a lock, and reach each stream on its event loop with call_soon_threadsafe. Invariants:
  - admission is decided here at once (the front counts the sequences that have produced nothing yet):
    past max_waiting a QueueFullError (503), a request that could never be served an InvalidRequestError;
  - a stream holds one output at most: the latest (CUMULATIVE, FINAL_ONLY), or the DELTA outputs not read yet
    concatenated into one; a slow reader costs one output, not one per step;
  - a request that fails alone (in the core, or in output processing) fails only its stream;
  - a core that dies (its loop raised, a device fault, its process exited) fails every stream and every later
    call with EngineDeadError, and is_healthy turns False.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from scaleinfer.engine.core import check_prompt_token_ids
from scaleinfer.engine.core_types import (
    ERROR_INVALID,
    ERROR_QUEUE_FULL,
    AbortRequests,
    CoreFailed,
    CoreMessage,
    CoreReady,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineStats,
)
from scaleinfer.engine.llm_engine import tokenize_prompt
from scaleinfer.engine.output_processor import OutputProcessor
from scaleinfer.engine.scheduler import QueueFullError, check_fits
from scaleinfer.errors import EngineDeadError, InvalidRequestError, RequestFailedError
from scaleinfer.outputs import RequestOutput
from scaleinfer.sampling_params import RequestOutputKind, SamplingParams

if TYPE_CHECKING:
    from scaleinfer.config import EngineConfig
    from scaleinfer.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)
# Without --max-waiting: enough queued sequences to fill the KV cache again with 16-token sequences, and at
# least 4 batches' worth; past that a client is better told to retry than left waiting.
MIN_TOKENS_PER_WAITING_SEQUENCE = 16


def default_max_waiting(ready: CoreReady, max_num_seqs: int) -> int:
    return max(4 * max_num_seqs, ready.num_blocks * ready.block_size // MIN_TOKENS_PER_WAITING_SEQUENCE)


class RequestStream:
    """The outputs of one request: iterate it for its outputs as they come (those that came while the reader was
    away coalesce: into the newest, or with aggregate (DELTA outputs) into their concatenation); close() it
    when done (aborts it if unfinished)."""

    __slots__ = ("request_id", "loop", "finished", "_aggregate", "_latest", "_error", "_ready", "_abort", "_closed")

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, abort: Any, aggregate: bool = False) -> None:
        self.request_id = request_id
        self.loop = loop
        self.finished = False
        self._aggregate = aggregate
        self._latest: RequestOutput | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()
        self._abort = abort
        self._closed = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        await self._ready.wait()
        self._ready.clear()
        if self._latest is None:  # only an error ends a stream without an output
            self.finished = True
            raise self._error
        output, self._latest = self._latest, None
        self.finished = output.finished
        return output

    def put(self, item: RequestOutput | BaseException) -> None:
        """Called on self.loop only. An error replaces nothing: the outputs before it are read first."""
        if isinstance(item, BaseException):
            self._error = self._error or item
            if self._latest is not None and not self._latest.finished:
                self._latest = None  # unfinished progress is moot once the request failed
        elif self._error is None:
            if self._aggregate and self._latest is not None:
                self._latest.add(item)
            else:
                self._latest = item
        self._ready.set()

    def close(self) -> bool:
        """Abort the request if it is unfinished; True when this call aborted it."""
        aborted = not self.finished and not self._closed
        if aborted:
            self._abort(self.request_id)
        self._closed = True
        return aborted


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine | None = None, *, model_name: str | None = None, tokenizer: Any = None,
                 max_num_seqs: int = 256, max_waiting: int | None = None, client: Any = None) -> None:
        """AsyncLLMEngine(llm_engine): its core runs on a thread here. from_config passes client (a CoreProcess
        being started) and the rest instead."""
        from scaleinfer.engine.core_thread import CoreThread

        if engine is not None:
            model_name, tokenizer = engine.model_name, copy.deepcopy(engine.tokenizer)  # HF tokenizers: per thread
            max_num_seqs, max_waiting = engine.config.scheduler.max_num_seqs, engine.config.scheduler.max_waiting
            client = CoreThread(engine.core, self._on_message)
        self.model_name: str = model_name
        self.tokenizer = tokenizer
        # Sees every EngineCoreOutputs on the core's side (the server's metrics: step and queue times).
        self.metrics_sink: Callable[[EngineCoreOutputs], None] | None = None
        # On a stream's event loop, once a step's outputs are in its streams: seconds since they reached the front.
        self.delivery_sink: Callable[[float], None] | None = None
        self._lock = threading.Lock()  # the processor, the streams and _dead, from coroutines and the core side
        self._processor = OutputProcessor(tokenizer)
        self._streams: dict[str, RequestStream] = {}
        self._stats = EngineStats()
        self._dead: EngineDeadError | None = None
        self._stop_reason: str | None = None
        self._client = client
        client.on_message = self._on_message
        self._ready = client.wait_ready()
        self.max_model_len: int = self._ready.max_model_len
        self.max_waiting: int = max_waiting or default_max_waiting(self._ready, max_num_seqs)

    @classmethod
    def from_config(cls, config: EngineConfig, core_class: type | None = None) -> AsyncLLMEngine:
        """The core in a process of its own (core_class: EngineCore or a subclass, importable by the child). Under
        torchrun the core stays in this process, on a thread: rank 0 hosts it beside the other ranks' workers."""
        from scaleinfer.config import torchrun_env
        from scaleinfer.engine.core_proc import CoreProcess
        from scaleinfer.engine.llm_engine import LLMEngine

        if torchrun_env() is not None:
            return cls(LLMEngine(config, progress=False))
        from scaleinfer.tokenizer import tokenizer_for
        from scaleinfer.weights.source import resolve_model

        source = resolve_model(config.model.model, config.model.load_format)
        tokenizer = None if config.model.skip_tokenizer_init else tokenizer_for(source, config.model)
        eos = None if tokenizer is None else tokenizer.eos_token_id
        client = CoreProcess(config, lambda message: None, eos, core_class)
        try:
            return cls(model_name=config.model.model, tokenizer=tokenizer, client=client,
                       max_num_seqs=config.scheduler.max_num_seqs, max_waiting=config.scheduler.max_waiting)
        except BaseException:
            client.shutdown()
            raise

    # ---- the asyncio side -------------------------------------------------------------------------

    @property
    def is_healthy(self) -> bool:
        return self._dead is None and self._client.is_alive()

    @property
    def dead_error(self) -> EngineDeadError | None:
        return self._dead

    def stats(self) -> EngineStats:
        """The core's stats as of its last message."""
        return self._stats

    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> RequestStream:
        """Admit a request at once: raises InvalidRequestError (never servable), QueueFullError (retry later),
        EngineDeadError; a refusal the core makes itself comes as the stream's first item."""
        prompt_text, prompt_token_ids = tokenize_prompt(self.tokenizer, prompt)
        self._check(prompt_token_ids, params)
        aggregate = params.output_kind is RequestOutputKind.DELTA
        stream = RequestStream(request_id, asyncio.get_running_loop(), self.abort, aggregate)
        arrival_time = time.time()
        with self._lock:
            self._admit(request_id, params)
            self._processor.add_request(request_id, prompt_text, prompt_token_ids, params, arrival_time)
            self._streams[request_id] = stream
        try:
            self._client.send(EngineCoreRequest(request_id, prompt_token_ids, params, arrival_time))
        except EngineDeadError:
            self.abort(request_id)
            raise
        return stream

    def _check(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """What the core would refuse, refused here without a round trip (the core checks again)."""
        ready = self._ready
        params.check_token_ids(ready.vocab_size)
        check_prompt_token_ids(prompt_token_ids, ready.vocab_size)
        check_fits(len(prompt_token_ids), params.max_tokens, ready.max_model_len, ready.block_size, ready.num_blocks)
        if params.n > self.max_waiting:
            raise InvalidRequestError(f"n={params.n} sequences could never be queued at once "
                                      f"(max_waiting={self.max_waiting})")

    def _admit(self, request_id: str, params: SamplingParams) -> None:
        """Under the lock."""
        if self._dead is not None:
            raise self._dead
        if request_id in self._streams:
            raise InvalidRequestError(f"request_id {request_id!r} is already running")
        num_queued = self._processor.num_unstarted
        if num_queued + params.n > self.max_waiting:
            raise QueueFullError(f"waiting queue is full: {num_queued} sequences wait, max_waiting={self.max_waiting}")

    async def generate(self, request_id: str, prompt: str | list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """The outputs of one request, as params.output_kind asks; closing or cancelling the iterator aborts it."""
        stream = await self.add_request(request_id, prompt, params)
        try:
            async for output in stream:
                yield output
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        with self._lock:
            known = self._streams.pop(request_id, None) is not None
            self._processor.abort([request_id])
        if known and self._dead is None:
            with contextlib.suppress(EngineDeadError):  # a dead core holds nothing to free
                self._client.send(AbortRequests([request_id]))

    def shutdown(self, timeout_s: float = 30.0, reason: str = "engine was shut down") -> None:
        """Stop the core after its current step; unfinished streams get EngineDeadError(reason)."""
        self._stop_reason = self._stop_reason or reason
        self._client.shutdown(timeout_s)
        self._die(EngineDeadError(self._stop_reason))

    # ---- the core's side ----------------------------------------------------------------------------

    def _on_message(self, message: CoreMessage) -> None:
        if isinstance(message, EngineCoreOutputs):
            self._on_outputs(message)
        elif isinstance(message, CoreFailed) and self._stop_reason is None:
            self._die(EngineDeadError(message.message))

    def _on_outputs(self, message: EngineCoreOutputs) -> None:
        received = time.perf_counter()
        self._stats = message.stats
        if self.metrics_sink is not None:
            self.metrics_sink(message)
        with self._lock:
            processed = self._processor.process(message.outputs)
            items = [(stream, _item(output, processed.error_kinds)) for output in processed.request_outputs
                     if (stream := self._pop_if_finished(output)) is not None]
        if processed.to_abort or processed.to_stop:
            with contextlib.suppress(EngineDeadError):
                self._client.send(AbortRequests(processed.to_abort, processed.to_stop))
        self._deliver(items, received)

    def _pop_if_finished(self, output: RequestOutput) -> RequestStream | None:
        stream = self._streams.get(output.request_id)
        if stream is not None and output.finished:
            del self._streams[output.request_id]
        return stream

    def _deliver(self, items: list[tuple[RequestStream, RequestOutput | BaseException]], received: float) -> None:
        """One callback per event loop puts a step's outputs in all its streams (in step order: a later step's
        callback is queued after this one)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Any]]] = {}
        for stream, item in items:
            by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, batch in by_loop.items():
            if not _call_soon(loop, self._put_all, batch, received):  # the loop is closed: nobody reads these
                for stream, _ in batch:
                    self.abort(stream.request_id)

    def _put_all(self, batch: list[tuple[RequestStream, RequestOutput | BaseException]], received: float) -> None:
        for stream, item in batch:
            stream.put(item)
        if self.delivery_sink is not None:
            self.delivery_sink(time.perf_counter() - received)

    def _die(self, error: EngineDeadError) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = error
                if self._stop_reason is None:
                    logger.error("engine core is dead: %s", error)
            streams, self._streams = list(self._streams.values()), {}
            self._processor.abort(list(self._processor.requests))
        for stream in streams:
            _call_soon(stream.loop, stream.put, self._dead)


def _item(output: RequestOutput, error_kinds: dict[str, str]) -> RequestOutput | BaseException:
    if output.error is None:
        return output
    kind = error_kinds.get(output.request_id)
    if kind == ERROR_INVALID:
        return InvalidRequestError(output.error)
    if kind == ERROR_QUEUE_FULL:
        return QueueFullError(output.error)
    return RequestFailedError(output.error)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> bool:
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:  # the loop is closed
        return False
