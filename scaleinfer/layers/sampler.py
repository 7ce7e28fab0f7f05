"""Sampling on the device: grammar bitmasks (structured outputs), logit bias, penalties, greedy, temperature,
min-p, top-k, top-p, per-request seeds, logprobs.

Random rows use the exponential race: argmax(p / q) with q ~ Exp(1) draws a token with probability p.
A seeded request draws q from its own generator, so its tokens do not depend on the rest of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from scaleinfer.kernels import token_bitmask

NEG_INF = float("-inf")


@dataclass(slots=True)
class PenaltyBatch:
    """The rows of a step with presence, frequency or repetition penalties, and their token statistics."""

    rows: torch.Tensor  # [num_penalized] int64: rows of the logits
    slots: torch.Tensor  # [num_penalized] int64: their rows in the buffers of the worker's PenaltyState
    output_counts: torch.Tensor  # [num_penalized, vocab] int32: occurrences among the generated tokens
    prompt_mask: torch.Tensor  # [num_penalized, vocab] bool: in the prompt
    presence: torch.Tensor  # [num_penalized] float32
    frequency: torch.Tensor  # [num_penalized] float32
    repetition: torch.Tensor  # [num_penalized] float32, 1 = off


@dataclass(slots=True)
class LogitBias:
    """Flat (row, token, bias) triples: logits[rows[i], token_ids[i]] += biases[i]."""

    rows: torch.Tensor  # [num_biases] int64
    token_ids: torch.Tensor  # [num_biases] int64
    biases: torch.Tensor  # [num_biases] float32


@dataclass(slots=True)
class TokenBitmask:
    """The rows a grammar constrains this step and the tokens each allows (structured outputs)."""

    rows: torch.Tensor  # [num_masked] int64: rows of the logits
    words: torch.Tensor  # [num_masked, num_words] int32: bit j of word w set <=> token 32 * w + j is allowed


@dataclass(slots=True)
class SamplingBatch:
    """Per-row parameters of one step, each [num_seqs] on the logits' device (None when unused)."""

    temperatures: torch.Tensor | None  # float32, 0 means greedy; None when every row is greedy
    top_ps: torch.Tensor | None  # float32, None when every row has top_p == 1
    top_ks: torch.Tensor | None  # int64 in [1, vocab], None when no row uses top-k
    generators: list[torch.Generator | None]  # per row: its own (seeded) generator, or None
    banned: LogitBias | None  # (row, token) pairs masked this step (eos before min_tokens), biases -inf
    num_logprobs: int  # max requested top logprobs over rows, -1 when no row asked
    all_greedy: bool  # argmax only: temperatures, top_ps, top_ks and generators are not read
    penalties: PenaltyBatch | None = None  # None when no row has a penalty
    logit_bias: LogitBias | None = None  # None when no row has a logit bias
    # Rows whose parameters could not be built (request id -> why): sampled as greedy rows with nothing
    # applied, their tokens meant to be thrown away.
    failed: dict[str, str] = field(default_factory=dict)
    min_ps: torch.Tensor | None = None  # float32 in [0, 1], 0 = off; None when no row uses min-p
    allowed: TokenBitmask | None = None  # None when no row is constrained by a grammar


@dataclass(slots=True)
class SamplerOutput:
    token_ids: torch.Tensor  # [num_seqs] int64
    logprobs: torch.Tensor | None  # [num_seqs] float32, of the sampled tokens
    ranks: torch.Tensor | None  # [num_seqs] int64, 1 = most likely
    top_ids: torch.Tensor | None  # [num_seqs, num_logprobs]
    top_logprobs: torch.Tensor | None  # [num_seqs, num_logprobs]


