"""What one tensor-parallel rank is given to build its runner, in whichever process it lives."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from scaleinfer.config import CacheConfig, ModelConfig, OffloadConfig
from scaleinfer.parallel.groups import RankSpec, join_tensor_parallel
from scaleinfer.weights.source import resolve_model
from scaleinfer.worker.device import resolve_device, resolve_dtype
from scaleinfer.worker.model_runner import ModelRunner


@dataclass(slots=True, frozen=True)
class RankRunnerSpec:
    rank: RankSpec
    model: ModelConfig  # device: this rank's own
    cache: CacheConfig
    offload: OffloadConfig
    model_path: str  # resolved again in each process: a ModelSource holds open files
    max_model_len: int
    max_num_seqs: int


def rank_device(config: ModelConfig, rank: int, local_rank: int | None = None) -> ModelConfig:
    """config with this rank's device: cuda:<local rank> where the user named "cuda" or "auto" and a GPU is
    present (one GPU per rank); an explicit cuda:N is shared by every rank (gloo only: NCCL refuses two ranks
    on one GPU), and cpu stays cpu."""
    if config.device.startswith("cuda:"):  # gloo's collectives synchronize with the host: no CUDA graphs
        return dataclasses.replace(config, enforce_eager=True)
    wants_gpu = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if not wants_gpu:
        return config
    return dataclasses.replace(config, device=f"cuda:{rank if local_rank is None else local_rank}")


def build_rank_runner(spec: RankRunnerSpec, progress: bool) -> ModelRunner:
    """Join the group, then build this rank's shard of the model and its KV cache (collective)."""
    device = resolve_device(spec.model)
    join_tensor_parallel(spec.rank, device, resolve_dtype(spec.model, device))
    source = resolve_model(spec.model_path, spec.model.load_format)
    return ModelRunner(spec.model, spec.cache, source, spec.max_model_len, spec.max_num_seqs, progress=progress,
                       offload_config=spec.offload)
