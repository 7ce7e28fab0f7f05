"""init_inference: take a loaded transformers model, move its weights into ours, keep the calls users know.

    model = AutoModelForCausalLM.from_pretrained(...)
    model = scaleinfer.init_inference(model)          # same generate() / forward() signatures
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=32)

The HF model gives its parameters up as ours is filled: ours are built without memory and each takes its
memory as it is loaded, just before the HF tensor it copies is released, so peak memory is one copy of the
weights plus the tensor in flight, on a GPU as on the CPU. The HF model is not usable after.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Any

import torch

from scaleinfer.config import EngineConfig
from scaleinfer.engine.llm_engine import LLMEngine
from scaleinfer.errors import InvalidRequestError, RequestFailedError
from scaleinfer.outputs import ScheduledSequence, SchedulerOutput
from scaleinfer.sampling_params import RequestOutputKind, SamplingParams

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def init_inference(model: Any, dtype: torch.dtype | None = None, tensor_parallel_size: int = 1,
                   **engine_options: Any) -> InferenceModel:
    """Swap `model` (a transformers PreTrainedModel of a supported family) for scaleinfer's engine.

    dtype: the run dtype (default: the model's own). engine_options: as for LLM (kv_cache_memory, ...).
    """
    from scaleinfer.models.registry import check_supported
    from scaleinfer.weights.hf_config import arch_from_hf
    from scaleinfer.weights.hf_model import hf_model_source

    device = next(model.parameters()).device
    if device.type == "meta":
        raise InvalidRequestError("the model is on the meta device: it has no weights to move; load them first")
    check_supported(type(model).__name__)  # before reading a config we may not understand
    arch = arch_from_hf(model.config.to_dict(), f"{type(model).__name__}.config")
    dtype = dtype or next(model.parameters()).dtype
    if tensor_parallel_size != 1:
        return _init_tensor_parallel(model, device, dtype, tensor_parallel_size, engine_options)
    config = EngineConfig.from_kwargs(model=arch.architecture, device=str(device), dtype=_DTYPE_NAMES[dtype],
                                      skip_tokenizer_init=True, **engine_options)
    generation_config = getattr(model, "generation_config", None)
    source = hf_model_source(model, arch)
    with source.building():
        engine = LLMEngine(config, progress=False, source=source)
    return InferenceModel(engine, generation_config)


def _init_tensor_parallel(model: Any, device: torch.device, dtype: torch.dtype, size: int,
                          engine_options: dict[str, Any]) -> InferenceModel:
    """T ranks, each its own process, cannot take tensors from this one's model: its weights are written once
    to a temporary safetensors folder, HF's parameters released, and every rank reads its slice from the
    files (a rank holds about 1/T of the model). The folder goes once the engine has started: every rank has
    loaded by then (the KV block count is agreed after loading)."""
    folder = tempfile.mkdtemp(prefix="scaleinfer-inject-")
    try:
        model.save_pretrained(folder, safe_serialization=True)
        generation_config = getattr(model, "generation_config", None)
        for param in model.parameters():
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
        config = EngineConfig.from_kwargs(model=folder, device="cuda" if device.type == "cuda" else "cpu",
                                          dtype=_DTYPE_NAMES[dtype], skip_tokenizer_init=True,
                                          tensor_parallel_size=size, **engine_options)
        engine = LLMEngine(config, progress=False)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return InferenceModel(engine, generation_config)


class InferenceModel:
    """What init_inference returns: HF-style generate() and forward() over the scaleinfer engine."""

    def __init__(self, engine: LLMEngine, generation_config: Any) -> None:
        self.engine = engine
        self.generation_config = generation_config
        self.device = engine.runner.device
        self.dtype = engine.runner.dtype
        self._next_id = 0

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int | None = None, min_new_tokens: int = 0, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None) -> torch.Tensor:
        """input_ids: [batch, prompt_len], left-padded where attention_mask is 0 -> [batch, prompt_len + new]:
        the prompts as given, then each row's tokens, right-padded with pad_token_id like HF. A row that fails
        inside the engine raises RequestFailedError naming it and what happened; nothing is returned."""
        eos = self._eos_ids(eos_token_id)
        params = SamplingParams(
            max_tokens=max_new_tokens or self._default("max_new_tokens", 20), min_tokens=min_new_tokens,
            temperature=temperature if do_sample else 0.0, top_p=top_p if do_sample else 1.0,
            top_k=(top_k if top_k is not None else self._default("top_k", 0)) if do_sample else 0,
            stop_token_ids=eos, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY,
        )
        rows = _unpadded_rows(input_ids, attention_mask)
        generated = self._run(rows, params)
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        return _assemble(input_ids, generated, pad)

    def _run(self, rows: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Each row's generated tokens; raises RequestFailedError naming a row that failed inside the engine
        (its tokens stopped short), after aborting the rest of the batch, which is no use without it."""
        ids = [self._request_id() for _ in rows]
        try:
            for request_id, row in zip(ids, rows):
                self.engine.add_request(request_id, row, params)
            done = self._wait(ids)
        except BaseException:
            self.engine.abort_request(ids)
            raise
        return [done[request_id] for request_id in ids]

    def _wait(self, ids: list[str]) -> dict[str, list[int]]:
        row_of = {request_id: row for row, request_id in enumerate(ids)}
        done: dict[str, list[int]] = {}
        while len(done) < len(ids):
            for output in self.engine.step():
                if not output.finished or output.request_id not in row_of:
                    continue
                if output.error is not None:
                    raise RequestFailedError(f"row {row_of[output.request_id]} (request {output.request_id!r}) "
                                             f"failed inside the engine: {output.error}")
                done[output.request_id] = output.outputs[0].token_ids
        return done

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor) -> Any:
        """Logits for every position of every row, like HF's forward: [batch, seq_len, vocab]."""
        from transformers.modeling_outputs import CausalLMOutputWithPast

        size = self.engine.config.parallel.tensor_parallel_size
        if size != 1:
            raise InvalidRequestError(f"forward() runs the model in this process only; with tensor_parallel_size="
                                      f"{size} use generate()")

        logits = [self._prefill_logits(row.tolist()) for row in input_ids]
        return CausalLMOutputWithPast(logits=torch.stack(logits))

    __call__ = forward

    def _prefill_logits(self, token_ids: list[int]) -> torch.Tensor:
        from scaleinfer.engine.sequence import Sequence
        from scaleinfer.worker.step_inputs import build_step_inputs

        engine, params = self.engine, SamplingParams()
        seq = Sequence(self._request_id(), token_ids, params)
        if not engine.block_manager.allocate_slots(seq, len(token_ids)):
            raise InvalidRequestError(f"a row of {len(token_ids)} tokens does not fit the free KV blocks")
        try:
            step = SchedulerOutput([ScheduledSequence(seq.request_id, token_ids, 0, seq.block_ids, False, params)])
            inputs = build_step_inputs(step, engine.runner.block_size, self.device)
            hidden = engine.runner.model(inputs.input_ids, inputs.positions, inputs.attn)
            return engine.runner.model.compute_logits(hidden).to(self.dtype)  # [seq_len, vocab]
        finally:
            engine.block_manager.free(seq)

    def _eos_ids(self, eos_token_id: int | list[int] | None) -> list[int]:
        eos = eos_token_id if eos_token_id is not None else self._default("eos_token_id", None)
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def _default(self, name: str, fallback: Any) -> Any:
        value = getattr(self.generation_config, name, None)
        return fallback if value is None else value

    def _request_id(self) -> str:
        self._next_id += 1
        return f"inject-{self._next_id}"


def _unpadded_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
    if input_ids.dim() != 2:
        raise InvalidRequestError(f"input_ids must be [batch, seq_len], got shape {list(input_ids.shape)}")
    if attention_mask is None:
        return input_ids.tolist()
    return [row[mask.bool()].tolist() for row, mask in zip(input_ids.cpu(), attention_mask.cpu())]


def _assemble(input_ids: torch.Tensor, generated: list[list[int]], pad: int) -> torch.Tensor:
    width = max(map(len, generated))
    new = torch.full((len(generated), width), pad, dtype=input_ids.dtype)
    for i, tokens in enumerate(generated):
        new[i, : len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
    return torch.cat([input_ids, new.to(input_ids.device)], dim=1)