def sample(logits: torch.Tensor, batch: SamplingBatch, default_generator: torch.Generator | None) -> SamplerOutput:
    """logits: [num_seqs, vocab] float32, modified in place by grammar masks, bans, biases and penalties."""
    if batch.allowed is not None:  # first: the -inf it leaves stays -inf through biases and penalties
        apply_token_bitmask(logits, batch.allowed)
    for bias in (batch.banned, batch.logit_bias):  # a ban's -inf stays -inf whatever bias is added
        if bias is not None:
            logits.index_put_((bias.rows, bias.token_ids), bias.biases, accumulate=True)
    if batch.penalties is not None:
        logits[batch.penalties.rows] = apply_penalties(logits[batch.penalties.rows], batch.penalties)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if batch.num_logprobs >= 0 else None
    token_ids = logits.argmax(dim=-1)
    if not batch.all_greedy:
        sampled = _sample_random(logits, batch, default_generator)
        token_ids = torch.where(batch.temperatures == 0, token_ids, sampled)
    if raw_logprobs is None:
        return SamplerOutput(token_ids, None, None, None, None)
    return _with_logprobs(token_ids, raw_logprobs, batch.num_logprobs)


def apply_token_bitmask(logits: torch.Tensor, bitmask: TokenBitmask) -> None:
    """Set to -inf, in place, the logits of the tokens bitmask's rows do not allow. logits: [num_seqs, vocab];
    a vocab past the bitmask's 32 * num_words tokens (a padded LM head) is not allowed either. One kernel on
    the GPU (kernels/token_bitmask.py), its torch reference elsewhere."""
    token_bitmask.apply_token_bitmask(logits, bitmask.rows, bitmask.words)


def apply_penalties(logits: torch.Tensor, penalties: PenaltyBatch) -> torch.Tensor:
    """logits: [num_penalized, vocab]. Repetition first (vLLM's order), then frequency and presence."""
    counts = penalties.output_counts
    generated = counts > 0
    repetition = penalties.repetition.unsqueeze(1)
    penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(generated | penalties.prompt_mask, penalized, logits)
    logits = logits - penalties.frequency.unsqueeze(1) * counts
    return logits - penalties.presence.unsqueeze(1) * generated


def _sample_random(
    logits: torch.Tensor, batch: SamplingBatch, default_generator: torch.Generator | None
) -> torch.Tensor:
    temps = torch.where(batch.temperatures == 0, 1.0, batch.temperatures)
    logits = logits / temps.unsqueeze(1)
    if batch.min_ps is not None:  # before top-k/top-p, as vLLM
        logits = _apply_min_p(logits, batch.min_ps)
    if batch.top_ks is not None or batch.top_ps is not None:
        logits = _apply_top_k_top_p(logits, batch.top_ks, batch.top_ps)
    probs = torch.softmax(logits, dim=-1)
    noise = _exponential_noise(probs, batch.generators, default_generator)
    return (probs / noise).argmax(dim=-1)


def _apply_min_p(logits: torch.Tensor, min_ps: torch.Tensor) -> torch.Tensor:
    """Drop the tokens less likely than min_p times the most likely one; the most likely always stays."""
    probs = logits.softmax(dim=-1)  # [num_seqs, vocab]
    threshold = min_ps.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, NEG_INF)


def _apply_top_k_top_p(logits: torch.Tensor, top_ks: torch.Tensor | None, top_ps: torch.Tensor | None) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)  # [1, vocab]
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_ks is not None:
        drop |= rank >= top_ks.unsqueeze(1)
    if top_ps is not None:
        probs = sorted_logits.masked_fill(drop, NEG_INF).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # the most likely token is always kept
        drop |= mass_before >= top_ps.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, NEG_INF)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _exponential_noise(
    probs: torch.Tensor, generators: list[torch.Generator | None], default_generator: torch.Generator | None
) -> torch.Tensor:
    noise = torch.empty_like(probs).exponential_(generator=default_generator)
    for row, gen in enumerate(generators):
        if gen is not None:
            noise[row].exponential_(generator=gen)
    return noise


def _with_logprobs(token_ids: torch.Tensor, logprobs: torch.Tensor, num_top: int) -> SamplerOutput:
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))  # [num_seqs, 1]
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    top_logprobs, top_ids = logprobs.topk(num_top, dim=-1) if num_top > 0 else (None, None)
    return SamplerOutput(token_ids, chosen.squeeze(1), ranks, top_ids, top_logprobs)
