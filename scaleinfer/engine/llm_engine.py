"""LLMEngine: the engine core called in this process, and the front's output processor. Requests in,
RequestOutputs out; used by LLM and init_inference. step() = the core's step -> the front's outputs.

Where the core launches steps (one process, one stage), step() completes the step launched before, launches the
next, and only then turns the finished step's outputs into RequestOutputs (detokenization, stop strings): the
device runs the next step while the host does that, as the core loop does for the server. So a request added,
or aborted, between two steps joins or leaves from the step after the one already launched, and a sequence a
stop string ends is computed once more, its token dropped.

A request with n > 1 becomes n sequences that share the prompt (the prefix cache shares its KV).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from scaleinfer.config import EngineConfig
from scaleinfer.engine.core import EngineCore, LaunchedCoreStep
from scaleinfer.engine.core_types import EngineCoreRequest, EngineStats
from scaleinfer.engine.output_processor import OutputProcessor
from scaleinfer.errors import InvalidRequestError
from scaleinfer.outputs import RequestOutput
from scaleinfer.sampling_params import SamplingParams

if TYPE_CHECKING:
    from scaleinfer.weights.source import ModelSource

__all__ = ["EngineStats", "LLMEngine", "tokenize_prompt"]


class LLMEngine:
    def __init__(self, config: EngineConfig, progress: bool = True, source: ModelSource | None = None) -> None:
        """source: where weights come from when not config.model.model (init_inference passes an HF model)."""
        from scaleinfer.tokenizer import tokenizer_for
        from scaleinfer.weights.source import resolve_model

        self.config = config
        source = source or resolve_model(config.model.model, config.model.load_format)
        self.model_name = config.model.model
        self.model_path = source.path
        self.tokenizer = None if config.model.skip_tokenizer_init else tokenizer_for(source, config.model)
        eos = None if self.tokenizer is None else self.tokenizer.eos_token_id
        self.core = EngineCore(config, progress, source, eos)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._launched: LaunchedCoreStep | None = None  # the step queued on the device, not yet completed

    # what callers of the in-process engine reach through it (init_inference, tests)
    arch = property(lambda self: self.core.arch)
    max_model_len = property(lambda self: self.core.max_model_len)
    executor = property(lambda self: self.core.executor)
    runner = property(lambda self: self.core.executor.runner)  # rank 0's, in this process
    scheduler = property(lambda self: self.core.scheduler)
    block_manager = property(lambda self: self.core.block_manager)
    eos_token_ids = property(lambda self: self.core.eos_token_ids)

    # ---- requests -------------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        """Queue a request; raises InvalidRequestError (or QueueFullError) and leaves nothing behind."""
        prompt_text, prompt_token_ids = tokenize_prompt(self.tokenizer, prompt)
        arrival_time = time.time()
        self.output_processor.add_request(request_id, prompt_text, prompt_token_ids, params, arrival_time)
        try:
            self.core.add_request(EngineCoreRequest(request_id, prompt_token_ids, params, arrival_time))
        except Exception:
            self.output_processor.abort([request_id])
            raise

    def abort_request(self, request_ids: list[str]) -> None:
        self.core.abort(request_ids)
        self.output_processor.abort(request_ids)

    def has_unfinished_requests(self) -> bool:
        return self._launched is not None or self.core.has_unfinished()

    # ---- the loop -------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        launched, self._launched = self._launched or self.core.launch(), None
        outputs = self.core.complete(launched)
        if self.core.launches and self.core.has_unfinished():
            self._launched = self.core.launch()  # runs while this step's outputs are processed
        processed = self.output_processor.process(outputs)
        self.core.abort(processed.to_abort, processed.to_stop)
        return processed.request_outputs

    def shutdown(self) -> None:
        """Stop the worker processes, if any (also done when the engine is collected or at exit)."""
        self.core.shutdown()

    def stats(self) -> EngineStats:
        return self.core.stats()


def tokenize_prompt(tokenizer: Any, prompt: str | list[int]) -> tuple[str | None, list[int]]:
    """(the prompt's text if it was text, its token ids); token ids are checked against the vocabulary by the core."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("prompt is empty")
        if tokenizer is None:
            raise InvalidRequestError("text prompts need a tokenizer; pass token ids (skip_tokenizer_init)")
        return prompt, tokenizer.encode(prompt)
    return None, list(prompt)
