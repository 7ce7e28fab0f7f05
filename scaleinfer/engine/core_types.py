"""What crosses between the front (tokenize, detokenize, stop strings, outputs) and the engine core (scheduler +
executor): token ids and small structs, encoded with msgspec. No tensor and no pickle ever crosses.

front -> core: EngineCoreRequest (a tokenized request), AbortRequests, Shutdown.
core -> front: CoreReady once, then EngineCoreOutputs after every step (and after commands that changed
the queues), or CoreFailed once if the core loop died.

SamplingParams travels as itself (a dataclass msgspec encodes field by field), so a field added to it
crosses without this file changing.
"""

from __future__ import annotations

import msgspec

from scaleinfer.engine.prompt_logprobs import PromptLogprobs
from scaleinfer.sampling_params import SamplingParams

# Why a request failed in the core; the front raises the matching exception.
ERROR_INVALID, ERROR_QUEUE_FULL, ERROR_FAILED = "invalid", "queue_full", "failed"


class EngineCoreRequest(msgspec.Struct, tag="add", array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float  # time.time() at the front


class AbortRequests(msgspec.Struct, tag="abort", array_like=True):
    request_ids: list[str]  # every sequence of these requests
    sequences: list[tuple[str, int]] = []  # (request id, sequence index): one sequence, e.g. a stop string hit


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    pass


CoreCommand = EngineCoreRequest | AbortRequests | Shutdown


class SampledLogprobs(msgspec.Struct, array_like=True):
    """The logprob of one sampled token, its rank, and the top alternatives (ids and logprobs, best first)."""

    logprob: float
    rank: int
    top_token_ids: list[int]
    top_logprobs: list[float]


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """What one sequence of a request gained in one step."""

    request_id: str
    index: int  # the sequence's index in its request (0..n-1)
    new_token_ids: list[int]
    new_logprobs: list[SampledLogprobs] | None = None  # one per new token, when logprobs were asked for
    finish_reason: str | None = None  # "stop" (eos or a stop token id) | "length"; the front adds stop strings
    stop_reason: int | None = None  # the stop token id that finished it
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at its first admission
    queue_time_s: float | None = None  # on a sequence's first output: arrival to first scheduled
    error: str | None = None  # the whole request failed in the core (finished); error_kind says how
    error_kind: str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # with a request's first token, when it asked for them

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class EngineStats(msgspec.Struct, array_like=True):
    num_running: int = 0
    num_waiting: int = 0
    num_blocks: int = 0
    num_used_blocks: int = 0
    kv_cache_usage: float = 0.0  # 0..1
    prefix_cache_hit_rate: float = 0.0  # 0..1, over all prompt tokens looked up
    num_preempted: int = 0
    num_prompt_tokens: int = 0  # totals since start: prompt tokens of requests added
    num_prompt_tokens_computed: int = 0  # prompt positions run through the model (recomputation included)
    num_prompt_tokens_cached: int = 0  # prompt positions served from the prefix cache
    num_generation_tokens: int = 0
    num_swapped: int = 0  # of num_preempted, by swapping the KV to host memory (kv_offload), not recomputed
    num_host_blocks: int = 0  # KV blocks in host memory (kv_offload)
    host_kv_cache_usage: float = 0.0  # 0..1 of those


class EngineCoreOutputs(msgspec.Struct, tag="outputs", array_like=True):
    outputs: list[EngineCoreOutput]
    stats: EngineStats
    step_time_s: float | None = None  # None when no step ran (the queues changed by a command)


class CoreReady(msgspec.Struct, tag="ready", array_like=True):
    max_model_len: int
    num_blocks: int
    block_size: int
    vocab_size: int
    eos_token_ids: list[int]


class CoreFailed(msgspec.Struct, tag="failed", array_like=True):
    message: str  # the exception that ended the core loop, named


CoreMessage = EngineCoreOutputs | CoreReady | CoreFailed

command_encoder = msgspec.msgpack.Encoder()
command_decoder = msgspec.msgpack.Decoder(CoreCommand)
message_encoder = msgspec.msgpack.Encoder()
message_decoder = msgspec.msgpack.Decoder(CoreMessage)
