"""The executor: the one part of the engine that knows how many processes run the model.

    UniprocExecutor          the runner in this process (one GPU, the CPU, or an offload shard)
    TensorParallelExecutor   rank 0 here, ranks 1..T-1 spawned here or started by torchrun
    PipelineParallelExecutor the same over T x P ranks in P stages, with submit/collect of micro-batches

Both answer execute(SchedulerOutput) -> RunnerOutput, num_blocks, any_rank_busy and shutdown; the engine does
not know which it has.
"""

from __future__ import annotations

import dataclasses
import tempfile

import torch

from scaleinfer.config import EngineConfig, TorchrunEnv, torchrun_env
from scaleinfer.errors import InvalidRequestError
from scaleinfer.executor.rank import RankRunnerSpec, rank_device, share_cpu_cores, uses_gpus, with_num_threads
from scaleinfer.parallel.expert import check_expert_parallel
from scaleinfer.parallel.groups import RankSpec
from scaleinfer.weights.source import ModelSource


def make_executor(config: EngineConfig, source: ModelSource, max_model_len: int, progress: bool):
    size = config.parallel.world_size
    config = dataclasses.replace(config, model=with_num_threads(config.model, size))
    share_cpu_cores(config.model)  # this process's (rank 0's); each worker sets its own from its spec
    launched = torchrun_env()
    if size == 1:
        from scaleinfer.executor.uniproc import UniprocExecutor
        from scaleinfer.worker.model_runner import ModelRunner

        runner = ModelRunner(config.model, config.cache, source, max_model_len, config.scheduler.max_num_seqs,
                             progress=progress, offload_config=config.offload)
        return UniprocExecutor(runner)
    check_tensor_parallel(config, source, launched)
    check_pipeline_parallel(config, source)
    if launched is not None:
        return _torchrun_executor(config, source, max_model_len, progress, launched)
    return _spawning_executor(config, source, max_model_len, progress)


def check_tensor_parallel(config: EngineConfig, source: ModelSource, launched: TorchrunEnv | None) -> None:
    """Refuse sizes that cannot run, naming the value, before any process starts."""
    size, arch = config.parallel.tensor_parallel_size, source.arch
    for name in ("num_attention_heads", "intermediate_size"):
        if getattr(arch, name) % size:
            raise InvalidRequestError(f"tensor_parallel_size={size} does not divide the model's "
                                      f"{name}={getattr(arch, name)}")
    kv_heads = arch.num_key_value_heads
    if kv_heads % size and size % kv_heads:  # each rank holds whole KV heads, or one head some ranks share
        raise InvalidRequestError(f"tensor_parallel_size={size} neither divides nor is a multiple of the model's "
                                  f"num_key_value_heads={kv_heads}")
    check_expert_parallel(arch, size, config.parallel.expert_parallel_size)
    if source.format == "hf_model":
        raise InvalidRequestError("an in-memory model cannot be shared with worker processes: save it and pass the "
                                  "folder")
    world = config.parallel.world_size
    if launched is not None and launched.world_size != world:
        raise InvalidRequestError(
            f"under torchrun the world size ({launched.world_size}) must equal tensor_parallel_size x "
            f"pipeline_parallel_size ({world}); to stream one model's layers over several GPUs together (offload "
            "shards) use tensor_parallel_size=1")
    if uses_gpus(config.model.device) and launched is None and world > torch.cuda.device_count():
        raise InvalidRequestError(f"tensor_parallel_size x pipeline_parallel_size = {world} exceeds the "
                                  f"{torch.cuda.device_count()} visible GPUs (one rank per GPU)")


def check_pipeline_parallel(config: EngineConfig, source: ModelSource) -> None:
    """Refuse pipelines that cannot run, naming the value, before any process starts."""
    from scaleinfer.models.registry import model_class

    size, arch = config.parallel.pipeline_parallel_size, source.arch
    if size == 1:
        return
    if size > arch.num_hidden_layers:
        raise InvalidRequestError(f"pipeline_parallel_size={size} exceeds the model's num_hidden_layers="
                                  f"{arch.num_hidden_layers} (each stage holds at least one layer)")
    if not model_class(arch).supports_pipeline:
        raise InvalidRequestError(f"pipeline_parallel_size={size}: {arch.architecture} does not run in pipeline "
                                  "stages yet (the Llama and LayerNorm-decoder families do)")
    if config.offload.enabled:
        raise InvalidRequestError(f"pipeline_parallel_size={size} with offload={config.offload.offload!r}: "
                                  "streamed weights run in one stage")


def _rank_spec(config: EngineConfig, source: ModelSource, max_model_len: int, init_method: str, rank: int,
               local_rank: int) -> RankRunnerSpec:
    # NCCL with one GPU per rank; gloo on CPUs, and where every rank shares the one GPU the user named.
    backend = "nccl" if uses_gpus(config.model.device) else "gloo"
    parallel = config.parallel
    model = rank_device(config.model, local_rank, parallel.tensor_parallel_size)
    return RankRunnerSpec(
        rank=RankSpec(rank, parallel.world_size, init_method, backend, parallel.collective_timeout,
                      pipeline_parallel_size=parallel.pipeline_parallel_size,
                      expert_parallel_size=config.parallel.expert_parallel_size,
                      moe_all_to_all=config.parallel.moe_all_to_all),
        model=model, cache=config.cache, offload=config.offload,
        model_path=str(source.path), max_model_len=max_model_len, max_num_seqs=config.scheduler.max_num_seqs)


def _spawning_executor(config: EngineConfig, source: ModelSource, max_model_len: int, progress: bool):
    rendezvous_dir = tempfile.mkdtemp(prefix="scaleinfer-tp-")
    init_method = f"file://{rendezvous_dir}/rendezvous"
    specs = [_rank_spec(config, source, max_model_len, init_method, rank, rank)
             for rank in range(config.parallel.world_size)]
    return _executor_class(config)(specs[0], specs[1:], rendezvous_dir, progress)


def _executor_class(config: EngineConfig):
    if config.parallel.pipeline_parallel_size > 1:
        from scaleinfer.executor.pipeline import PipelineParallelExecutor

        return PipelineParallelExecutor
    from scaleinfer.executor.multiproc import TensorParallelExecutor

    return TensorParallelExecutor


def _torchrun_executor(config: EngineConfig, source: ModelSource, max_model_len: int, progress: bool,
                       launched: TorchrunEnv):
    """Rank 0 returns the executor; every other rank serves steps here until rank 0 shuts down, then exits."""
    spec = _rank_spec(config, source, max_model_len, "env://", launched.rank, launched.local_rank)
    if launched.rank == 0:
        return _executor_class(config)(spec, None, None, progress)
    from scaleinfer.executor.worker_main import run_torchrun_worker

    run_torchrun_worker(spec)
    raise SystemExit(0)

