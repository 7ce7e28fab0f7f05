"""AsyncEmbedder: the asyncio front of the synchronous EmbeddingRunner, for `scaleinfer serve --task embed`.

The runner is not thread-safe, so one worker thread owns it and runs one request's batches at a time, in
arrival order; the event loop only awaits. Invariants:
  - a request cancelled (its client left) before its turn never runs; one already running finishes and is
    dropped;
  - after shutdown every waiting and every later call gets EngineDeadError, and is_healthy is False.
It answers what the server asks of AsyncLLMEngine (health, stats, limits, the tokenizer), so /health,
/metrics, /v1/models and the graceful shutdown work unchanged.
"""

from __future__ import annotations

import asyncio
import copy
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scaleinfer.engine.llm_engine import EngineStats
from scaleinfer.errors import EngineDeadError, InvalidRequestError

if TYPE_CHECKING:
    from scaleinfer.config import EngineConfig
    from scaleinfer.worker.embedding_runner import EmbeddingRunner


@dataclass(slots=True)
class Embeddings:
    vectors: list[list[float]]  # one L2-normalized vector per input, in order
    num_prompt_tokens: int  # over all inputs, special tokens included, after truncation


class AsyncEmbedder:
    task = "embed"

    def __init__(self, runner: EmbeddingRunner, model_name: str) -> None:
        self.model_name = model_name
        self.max_model_len: int = runner.max_seq_len  # longer texts are truncated; longer token ids refused
        self.max_waiting: int | None = None
        self.embedding_size: int = runner.config.hidden_size
        self.vocab_size: int = runner.config.vocab_size
        self.tokenizer = copy.deepcopy(runner.tokenizer)  # the event loop's copy; the runner's stays on its thread
        self._runner = runner  # after __init__, touched by the worker thread only
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="scaleinfer-embed")
        self._num_pending = 0  # event loop only: requests submitted and not yet answered
        self._num_prompt_tokens = 0
        self._dead: EngineDeadError | None = None

    @classmethod
    def from_config(cls, config: EngineConfig, progress: bool = True) -> AsyncEmbedder:
        from scaleinfer.startup import embedder_summary, print_startup
        from scaleinfer.weights.source import resolve_model
        from scaleinfer.worker.embedding_runner import EmbeddingRunner

        if config.parallel.tensor_parallel_size != 1:
            raise InvalidRequestError(f"task 'embed' runs in one process; got tensor_parallel_size="
                                      f"{config.parallel.tensor_parallel_size}")
        source = resolve_model(config.model.model, config.model.load_format)
        runner = EmbeddingRunner(config.model, config.scheduler, source, progress)
        if progress:
            print_startup(embedder_summary(config.model.model, runner))
        return cls(runner, config.model.model)

    @property
    def is_healthy(self) -> bool:
        return self._dead is None

    @property
    def dead_error(self) -> EngineDeadError | None:
        return self._dead

    def stats(self) -> EngineStats:
        running = min(self._num_pending, 1)
        return EngineStats(num_running=running, num_waiting=self._num_pending - running, num_blocks=0,
                           num_used_blocks=0, kv_cache_usage=0.0, prefix_cache_hit_rate=0.0, num_preempted=0,
                           num_prompt_tokens=self._num_prompt_tokens, num_generation_tokens=0)

    async def embed(self, inputs: list[str] | list[list[int]]) -> Embeddings:
        """Texts (tokenized and truncated on the worker thread) or token ids (as given), embedded in order."""
        if self._dead is not None:
            raise self._dead
        self._num_pending += 1
        try:
            result = await self._submit(inputs)
        finally:
            self._num_pending -= 1
        self._num_prompt_tokens += result.num_prompt_tokens
        return result

    async def _submit(self, inputs: list[str] | list[list[int]]) -> Embeddings:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._embed, inputs)
        except RuntimeError:  # submitted after shutdown began
            if self._dead is not None:
                raise self._dead from None
            raise
        except asyncio.CancelledError:  # shutdown cancelled it while it waited, or its caller was cancelled
            task = asyncio.current_task()
            if self._dead is not None and task is not None and not task.cancelling():
                raise self._dead from None
            raise

    def _embed(self, inputs: list[Any]) -> Embeddings:
        """On the worker thread."""
        token_ids = self._runner.tokenize(inputs) if isinstance(inputs[0], str) else inputs
        return Embeddings(self._runner.embed_batched(token_ids), sum(len(ids) for ids in token_ids))

    def shutdown(self, reason: str = "engine was shut down") -> None:
        """Refuse new requests and drop the waiting ones (EngineDeadError(reason)); the running one finishes."""
        if self._dead is None:
            self._dead = EngineDeadError(reason)
        self._executor.shutdown(wait=False, cancel_futures=True)
