"""LLM: offline batched generation, the vLLM-style Python API."""

from __future__ import annotations

import itertools
from typing import Any

from scaleinfer.config import EMBEDDED_MODEL_ALIAS, EngineConfig
from scaleinfer.engine.llm_engine import LLMEngine
from scaleinfer.errors import InvalidRequestError
from scaleinfer.outputs import RequestOutput
from scaleinfer.sampling_params import SamplingParams
from scaleinfer.tokenizer import apply_chat_template

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str = EMBEDDED_MODEL_ALIAS, progress: bool = True, **engine_options: Any) -> None:
        """engine_options: any field of ModelConfig, CacheConfig or SchedulerConfig, e.g. device="cpu",
        dtype="bfloat16", kv_cache_memory=4 << 30, num_blocks=64, max_num_batched_tokens=512, seed=0."""
        config = EngineConfig.from_kwargs(model=model, **engine_options)
        self.engine = LLMEngine(config, progress=progress)
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. A bad prompt raises before any work starts."""
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
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [apply_chat_template(self.engine.tokenizer, c) for c in conversations]
        return self.generate(prompts, sampling_params)

    def _run(self, request_ids: list[str]) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        while len(finished) < len(request_ids):
            for output in self.engine.step():
                if output.finished:
                    finished[output.request_id] = output
        return [finished[request_id] for request_id in request_ids]


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
