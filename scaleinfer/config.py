"""Configuration: one dataclass per concern, validated on construction, composed into EngineConfig.

This is the only module that reads environment variables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from scaleinfer.errors import InvalidRequestError

DTYPES = ("auto", "float32", "bfloat16", "float16")
LOAD_FORMATS = ("auto", "dummy")
OFFLOAD_TARGETS = ("none", "cpu", "nvme")
PIPELINE_SCHEDULES = ("hybrid", "fixed")  # parallel/pipeline.py states the rule of each
QUANTIZATIONS = (None, "int8", "int4", "fp8", "gguf")  # None: weights in the run dtype; int8: per-output-channel
# weight-only, on load; int4: group-wise weight-only, on load; gguf: a GGUF file's Q4_0/Q4_1/Q4_K weights kept as int4
# and its Q8_0 ones as int8 in groups of 32 on a GPU, per linear (other types dequantized)
# auto: the KV cache in the run dtype; fp8 (= fp8_e4m3, vLLM's spelling too): e4m3 with a scale per layer
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
KV_OFFLOAD_TARGETS = ("none", "cpu")  # CacheConfig.kv_offload: a second tier of KV blocks in host memory
# Swap-or-recompute rates (CacheConfig.kv_offload_h2d_gb_s / kv_offload_tflop_s) when unset, by device: a GPU's are
# an H200's as bench/common.py measures them (pinned host-to-device 53-55 GB/s, bf16 matmul 745-775 TFLOP/s), a
# CPU's a memcpy and a many-core fp32 matmul. Only their ratio decides, and models of a few billion parameters
# and up swap on either.
KV_OFFLOAD_RATES = {"cuda": (50.0, 700.0), "cpu": (10.0, 1.0)}  # device type -> (GB/s, TFLOP/s)
# With streamed weights a step costs one pass over the weights whatever its size: fill it, in large prefill
# chunks and with as many sequences as the KV cache holds.
OFFLOAD_MAX_BATCHED_TOKENS = 32768
OFFLOAD_MAX_NUM_SEQS = 1024
EMBEDDED_MODEL_ALIAS = "smollm2-135m"
MOE_ALL_TO_ALL = ("coordinated", "plain")  # ParallelConfig.moe_all_to_all


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message)


@dataclass(slots=True)
class ArchConfig:
    """The shape of a decoder model, read from an HF config.json or GGUF metadata."""

    architecture: str  # HF name, e.g. "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k, v (Qwen2)
    layer_norm_eps: float = 1e-5  # LayerNorm families (GPT-2, GPT-NeoX)
    hidden_act: str = "silu"
    partial_rotary_factor: float = 1.0  # GPT-NeoX: rotary on the first head_dim * factor dims only
    use_parallel_residual: bool = False  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
    do_layer_norm_before: bool = True  # OPT-350m: False, LayerNorm after each residual add (post-LN)
    word_embed_proj_dim: int | None = None  # OPT-350m: embeddings narrower than hidden, projected in and out
    # Gemma 2/3: attention scale query_pre_attn_scalar**-0.5 (else head_dim's); sliding_window on the layers
    # layer_types names "sliding_attention" (the others "full_attention"; () = all full), their rope base
    # rope_local_theta (Gemma 3; else rope_theta); scores and final logits soft-capped at cap * tanh(x / cap).
    query_pre_attn_scalar: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    rope_local_theta: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    # Mixture of experts (Mixtral): each MLP is num_local_experts experts, each token routed to the top
    # num_experts_per_tok of them; None / 0 for a dense MLP.
    num_local_experts: int | None = None
    num_experts_per_tok: int = 0
    # Qwen-MoE: experts moe_intermediate_size wide (None: intermediate_size, Mixtral), the top-k weights
    # renormalized to sum to 1 only with norm_topk_prob (Mixtral always), a shared expert of
    # shared_expert_intermediate_size (0: none) beside the routed ones; layer i is sparse unless it is in
    # mlp_only_layers or (i + 1) is not a multiple of decoder_sparse_step (then a dense intermediate_size MLP).
    moe_intermediate_size: int | None = None
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, f"model config {name} must be a positive int, got {value!r}")
        _require(self.num_attention_heads % self.num_key_value_heads == 0,
                 f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                 f"num_key_value_heads={self.num_key_value_heads}")
        _require(not self.layer_types or len(self.layer_types) == self.num_hidden_layers,
                 f"model config layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        _require(self.num_local_experts is None or 0 < self.num_experts_per_tok <= self.num_local_experts,
                 f"model config num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_local_experts="
                 f"{self.num_local_experts}]")
        _require(self.decoder_sparse_step >= 1,
                 f"model config decoder_sparse_step must be >= 1, got {self.decoder_sparse_step!r}")

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer `layer`'s MLP is the sparse mixture of experts (HF Qwen2-MoE's rule; Mixtral: every one)."""
        return (bool(self.num_local_experts) and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    @property
    def expert_intermediate_size(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def layer_window(self, layer: int) -> int | None:
        """The sliding window layer `layer` attends within (None: all earlier tokens)."""
        sliding = self.layer_types and self.layer_types[layer] == "sliding_attention"
        return self.sliding_window if sliding else None

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


@dataclass(slots=True)
class ModelConfig:
    model: str = EMBEDDED_MODEL_ALIAS  # HF-style folder, .gguf file, or the alias
    tokenizer: str | None = None  # a folder to load the tokenizer from; None: the model's
    chat_template: str | None = None  # a file path or a Jinja template string; None: the tokenizer's
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    max_model_len: int | None = None  # None: the model's own context
    seed: int = 0
    load_format: str = "auto"  # auto: the checkpoint; dummy: random weights from config.json (benchmarks)
    skip_tokenizer_init: bool = False  # token ids in and out, no text (models without a tokenizer)
    enforce_eager: bool = False  # GPU: no CUDA graphs for decode steps
    quantization: str | None = None  # one of QUANTIZATIONS: the parallel linears' weights quantized as they load
    # CPU threads of each process; None: on CPU ranks, the physical cores others leave free, shared among the
    # ranks (executor/cpu_threads.py); on GPUs torch's default
    num_threads: int | None = None

    def __post_init__(self) -> None:
        _require(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        _require(self.load_format in LOAD_FORMATS,
                 f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        ok = self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")
        _require(ok, f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        _require(self.max_model_len is None or self.max_model_len > 0,
                 f"max_model_len must be positive, got {self.max_model_len!r}")
        _require(self.num_threads is None or (isinstance(self.num_threads, int) and self.num_threads >= 1),
                 f"num_threads must be an integer >= 1, got {self.num_threads!r}")
        _require(self.quantization in QUANTIZATIONS,
                 f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")


@dataclass(slots=True)
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    kv_cache_memory: int | None = None  # bytes; None: memory_fraction of free device memory
    memory_fraction: float = 0.9  # of the device memory left after the weights (GPU), of free RAM (CPU)
    enable_prefix_caching: bool = True
    num_blocks: int | None = None  # overrides both budgets (tests)
    kv_cache_dtype: str = "auto"  # one of KV_CACHE_DTYPES
    # kv_offload="cpu": kv_offload_memory bytes (per rank) of host memory, page-locked on a GPU, hold KV blocks that
    # preempted sequences swap out (instead of recomputing them later) and that the prefix cache evicts (a later hit
    # swaps them back in). The scheduler swaps when the swap-in bytes at kv_offload_h2d_gb_s take less time than
    # recomputing the tokens at kv_offload_tflop_s (unset: KV_OFFLOAD_RATES of the device; a benchmark sets measured
    # ones).
    kv_offload: str = "none"
    kv_offload_memory: int | None = None
    kv_offload_h2d_gb_s: float | None = None
    kv_offload_tflop_s: float | None = None

    def __post_init__(self) -> None:
        _require(self.kv_cache_dtype in KV_CACHE_DTYPES,
                 f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        _require(self.block_size > 0 and self.block_size & (self.block_size - 1) == 0,
                 f"block_size must be a power of two, got {self.block_size!r}")
        _require(self.kv_cache_memory is None or self.kv_cache_memory > 0,
                 f"kv_cache_memory must be positive bytes, got {self.kv_cache_memory!r}")
        _require(0 < self.memory_fraction <= 1, f"memory_fraction must be in (0, 1], got {self.memory_fraction!r}")
        _require(self.num_blocks is None or self.num_blocks > 0,
                 f"num_blocks must be positive, got {self.num_blocks!r}")
        self._check_kv_offload()

    def _check_kv_offload(self) -> None:
        offload, memory = self.kv_offload, self.kv_offload_memory
        _require(offload in KV_OFFLOAD_TARGETS, f"kv_offload must be one of {KV_OFFLOAD_TARGETS}, got {offload!r}")
        _require(memory is None or (isinstance(memory, int) and not isinstance(memory, bool) and memory > 0),
                 f"kv_offload_memory must be positive bytes, got {memory!r}")
        _require(offload == "none" or memory is not None,
                 "kv_offload='cpu' needs kv_offload_memory, the bytes of host memory for KV blocks")
        for name in ("kv_offload_memory", "kv_offload_h2d_gb_s", "kv_offload_tflop_s"):
            value = getattr(self, name)
            _require(value is None or offload != "none",
                     f"{name}={value!r} is only used with kv_offload='cpu', got kv_offload='none'")
        for name in ("kv_offload_h2d_gb_s", "kv_offload_tflop_s"):
            value = getattr(self, name)
            _require(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0),
                     f"{name} must be a positive rate, got {value!r}")


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 256  # sequences in one step
    max_num_batched_tokens: int = 2048  # token budget of one step; prefills are chunked to fit
    # Prompt (prefill) tokens a step may carry while a sequence decodes: every decoding stream waits through the
    # step, whose time grows with its prompt tokens, so this bounds the inter-token latency's tail. The smaller
    # of it and max_num_batched_tokens applies; a step with no decodes prefills with the whole budget. 512: on an
    # H200 serving the 8B shape to 128 streams, 1,024 left inter-token p99 at 5.1x p50 and 512 at 3.8x, with
    # more output tok/s, not less (bench/results/serve_load-llama3-8b-h200-20261203-084657/-084812.json).
    max_mixed_prefill_tokens: int = 512
    max_model_len: int = 8192  # set from the model once it is known
    max_waiting: int | None = None  # admission bound on queued sequences (n per prompt); None: unbounded

    def __post_init__(self) -> None:
        _require(self.max_num_seqs > 0, f"max_num_seqs must be positive, got {self.max_num_seqs!r}")
        _require(self.max_num_batched_tokens > 0,
                 f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens!r}")
        mixed = self.max_mixed_prefill_tokens
        _require(isinstance(mixed, int) and not isinstance(mixed, bool) and mixed >= 1,
                 f"max_mixed_prefill_tokens must be an integer >= 1, got {mixed!r}")
        _require(self.max_waiting is None or self.max_waiting >= 1,
                 f"max_waiting must be at least 1 (a queue of {self.max_waiting!r} refuses every request); "
                 "leave it unset for no bound")


@dataclass(slots=True)
class OffloadConfig:
    """ZeRO-Inference: decoder-layer weights live in host memory ("cpu") or in files ("nvme") and are streamed
    to the device a layer ahead of the compute; embeddings, final norm and LM head stay resident."""

    offload: str = "none"  # none | cpu | nvme
    offload_path: str | None = None  # nvme: a folder; the layer files go in a fresh subfolder, removed at exit
    offload_gpu_budget: int | None = None  # bytes of device memory for streamed layers; None: two layers
    offload_num_readers: int = 8  # nvme: threads reading a layer's 16 MB blocks in parallel

    def __post_init__(self) -> None:
        _require(self.offload in OFFLOAD_TARGETS, f"offload must be one of {OFFLOAD_TARGETS}, got {self.offload!r}")
        _require(self.offload != "nvme" or bool(self.offload_path),
                 "offload='nvme' needs offload_path, the folder for the layer files")
        _require(self.offload_path is None or self.offload == "nvme",
                 f"offload_path={self.offload_path!r} is only used with offload='nvme', got offload={self.offload!r}")
        _require(self.offload_gpu_budget is None or self.offload_gpu_budget > 0,
                 f"offload_gpu_budget must be positive bytes, got {self.offload_gpu_budget!r}")
        _require(self.offload_gpu_budget is None or self.enabled,
                 f"offload_gpu_budget={self.offload_gpu_budget} is the device memory of streamed layers; it needs "
                 "offload='cpu' or 'nvme' (--offload), got offload='none'")
        _require(self.offload_num_readers > 0,
                 f"offload_num_readers must be positive, got {self.offload_num_readers!r}")

    @property
    def enabled(self) -> bool:
        return self.offload != "none"


@dataclass(slots=True)
class ParallelConfig:
    """How many processes run one model. tensor_parallel_size T: every layer is split over T ranks (one per GPU;
    on a machine without one, T CPU processes over gloo) that step together."""

    tensor_parallel_size: int = 1
    # P stages of contiguous layers, each over T ranks (world T x P, rank = tp_rank + T * pp_rank); the engine
    # keeps micro-batches in flight by the schedule (parallel/pipeline.py states the rule): "hybrid" (P in the
    # token phase, 2P smaller ones in the prompt phase) or "fixed" (pipeline_micro_batches, default P, always).
    pipeline_parallel_size: int = 1
    pipeline_schedule: str = "hybrid"
    pipeline_micro_batches: int | None = None
    # Mixture-of-experts layers: the experts split over expert_parallel_size E groups of ranks inside the
    # T tensor-parallel ranks, each expert sliced over the T / E ranks of its group; tokens reach their experts
    # by all-to-all, "coordinated" (each rank of a slicing group sends its 1/(T/E) share, an all-gather restores
    # the rest: the paper's PCC) or "plain" (every rank sends all its group's tokens). Attention and dense layers
    # stay sliced over all T ranks.
    expert_parallel_size: int = 1
    moe_all_to_all: str = "coordinated"
    # How long a rank waits inside one collective of a step before the run is declared hung; the engine then
    # names the rank that did not arrive and stops (a worker that dies is reported at once). Across pipeline
    # stages, which wait on whole steps of the stages before them, a stage waits P times this for the previous
    # stage's hidden states and rank 0 P + 1 times it for a micro-batch's tokens (executor/pipeline.py).
    collective_timeout: float = 30.0

    def __post_init__(self) -> None:
        size = self.tensor_parallel_size
        _require(isinstance(size, int) and not isinstance(size, bool) and size >= 1,
                 f"tensor_parallel_size must be an integer >= 1, got {size!r}")
        _require(self.collective_timeout > 0, f"collective_timeout must be positive seconds, got "
                                              f"{self.collective_timeout!r}")
        self._check_pipeline()
        self._check_experts()

    def _check_experts(self) -> None:
        experts, size = self.expert_parallel_size, self.tensor_parallel_size
        _require(isinstance(experts, int) and not isinstance(experts, bool) and experts >= 1,
                 f"expert_parallel_size must be an integer >= 1, got {experts!r}")
        _require(size % experts == 0,
                 f"expert_parallel_size={experts} x the expert-slicing size must equal tensor_parallel_size={size} "
                 f"(the ranks experts are spread over): {experts} does not divide {size}")
        _require(self.moe_all_to_all in MOE_ALL_TO_ALL,
                 f"moe_all_to_all must be one of {MOE_ALL_TO_ALL}, got {self.moe_all_to_all!r}")

    def _check_pipeline(self) -> None:
        size, count = self.pipeline_parallel_size, self.pipeline_micro_batches
        _require(isinstance(size, int) and not isinstance(size, bool) and size >= 1,
                 f"pipeline_parallel_size must be an integer >= 1, got {size!r}")
        _require(self.pipeline_schedule in PIPELINE_SCHEDULES,
                 f"pipeline_schedule must be one of {PIPELINE_SCHEDULES}, got {self.pipeline_schedule!r}")
        _require(count is None or (isinstance(count, int) and count >= 1),
                 f"pipeline_micro_batches must be an integer >= 1, got {count!r}")
        _require(count is None or self.pipeline_schedule == "fixed",
                 f"pipeline_micro_batches={count} is the fixed schedule's count; the hybrid schedule picks its own")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(slots=True, frozen=True)
class TorchrunEnv:
    """This process's place among those torchrun (or any launcher setting the same variables) started."""

    rank: int
    world_size: int
    local_rank: int


def torchrun_env() -> TorchrunEnv | None:
    """The launcher's RANK / WORLD_SIZE / LOCAL_RANK, when this process was started by one with WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or "RANK" not in os.environ:
        return None
    rank = int(os.environ["RANK"])
    return TorchrunEnv(rank=rank, world_size=world_size, local_rank=int(os.environ.get("LOCAL_RANK", rank)))


@dataclass(slots=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Route flat options (as LLM(...) takes them) to the sub-config that owns each field."""
        if kwargs.get("offload", "none") != "none":
            kwargs.setdefault("max_num_batched_tokens", OFFLOAD_MAX_BATCHED_TOKENS)
            kwargs.setdefault("max_num_seqs", OFFLOAD_MAX_NUM_SEQS)
            # Every streamed step passes over all the weights: a prompt split over more steps costs more passes.
            kwargs.setdefault("max_mixed_prefill_tokens", kwargs["max_num_batched_tokens"])
        parts = {}
        sections = (("model", ModelConfig), ("cache", CacheConfig), ("scheduler", SchedulerConfig),
                    ("offload", OffloadConfig), ("parallel", ParallelConfig))
        for name, part in sections:
            owned = {f.name for f in fields(part)} & set(kwargs)
            parts[name] = part(**{key: kwargs.pop(key) for key in owned})
        _require(not kwargs, f"unknown engine options: {sorted(kwargs)}")
        return cls(**parts)


def disable_nvlink_multicast() -> None:
    """NVLink multicast (NVLS) stays off in every process of a multi-GPU run: on the machines we run on it
    hangs or corrupts collectives. Set before the first NCCL or symmetric-memory call; an explicit value stays."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")


def env_str(name: str, default: str | None = None) -> str | None:
    """Read one SCALEINFER_* environment variable (the only place the environment is read)."""
    return os.environ.get(name, default)


def cache_dir() -> Path | None:
    """Where derived files (converted tokenizers) are kept: $SCALEINFER_CACHE_DIR, else
    $XDG_CACHE_HOME/scaleinfer, else ~/.cache/scaleinfer; SCALEINFER_CACHE_DIR="" turns caching off."""
    explicit = os.environ.get("SCALEINFER_CACHE_DIR")
    if explicit is not None:
        return Path(explicit) if explicit else None
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "scaleinfer"
