"""Random weights for a model built from its config alone: benchmarks of shapes we have no checkpoint for."""

from __future__ import annotations

import torch
from torch import nn

DUMMY_STD = 0.02  # the usual initializer_range: activations stay finite through many layers


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Normal(0, DUMMY_STD) matrices and biases; norm weights 1. Drawn on the parameters' own device."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, DUMMY_STD, generator=generator)
