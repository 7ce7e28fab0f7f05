"""The data plane: owns the device, the model, the KV cache; turns a SchedulerOutput into sampled tokens."""

from __future__ import annotations

import time

import torch

from scaleinfer.config import CacheConfig, ModelConfig, OffloadConfig
from scaleinfer.layers.attention import Attention
from scaleinfer.layers.linear import choose_layer_schemes, linear_scheme, quantization_scheme
from scaleinfer.layers.sampler import SamplingBatch, sample
from scaleinfer.models.registry import model_class
from scaleinfer.offload.kv_host import HostKVCache
from scaleinfer.outputs import RunnerOutput, ScheduledSequence, SchedulerOutput
from scaleinfer.parallel.comm import min_over_ranks
from scaleinfer.parallel.expert import get_expert_state, using_expert_state
from scaleinfer.parallel.state import get_parallel_state, using_parallel_state
from scaleinfer.sampling_params import SamplingParams
from scaleinfer.weights.dummy import init_dummy_weights
from scaleinfer.weights.source import ModelSource
from scaleinfer.worker.cuda_graph import DecodeGraphs, capture_sizes
from scaleinfer.worker.device import default_dtype, resolve_device, resolve_dtype
from scaleinfer.worker.kv_cache import (
    allocate_kv_cache,
    block_bytes,
    kv_cache_dtype,
    num_blocks_for,
    num_host_blocks_for,
)
from scaleinfer.worker.prompt_logprobs import compute_prompt_logprobs
from scaleinfer.worker.sampling_batch import SamplingState
from scaleinfer.worker.stage_io import StageIO
from scaleinfer.worker.staging import StagingBuffer
from scaleinfer.worker.step_ahead import HostTokens, LaunchedStep, StepAhead, may_step_ahead
from scaleinfer.worker.step_forward import EagerForward, GraphedForward


