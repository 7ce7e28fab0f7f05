"""LLM: offline batched generation and embedding, the vLLM-style Python API."""

from __future__ import annotations

import dataclasses
import itertools
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

from tqdm import tqdm

from scaleinfer.config import EMBEDDED_MODEL_ALIAS, EngineConfig
from scaleinfer.engine.llm_engine import LLMEngine
from scaleinfer.errors import InvalidRequestError
from scaleinfer.executor.rank import share_cpu_cores, with_num_threads
from scaleinfer.heap import frozen_heap
from scaleinfer.outputs import EmbeddingOutput, EmbeddingRequestOutput, RequestOutput
from scaleinfer.prompts import Message, PromptInput, as_conversations, as_prompt_list
from scaleinfer.sampling_params import RequestOutputKind, SamplingParams
from scaleinfer.startup import embedder_summary, engine_summary, print_startup
from scaleinfer.tokenizer import apply_chat_template, render_chat
from scaleinfer.weights.source import resolve_model
from scaleinfer.worker.embedding_runner import EmbeddingRunner

Task = Literal["generate", "embed"]
TASKS = ("generate", "embed")


class LLM:
    def __init__(self, model: str = EMBEDDED_MODEL_ALIAS, progress: bool = True, task: Task = "generate",
                 **engine_options: Any) -> None:
        """task: "generate" (a decoder) or "embed" (an encoder: embed() returns sentence vectors).
        progress: the loading bars and the start-up line (model, device, dtype, KV cache, max_model_len) on stderr.
        engine_options: any field of ModelConfig, CacheConfig, SchedulerConfig, OffloadConfig or ParallelConfig,
        e.g. device="cpu", dtype="bfloat16", kv_cache_memory=4 << 30, num_blocks=64, max_num_batched_tokens=512,
        max_mixed_prefill_tokens=256, seed=0, tensor_parallel_size=2 (T worker processes: one per GPU, or T CPU
        processes over gloo)."""
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
        if progress:
            print_startup(engine_summary(self.engine) if self.engine is not None else
                          embedder_summary(model, self.embedder))

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

    def embed(self, prompts: PromptInput | Sequence[PromptInput]) -> list[EmbeddingRequestOutput]:
        """One output per prompt, in order, as vLLM's LLM.embed: the L2-normalized sentence vector is
        `.outputs.embedding`. Prompts as generate() takes them (strings, token ids, prompt dicts); a text past the
        model's sequence limit is truncated, token ids past it are refused. embed_vectors() gives the bare lists."""
        self._require_task("embed", "embed()")
        prompts = as_prompt_list(prompts)
        token_ids = self._embedding_token_ids(prompts)
        vectors = self.embedder.embed_batched(token_ids)
        return [EmbeddingRequestOutput(request_id=str(next(self._ids)), prompt=p if isinstance(p, str) else None,
                                       prompt_token_ids=ids, outputs=EmbeddingOutput(vector))
                for p, ids, vector in zip(prompts, token_ids, vectors)]

    def embed_vectors(self, texts: list[str]) -> list[list[float]]:
        """One L2-normalized sentence vector per text, in order, as plain lists (what embed() wraps)."""
        self._require_task("embed", "embed_vectors()")
        return self.embedder.embed(texts)

    def _embedding_token_ids(self, prompts: list[str | list[int]]) -> list[list[int]]:
        """Each prompt's token ids: the texts tokenized in one call, token ids checked."""
        empty = [i for i, p in enumerate(prompts) if p == ""]
        if empty:
            raise InvalidRequestError(f"prompt {empty[0]} is empty")
        texts = [p for p in prompts if isinstance(p, str)]
        encoded = iter(self.embedder.tokenize(texts) if texts else [])
        return [next(encoded) if isinstance(p, str) else self._checked_ids(p, i) for i, p in enumerate(prompts)]

    def _checked_ids(self, prompt: list[int], index: int) -> list[int]:
        limit, vocab_size = self.embedder.max_seq_len, self.embedder.config.vocab_size
        if len(prompt) > limit:
            raise InvalidRequestError(f"prompt {index} has {len(prompt)} token ids; the model takes at most {limit}")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError(f"prompt {index}: token ids must be in [0, {vocab_size}), got {bad[:5]}")
        return prompt

    def _require_task(self, task: Task, method: str) -> None:
        if self.task != task:
            raise InvalidRequestError(f"{method} needs an LLM built with task={task!r}; this one has "
                                      f"task={self.task!r}")

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool | Callable[..., Any] = True,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. A prompt is a string, a list of token ids, {"prompt": str} or
        {"prompt_token_ids": [...]}; a list of them may mix the forms. A bad prompt raises before any work starts.
        use_tqdm: a progress bar over the finished prompts on stderr with the input and output tokens/s, as vLLM
        shows it (on by default, as in vLLM, terminal or not); or a tqdm-like class to build it with.

        A request that fails inside the engine (its step could not run, or its own state broke) fails alone:
        its output comes back finished, with `error` saying what happened and only the tokens made before,
        and a RuntimeWarning names it. Outputs rather than an exception, so that the healthy requests of a
        large batch are not lost with it: check `error` where a failure matters."""
        self._require_task("generate", "generate()")
        prompts = as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompts))
        request_ids = [str(next(self._ids)) for _ in prompts]
        try:
            for request_id, prompt, p in zip(request_ids, prompts, params):
                self.engine.add_request(request_id, prompt, p)
        except Exception:
            self.engine.abort_request(request_ids)
            raise
        return self._run(request_ids, use_tqdm)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool | Callable[..., Any] = True,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation and generate the assistant's turn. A message's
        content is a string or a list of OpenAI text parts ({"type": "text", "text": ...}), as the server takes it;
        each output's `prompt` is the text the template made. tools: OpenAI function tools, rendered by the
        template as vLLM's LLM.chat does (the reply is text; the server's --tool-call-parser parses calls)."""
        self._require_task("generate", "chat()")
        tokenizer = self.engine.tokenizer
        conversations = as_conversations(messages)
        template = {"tools": tools, "add_generation_prompt": add_generation_prompt}
        texts = [render_chat(tokenizer, c, **template) for c in conversations]
        prompts = [apply_chat_template(tokenizer, c, **template) for c in conversations]
        outputs = self.generate(prompts, sampling_params, use_tqdm)
        for output, text in zip(outputs, texts):
            output.prompt = text
        return outputs

    def _run(self, request_ids: list[str], use_tqdm: bool | Callable[..., Any]) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        # The heap of the call's start (model, libraries, the caller's objects) frozen for the call: no full
        # collection walks it between steps (scaleinfer/heap.py).
        with _progress_bar(use_tqdm, len(request_ids)) as bar, frozen_heap(collect=False):
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        bar.finished(output)
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
    share_cpu_cores(with_num_threads(config.model, 1))
    source = resolve_model(config.model.model, config.model.load_format)
    return EmbeddingRunner(config.model, config.scheduler, source, progress)


