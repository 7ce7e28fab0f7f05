"""What one tensor-parallel rank is given to build its runner, in whichever process it lives."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from scaleinfer.config import CacheConfig, ModelConfig, OffloadConfig
from scaleinfer.executor.cpu_threads import default_num_threads, measure_cpu_cores, set_num_threads
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


def uses_gpus(device: str) -> bool:
    """Whether the ranks of ModelConfig.device get one GPU each (NCCL); otherwise they share the CPU or the one
    GPU the user named (gloo)."""
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def rank_device(config: ModelConfig, local_rank: int, tensor_parallel_size: int = 1) -> ModelConfig:
    """config with this rank's device: cuda:<local rank> where the ranks get a GPU each; an explicit cuda:N is
    shared by every rank (gloo only: NCCL refuses two ranks on one GPU), and cpu stays cpu."""
    if config.device.startswith("cuda:"):
        # gloo's collectives synchronize with the host, so no graph may hold one: a stage of one rank captures
        # its decode steps (its sends and receives stay outside the graphs), a stage of several runs eagerly.
        return config if tensor_parallel_size == 1 else dataclasses.replace(config, enforce_eager=True)
    return dataclasses.replace(config, device=f"cuda:{local_rank}") if uses_gpus(config.device) else config


def with_num_threads(config: ModelConfig, world_size: int) -> ModelConfig:
    """config with num_threads decided once, in the process that starts the run: the user's; else, where the ranks
    compute on the CPU, each one's share of the cores other processes leave free (cpu_threads.py); else None
    (torch's default: a GPU rank's host threads only feed the device)."""
    if config.num_threads is not None or uses_gpus(config.device):
        return config
    return dataclasses.replace(config, num_threads=default_num_threads(measure_cpu_cores(), world_size))


def share_cpu_cores(config: ModelConfig) -> None:
    """This process's threads, as with_num_threads decided them."""
    if config.num_threads is not None:
        set_num_threads(config.num_threads)


def build_rank_runner(spec: RankRunnerSpec, progress: bool) -> ModelRunner:
    """Join the group, then build this rank's shard of the model and its KV cache (collective)."""
    device = resolve_device(spec.model)
    join_tensor_parallel(spec.rank, device, resolve_dtype(spec.model, device))
    source = resolve_model(spec.model_path, spec.model.load_format)
    return ModelRunner(spec.model, spec.cache, source, spec.max_model_len, spec.max_num_seqs, progress=progress,
                       offload_config=spec.offload)
