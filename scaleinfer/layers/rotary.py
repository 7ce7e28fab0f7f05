"""Rotary position embedding tables (the rotate-half layout HF Llama uses), with Llama 3.1, linear and
Phi-3 LongRoPE scaling.

The rotation itself is fused with the KV-cache write: kernels/rotary_kv.py.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from scaleinfer.errors import ModelLoadError


class RotaryEmbedding(nn.Module):
    """cos_cache, sin_cache: [max_position, rotary_dim / 2] float32, indexed by position (LongRoPE: twice as
    many rows, the long-context rates in the second half).

    rotary_dim is head_dim, or fewer (GPT-NeoX partial rotary: only the first rotary_dim dims turn).
    """

    def __init__(self, head_dim: int, max_position: int, base: float, scaling: dict[str, Any] | None) -> None:
        super().__init__()
        self.head_dim = self.rotary_dim = head_dim
        positions = torch.arange(max_position, dtype=torch.float32)
        if _rope_type(scaling) == "longrope":
            freqs, magnitude = _longrope_freqs(positions, head_dim, base, scaling)
        else:
            freqs, magnitude = torch.outer(positions, _inv_freq(head_dim, base, scaling)), 1.0
        # freqs: [max_position (LongRoPE: 2 * max_position), head_dim / 2]
        self.register_buffer("cos_cache", freqs.cos() * magnitude, persistent=False)
        self.register_buffer("sin_cache", freqs.sin() * magnitude, persistent=False)


def _rope_type(scaling: dict[str, Any] | None) -> str:
    return (scaling or {}).get("rope_type", scaling and scaling.get("type")) or "default"


def _inv_freq(head_dim: int, base: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = _rope_type(scaling)
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ModelLoadError(f"rope scaling type {rope_type!r} is not supported (default, linear, llama3, longrope are)")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, blended, scaled)


def _longrope_freqs(positions: torch.Tensor, head_dim: int, base: float,
                    scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """Phi-3 LongRoPE: (angles [2 * max_position, head_dim / 2], the magnitude of cos and sin).

    Each frequency is slowed by its own factor: rows [0, max_position) turn at the short factors' rates,
    rows [max_position, 2 * max_position) at the long ones'. The model picks the half per token
    (models/phi3.py); a family that does not reads the short half only.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    halves = [torch.outer(positions, 1.0 / (_factors(scaling, key, head_dim) * base**exponents))
              for key in ("short_factor", "long_factor")]
    original = scaling["original_max_position_embeddings"]
    return torch.cat(halves), _longrope_magnitude(scaling, len(positions), original)


def _factors(scaling: dict[str, Any], key: str, head_dim: int) -> torch.Tensor:
    factors = torch.tensor(scaling[key], dtype=torch.float32)
    if factors.shape != (head_dim // 2,):
        raise ModelLoadError(
            f"rope scaling {key} has {len(factors)} values; rotary dim {head_dim} needs {head_dim // 2}"
        )
    return factors


def _longrope_magnitude(scaling: dict[str, Any], max_position: int, original: int) -> float:
    """attention_factor, else sqrt(1 + ln(factor) / ln(original)) where the context was stretched by `factor`."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = scaling.get("factor") or max_position / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