def _progress_bar(use_tqdm: bool | Callable[..., Any], num_prompts: int) -> GenerateProgress:
    if not use_tqdm:
        return GenerateProgress(None)
    make = use_tqdm if callable(use_tqdm) else tqdm
    return GenerateProgress(make(total=num_prompts, desc="Processed prompts", unit="it", file=sys.stderr,
                                 dynamic_ncols=True))


class GenerateProgress:
    """vLLM's bar over LLM.generate: prompts finished, and the input and output tokens/s so far."""

    def __init__(self, bar: Any) -> None:
        self.bar, self.num_input_tokens, self.num_output_tokens = bar, 0, 0

    def finished(self, output: RequestOutput) -> None:
        if self.bar is None:
            return
        self.num_input_tokens += len(output.prompt_token_ids)
        self.num_output_tokens += sum(len(c.token_ids) for c in output.outputs)
        elapsed = self.bar.format_dict.get("elapsed") or 1e-9
        self.bar.postfix = (f"est. speed input: {self.num_input_tokens / elapsed:.2f} toks/s, "
                            f"output: {self.num_output_tokens / elapsed:.2f} toks/s")
        self.bar.update(1)

    def __enter__(self) -> GenerateProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def _as_params_list(params: SamplingParams | list[SamplingParams] | None, num_prompts: int) -> list[SamplingParams]:
    """One per prompt, each asking for its final output only (as vLLM's LLM: generate returns nothing else)."""
    if params is None:
        return [SamplingParams(output_kind=RequestOutputKind.FINAL_ONLY)] * num_prompts
    if isinstance(params, SamplingParams):
        return [_final_only(params)] * num_prompts
    if len(params) != num_prompts:
        raise InvalidRequestError(f"got {len(params)} sampling params for {num_prompts} prompts")
    return [_final_only(p) for p in params]


def _final_only(params: SamplingParams) -> SamplingParams:
    return dataclasses.replace(params, output_kind=RequestOutputKind.FINAL_ONLY)