class ModelRunner:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, source: ModelSource,
                 max_model_len: int | None = None, max_num_seqs: int = 256, progress: bool = True,
                 offload_config: OffloadConfig | None = None) -> None:
        # The groups this runner is built in (its shard, its stage), set again around each of its steps.
        self.parallel_state, self.expert_state = get_parallel_state(), get_expert_state()
        self.device = resolve_device(model_config)
        self.offload = offload_config or OffloadConfig()
        self.streamer = None  # the layer streamer when weights are offloaded
        self.dtype = resolve_dtype(model_config, self.device)
        self.block_size = cache_config.block_size
        start = time.perf_counter()
        self.model = self._load_model(source, model_config, progress)
        self.load_seconds = time.perf_counter() - start
        self.num_blocks = self._init_kv_cache(cache_config)
        self.sampling = SamplingState(self.device, model_config.seed)
        self.staging = StagingBuffer(self.device)  # the step's inputs: one pinned copy per step
        io = StageIO(self.model, self.dtype, self.device)  # hidden states from the previous stage, to the next
        self.steps = EagerForward(self.model, self.block_size, self.device, self.staging, io)
        self.ahead: StepAhead | None = None  # the decode step launched before the host had the last one's tokens
        self.step_ahead_counts = {"launched": 0, "taken": 0}
        # Streamed layers rebind their weights every step, which a captured graph cannot follow.
        if self.device.type == "cuda" and not model_config.enforce_eager and not self.offload.enabled:
            max_blocks = -(-(max_model_len or source.arch.max_position_embeddings) // self.block_size)
            sizes = capture_sizes(max_num_seqs)
            graphs = DecodeGraphs(self.model, sizes, max_blocks, self.num_blocks, self.block_size, self.device,
                                  hidden_in=io.input_buffer(sizes[-1]))
            graphs.capture()
            self.use_graphs(graphs)
        self.warm_up_seconds = self._warm_up() if self.device.type == "cuda" and not self.offload.enabled else 0.0

    def use_graphs(self, graphs: DecodeGraphs) -> None:
        """Run decode steps through these (captured) graphs from now on."""
        self.steps = GraphedForward(self.model, self.block_size, self.device, self.staging, self.steps.io, graphs)

    @property
    def graphs(self) -> DecodeGraphs | None:
        return self.steps.graphs if isinstance(self.steps, GraphedForward) else None

    def _warm_up(self) -> float:
        """One unsampled prefill of a block of tokens into the scratch block: the prefill kernels compile now,
        not on the first request (the decode kernels compiled while the graphs were captured)."""
        start = time.perf_counter()
        chunk = ScheduledSequence("warm-up", [0] * self.block_size, 0, [self.num_blocks], False, SamplingParams())
        self.execute(SchedulerOutput([chunk]))
        torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def describe(self) -> dict[str, object]:
        """Start-up facts for logs and benchmark records."""
        graphs = self.graphs
        return {"device": str(self.device), "dtype": str(self.dtype), "num_blocks": self.num_blocks,
                "block_size": self.block_size, "load_seconds": self.load_seconds,
                "cuda_graph_sizes": graphs.sizes if graphs else [],
                "cuda_graph_context_buckets": graphs.bucket_tokens if graphs else [],
                "cuda_graph_capture_seconds": graphs.capture_seconds if graphs else 0.0,
                "cuda_graph_replays": graphs.num_replays if graphs else 0,
                "decode_steps_ahead": dict(self.step_ahead_counts),
                "warm_up_seconds": self.warm_up_seconds,
                "offload": self.streamer.describe() if self.streamer else None}

    def _load_model(self, source: ModelSource, config: ModelConfig, progress: bool) -> torch.nn.Module:
        if self.offload.enabled:
            from scaleinfer.offload.loader import build_offloaded_model

            model, self.streamer = build_offloaded_model(source, config, self.offload, self.device, self.dtype,
                                                         progress)
            return model.eval()
        scheme = quantization_scheme(config.quantization, source.quant)
        with default_dtype(self.dtype), torch.device(self.device), linear_scheme(scheme):
            model = model_class(source.arch)(source.arch)
            choose_layer_schemes(model, scheme)
        if config.load_format == "dummy":
            init_dummy_weights(model, config.seed)
        else:
            model.load_weights(source.iter_weights(self.dtype, progress=progress))
        return model.eval()

    def _init_kv_cache(self, config: CacheConfig) -> int:
        layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        kv_heads, head_dim = layers[0].num_kv_heads, layers[0].head_dim
        dtype = self.kv_dtype = kv_cache_dtype(config, self.dtype)
        per_block = block_bytes(self.model.arch, kv_heads, self.block_size, dtype)
        per_block = per_block * len(layers) // self.model.arch.num_hidden_layers  # a pipeline stage: its layers'
        num_blocks = min_over_ranks(num_blocks_for(config, per_block, self.device))  # every rank holds as many
        num_host_blocks = min_over_ranks(num_host_blocks_for(config, per_block))
        # One block more than the scheduler sees: the scratch block that padded graph rows write to.
        caches = allocate_kv_cache(
            len(layers), num_blocks + 1, self.block_size, kv_heads, head_dim, dtype, self.device
        )
        for layer, (k_cache, v_cache) in zip(layers, caches):
            layer.bind_kv_cache(k_cache, v_cache)
        self.kv_host = HostKVCache(caches, num_host_blocks, self.device)  # its share of the same host blocks
        return num_blocks

    def execute(self, output: SchedulerOutput) -> RunnerOutput:
        return self.complete(self.launch(output))

    def launch(self, output: SchedulerOutput) -> LaunchedStep:
        """Queue the step's work on the device and return without waiting for its tokens; complete() waits.
        Nothing else may run on this runner in between (the host may do its own work meanwhile)."""
        with using_parallel_state(self.parallel_state), using_expert_state(self.expert_state):
            return self._launch(output)

    def complete(self, launched: LaunchedStep) -> RunnerOutput:
        """The launched step's tokens, once they reach the host."""
        if launched.host is None:
            return RunnerOutput(sampled={}, prompt_logprobs=launched.prompt_logprobs)
        tokens = launched.host.wait()  # the device goes on with a step launched ahead meanwhile
        self.steps.sampled_on_host([t.token_id for t in tokens])
        failed = launched.failed  # rows whose sampling state could not be built: no token, their requests fail
        sampled = {s.request_id: t for s, t in zip(launched.sampled, tokens) if s.request_id not in failed}
        return RunnerOutput(sampled=sampled, failed=failed, prompt_logprobs=launched.prompt_logprobs)

    @torch.inference_mode()
    def _launch(self, output: SchedulerOutput) -> LaunchedStep:
        self.sampling.drop(output.finished_request_ids)
        self.kv_host.swap(output.swap_out, output.swap_in)  # ordered before the forward below
        ahead, self.ahead = self.ahead, None
        if not output.scheduled:
            self.steps.skip()
            return LaunchedStep()
        prompt_logprobs: dict = {}
        if ahead is not None and self.steps.adopt(ahead.prepared, output.scheduled):
            sampled, batch, result, host = output.scheduled, ahead.batch, ahead.result, ahead.host
            self.step_ahead_counts["taken"] += 1
        else:
            hidden, sampled = self.steps.run(output)  # hidden: [num_sampled, hidden]
            # (a pipeline stage before the last has no head: the last one scores the prompt)
            scores_prompt = self.model.stage.is_last and any(
                s.sampling_params.prompt_logprobs is not None for s in output.scheduled)
            prompt_logprobs = compute_prompt_logprobs(self.model, self.steps.hidden, output) if scores_prompt else {}
            if not sampled:
                return LaunchedStep(prompt_logprobs=prompt_logprobs)
            logits = self.model.compute_logits(hidden)  # [num_sampled, vocab]
            batch = self.sampling.batch(sampled, logits.shape[1], output.grammar_bitmask)
            result = sample(logits, batch, self.sampling.default_generator)
            self.sampling.record(batch, result.token_ids)
            host = HostTokens(result)  # the copy is queued before the step launched ahead below
        self.steps.sampled_on_device(sampled, result.token_ids)
        if output.step_ahead and may_step_ahead(sampled, batch):
            self.ahead = self._step_ahead(batch)
        return LaunchedStep(sampled=sampled, host=host, failed=batch.failed, prompt_logprobs=prompt_logprobs)

    def _step_ahead(self, batch: SamplingBatch) -> StepAhead | None:
        """The prepared next decode step, replayed and sampled now with this step's sampling rows; None when
        no step is prepared (the runner has no graphs, a row's next slot needs a new block) or none holds it."""
        launched = self.steps.replay_ahead()
        if launched is None:
            return None
        prepared, hidden = launched
        result = sample(self.model.compute_logits(hidden), batch, self.sampling.default_generator)
        self.step_ahead_counts["launched"] += 1
        return StepAhead(prepared=prepared, batch=batch, result=result, host=HostTokens(result))
