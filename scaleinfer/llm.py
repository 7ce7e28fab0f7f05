"""LLM: offline batched generation and embedding, the vLLM-style Python API."""

from __future__ import annotations

import itertools
import warnings
from typing import Any, Literal

from scaleinfer.config import EMBEDDED_MODEL_ALIAS, EngineConfig
from scaleinfer.engine.llm_engine import LLMEngine
from scaleinfer.errors import InvalidRequestError
from scaleinfer.outputs import RequestOutput
from scaleinfer.sampling_params import SamplingParams
from scaleinfer.tokenizer import apply_chat_template
from scaleinfer.weights.source import resolve_model
from scaleinfer.worker.embedding_runner import EmbeddingRunner

Prompt = str | list[int]
Task = Literal["generate", "embed"]
TASKS = ("generate", "embed")


class LLM:
    def __init__(self, model: str = EMBEDDED_MODEL_ALIAS, progress: bool = True, task: Task = "generate",
                 **engine_options: Any) -> None:
        """task: "generate" (a decoder) or "embed" (an encoder: embed() returns sentence vectors).
        engine_options: any field of ModelConfig, CacheConfig, SchedulerConfig, OffloadConfig or ParallelConfig,
        e.g. device="cpu", dtype="bfloat16", kv_cache_memory=4 << 30, num_blocks=64, max_num_batched_tokens=512,
        seed=0, tensor_parallel_size=2 (T worker processes: one per GPU, or T CPU processes over gloo)."""
        if task not in TASKS:
            raise InvalidRequestError(f"task must be one of {TASKS}, got {task!r}")
        self.task = task
        config = EngineConfig.from_kwargs(model=model, **engine_options)
        if task == "embed" and config.parallel.tensor_parallel_size != 1:
            raise InvalidRequestError(f"task='embed' runs in one process; got tensor_parallel_size="
                                      f"{config.parallel.tensor_parallel_size}")
        self.engine = LLMEngine(config, progress=progress) if task == "generate" else None
        self.embedder = _embedding_runner(config, progress) if task == "embed" else None
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stop the worker processes of a tensor-parallel run now (otherwise when this LLM is collected, or at
        exit); the LLM serves no more requests after."""
        if self.engine is not None:
            self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer if self.engine is not None else self.embedder.tokenizer

    def embed(self, texts: list[str]) -> list[list[float]]:
        """One L2-normalized sentence vector per text, in order; texts are packed into batches unpadded."""
        self._require_task("embed", "embed()")
        return self.embedder.embed(texts)

    def _require_task(self, task: Task, method: str) -> None:
        if self.task != task:
            raise InvalidRequestError(f"{method} needs an LLM built with task={task!r}; this one has "
                                      f"task={self.task!r}")

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. A bad prompt raises before any work starts.

        A request that fails inside the engine (its step could not run, or its own state broke) fails alone:
        its output comes back finished, with `error` saying what happened and only the tokens made before,
        and a RuntimeWarning names it. Outputs rather than an exception, so that the healthy requests of a
        large batch are not lost with it: check `error` where a failure matters."""
        self._require_task("generate", "generate()")
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompts))
        request_ids = [str(next(self._ids)) for _ in prompts]
        try:
            for request_id, prompt, p in zip(request_ids, prompts, params):
                self.engine.add_request(request_id, prompt, p)
        except Exception:
            self.engine.abort_request(request_ids)
            raise
        return self._run(request_ids)

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation and generate the assistant's turn."""
        self._require_task("generate", "chat()")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [apply_chat_template(self.engine.tokenizer, c) for c in conversations]
        return self.generate(prompts, sampling_params)

    def _run(self, request_ids: list[str]) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                if output.finished:
                    finished[output.request_id] = output
        outputs = [finished[request_id] for request_id in request_ids]
        _warn_failed(outputs)
        return outputs


def _warn_failed(outputs: list[RequestOutput]) -> None:
    failed = [f"prompt {i} (request {o.request_id!r}): {o.error}" for i, o in enumerate(outputs) if o.error]
    if failed:
        more = f"; and {len(failed) - 3} more" if len(failed) > 3 else ""
        warnings.warn(f"{len(failed)} of {len(outputs)} requests failed inside the engine and hold only the tokens "
                      f"made before (their outputs carry .error): {'; '.join(failed[:3])}{more}", RuntimeWarning,
                      stacklevel=4)


def _embedding_runner(config: EngineConfig, progress: bool) -> EmbeddingRunner:
    source = resolve_model(config.model.model, config.model.load_format)
    return EmbeddingRunner(config.model, config.scheduler, source, progress)


def _as_prompt_list(prompts: Prompt | list[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    if not prompts:
        raise InvalidRequestError("prompts is empty")
    return list(prompts)


def _as_params_list(params: SamplingParams | list[SamplingParams] | None, num_prompts: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * num_prompts
    if isinstance(params, SamplingParams):
        return [params] * num_prompts
    if len(params) != num_prompts:
        raise InvalidRequestError(f"got {len(params)} sampling params for {num_prompts} prompts")
    return list(params)
