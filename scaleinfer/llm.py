"""LLM: offline batched generation, the vLLM-style Python API."""

from __future__ import annotations

import itertools
from typing import Any

from scaleinfer.config import EMBEDDED_MODEL_ALIAS, CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from scaleinfer.engine.llm_engine import LLMEngine
from scaleinfer.errors import InvalidRequestError
from scaleinfer.outputs import RequestOutput
from scaleinfer.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(
        self,
        model: str = EMBEDDED_MODEL_ALIAS,
        device: str = "auto",
        dtype: str = "auto",
        max_model_len: int | None = None,
        seed: int = 0,
        block_size: int = 16,
        kv_cache_memory: int | None = None,
        memory_fraction: float = 0.9,
        enable_prefix_caching: bool = True,
        num_blocks: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        progress: bool = True,
    ) -> None:
        config = EngineConfig(
            model=ModelConfig(model=model, device=device, dtype=dtype, max_model_len=max_model_len, seed=seed),
            cache=CacheConfig(block_size=block_size, kv_cache_memory=kv_cache_memory, memory_fraction=memory_fraction,
                              enable_prefix_caching=enable_prefix_caching, num_blocks=num_blocks),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens),
        )
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
        prompts = [chat_prompt_ids(self.engine.tokenizer, c) for c in conversations]
        return self.generate(prompts, sampling_params)

    def _run(self, request_ids: list[str]) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        while len(finished) < len(request_ids):
            for output in self.engine.step():
                if output.finished:
                    finished[output.request_id] = output
        return [finished[request_id] for request_id in request_ids]


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this model's tokenizer has no chat template")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


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
