"""The start-up line: what a run serves and how, printed once to stderr when the engine is built (LLM() and the
generate and chat commands; under serve the engine core's process prints it, then the front its URL), never into
the generated text on stdout."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, TextIO

from scaleinfer.version import __version__


@dataclass(slots=True, frozen=True)
class StartupSummary:
    model: str  # as the user named it
    architecture: str
    device: str
    dtype: str
    max_model_len: int
    num_kv_tokens: int | None  # None: an encoder, which keeps no KV cache
    num_threads: int | None = None  # this process's CPU threads; None on a GPU
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    quantization: str | None = None

    def line(self) -> str:
        kv = "no KV cache" if self.num_kv_tokens is None else f"KV cache {self.num_kv_tokens:,} tokens"
        extras = [f"{self.num_threads} CPU thread{'s' if self.num_threads > 1 else ''}" if self.num_threads else "",
                  f"tensor parallel {self.tensor_parallel_size}" if self.tensor_parallel_size > 1 else "",
                  f"pipeline parallel {self.pipeline_parallel_size}" if self.pipeline_parallel_size > 1 else "",
                  f"{self.quantization} weights" if self.quantization else ""]
        return (f"scaleinfer {__version__}: {self.model} ({self.architecture}) on {self.device}, {self.dtype}, "
                f"{kv}, max_model_len {self.max_model_len:,}" + "".join(f", {e}" for e in extras if e))


def engine_summary(engine: Any) -> StartupSummary:
    """The summary of an LLMEngine or EngineCore built in this process (its rank-0 runner is here)."""
    config, runner = engine.config, engine.executor.runner
    return StartupSummary(
        model=config.model.model, architecture=engine.arch.architecture, device=str(runner.device),
        dtype=_dtype_name(runner.dtype), max_model_len=engine.max_model_len,
        num_kv_tokens=engine.block_manager.num_blocks * config.cache.block_size,
        num_threads=_cpu_threads(runner.device), tensor_parallel_size=config.parallel.tensor_parallel_size,
        pipeline_parallel_size=config.parallel.pipeline_parallel_size, quantization=config.model.quantization)


def embedder_summary(model: str, embedder: Any) -> StartupSummary:
    """The summary of an EmbeddingRunner (an encoder: no KV cache; max_model_len is its sequence limit)."""
    return StartupSummary(model=model, architecture=embedder.architecture, device=str(embedder.device),
                          dtype=_dtype_name(embedder.dtype), max_model_len=embedder.max_seq_len, num_kv_tokens=None,
                          num_threads=_cpu_threads(embedder.device))


def print_startup(summary: StartupSummary, file: TextIO | None = None) -> None:
    print(summary.line(), file=file or sys.stderr, flush=True)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _cpu_threads(device: Any) -> int | None:
    if getattr(device, "type", str(device)) != "cpu":
        return None
    import torch

    return torch.get_num_threads()
