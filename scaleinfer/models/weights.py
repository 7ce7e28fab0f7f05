"""Shared checkpoint-to-parameter loading for every model family."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from scaleinfer.errors import ModelLoadError


def load_into(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    stacked_params: dict[str, tuple[str, str | int]],
    skip_suffixes: tuple[str, ...] = (),
) -> None:
    """Copy each (HF name, tensor) into its parameter through the parameter's weight_loader.

    The tensors may be read-only views of a mapped checkpoint, in their stored dtype: a loader narrows one to
    its slice and copies that in (copy_ casts to the parameter's dtype); nothing writes into them.

    Raises ModelLoadError naming a checkpoint tensor with no parameter, or parameters left unloaded.
    """
    params = dict(model.named_parameters())
    # Buffers with a loader take a checkpoint tensor when there is one (the KV cache's scales), else keep theirs.
    targets = params | {n: b for n, b in model.named_buffers() if hasattr(b, "weight_loader")}
    loaded: set[str] = set()
    for name, tensor in weights:
        if name.endswith(skip_suffixes):
            continue
        target, shard_id = map_name(name, stacked_params)
        if target not in targets:
            raise ModelLoadError(f"checkpoint tensor {name!r} matches no parameter of {type(model).__name__}")
        param = targets[target]
        loader = getattr(param, "weight_loader", _default_loader)
        with torch.no_grad():
            loader(param, tensor, *(() if shard_id is None else (shard_id,)))
        loaded.add(target)
    _check_complete(model, set(params) - loaded)


def map_name(name: str, stacked_params: dict[str, tuple[str, str | int]]) -> tuple[str, str | int | None]:
    """A checkpoint tensor's name -> (the parameter it loads into, its shard id in a fused one, or None)."""
    for fragment, (fused, shard_id) in stacked_params.items():
        if fragment in name:
            return name.replace(fragment, fused), shard_id
    return name, None


def _default_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ModelLoadError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit {tuple(param.shape)}")
    param.data.copy_(loaded)


def _check_complete(model: nn.Module, missing: set[str]) -> None:
    # Tied parameters appear once in named_parameters, so a missing name is truly missing.
    if missing:
        raise ModelLoadError(f"checkpoint has no tensor for {sorted(missing)[:5]} ({len(missing)} missing)")
