"""Random weights for a model built from its config alone: benchmarks of shapes we have no checkpoint for."""

from __future__ import annotations

import torch
from torch import nn

DUMMY_STD = 0.02  # the usual initializer_range: activations stay finite through many layers


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0, exclude: nn.Module | None = None) -> None:
    """Normal(0, DUMMY_STD) matrices and biases; norm weights 1. Drawn on the parameters' own device. A parameter
    with a `dummy_init(std, generator)` (a quantized weight: layers/quant_int8.py) draws its own.
    exclude: a submodule whose parameters are left alone (streamed layers initialized one at a time)."""
    skipped = {id(p) for p in exclude.parameters()} if exclude is not None else set()
    params = [(name, p) for name, p in model.named_parameters() if id(p) not in skipped]
    if not params:
        return
    generator = torch.Generator(device=params[0][1].device).manual_seed(seed)
    for name, param in params:
        if hasattr(param, "dummy_init"):
            param.dummy_init(DUMMY_STD, generator)
        elif name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, DUMMY_STD, generator=generator)
