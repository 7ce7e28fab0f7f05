"""The roofline of a workload as the engine really ran it: for each step, from the scheduled tokens and their
context lengths, the FLOPs it must compute and the bytes it must read; the step cannot take less than the
larger of FLOPs at the matmul peak and bytes at the copy bandwidth, and the workload not less than their sum.

Counted per step (a decoder with grouped-query attention, dense or top-k MoE):
- FLOPs: 2 x the linear weights each token multiplies (q/k/v/o, the MLP or its top-k experts), attention's
  QK^T and PV (4 x heads x head_dim per token per layer per context position attended), and the LM head
  for the rows that sample.
- Bytes: every weight the step touches once, as the model holds it (quantized bytes and scales; one
  embedding row; a MoE step's experts: all of them once the step has enough tokens to route to each, else
  top_k per token, the distinct count assumed), and the KV of every context position each layer attends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class ModelShape:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # of one expert in a MoE
    vocab_size: int
    weight_bytes: float  # what a decode step reads when every expert is used (quantized bytes as held)
    expert_bytes: float = 0.0  # of all experts of all layers (0: dense)
    num_experts: int = 0
    top_k: int = 0
    shared_intermediate_size: int = 0  # a shared expert every token runs (Qwen2-MoE)
    kv_bytes: float = 2.0  # per KV element

    @classmethod
    def from_model(cls, arch, model, kv_bytes: float) -> ModelShape:
        """From scaleinfer's ArchConfig (engine.arch) and its built model (engine.runner.model)."""
        from common import decode_bytes_read

        from scaleinfer.layers.moe import FusedMoE

        experts = sum(p.nbytes for m in model.modules() if isinstance(m, FusedMoE) for p in m.parameters())
        return cls(arch.hidden_size, arch.num_hidden_layers, arch.num_attention_heads, arch.num_key_value_heads,
                   arch.head_dim, arch.expert_intermediate_size if arch.num_local_experts else arch.intermediate_size,
                   arch.vocab_size, decode_bytes_read(model), experts, arch.num_local_experts or 0,
                   arch.num_experts_per_tok or 0, arch.shared_expert_intermediate_size, kv_bytes)

    @property
    def attention_params(self) -> int:
        return self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)

    @property
    def mlp_params_per_token(self) -> int:
        experts = self.top_k if self.num_experts else 1
        return 3 * self.hidden_size * (experts * self.intermediate_size + self.shared_intermediate_size)


@dataclass(slots=True, frozen=True)
class ScheduledChunk:
    num_tokens: int
    context_len: int  # positions attended by the chunk's last token (start_pos + num_tokens)
    sample: bool


def step_cost(shape: ModelShape, chunks: list[ScheduledChunk]) -> tuple[float, float]:
    """(FLOPs, bytes) of one step."""
    tokens = sum(c.num_tokens for c in chunks)
    flops = 2 * tokens * shape.num_layers * (shape.attention_params + shape.mlp_params_per_token)
    attended = sum(_attended_positions(c) for c in chunks)  # (query, key) pairs, summed over chunks
    flops += 4 * shape.num_layers * shape.num_heads * shape.head_dim * attended
    flops += 2 * sum(c.sample for c in chunks) * shape.hidden_size * shape.vocab_size
    unread = 1 - min(shape.num_experts, tokens * shape.top_k) / shape.num_experts if shape.num_experts else 0
    weights = shape.weight_bytes - unread * shape.expert_bytes
    kv_per_position = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * shape.kv_bytes
    return flops, weights + kv_per_position * sum(c.context_len for c in chunks)


def _attended_positions(chunk: ScheduledChunk) -> int:
    """Causal: the chunk's i-th token (of n, ending at context_len) attends context_len - n + i + 1 positions."""
    n, end = chunk.num_tokens, chunk.context_len
    return n * (end - n) + n * (n + 1) // 2


def roofline_seconds(shape: ModelShape, steps: list[list[ScheduledChunk]], matmul_flop_s: float,
                     copy_bytes_s: float) -> dict[str, float]:
    """The workload's floor and what bounds it: sum over steps of max(compute time, memory time)."""
    compute = memory = floor = 0.0
    for chunks in steps:
        flops, nbytes = step_cost(shape, chunks)
        compute, memory = compute + flops / matmul_flop_s, memory + nbytes / copy_bytes_s
        floor += max(flops / matmul_flop_s, nbytes / copy_bytes_s)
    return {"roofline_s": floor, "compute_bound_s": compute, "memory_bound_s": memory, "num_steps": len(steps)}


@contextmanager
def recorded_steps(llm) -> Iterator[list[list[ScheduledChunk]]]:
    """Every step the engine core schedules while inside (its micro-batches under PP), as chunks."""
    core, steps = llm.engine.core, []
    schedule = core._schedule

    def recorded():
        output = schedule()
        if output.scheduled:
            steps.append([ScheduledChunk(s.num_tokens, s.start_pos + s.num_tokens, s.sample) for s in output.scheduled])
        return output

    core._schedule = recorded
    try:
        yield steps
    finally:
        core._schedule = schedule
