"""Gated activations."""

from __future__ import annotations

import torch
from torch import nn

from scaleinfer.kernels.activation import gelu_tanh_and_mul, silu_and_mul


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, 2 * d] (gate then up) -> [num_tokens, d]."""
        return silu_and_mul(x)


class GeluTanhAndMul(nn.Module):
    """GeGLU with the tanh approximation of GELU (HF's gelu_pytorch_tanh): Gemma's MLP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, 2 * d] (gate then up) -> [num_tokens, d]."""
        return gelu_tanh_and_mul(x)
