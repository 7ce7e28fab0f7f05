"""Weights taken from a loaded transformers model: init_inference moves them into ours, one at a time.

Peak memory stays at about one copy of the weights (plus the largest tensor in flight) only if our model holds
no memory before it is filled: an empty tensor on a GPU is real memory. So the model is built inside
`source.building()` (its parameters registered on the meta device, where in-place initialisation is free),
each parameter becomes a placeholder of its shape on its device when loading starts, and gets its memory
when its weight_loader first runs, just before the HF tensor it takes is released.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scaleinfer.models.weights import _default_loader
from scaleinfer.weights.source import ModelSource


@dataclass(slots=True)
class _Deferred:
    meta: nn.Parameter
    device: torch.device  # where the module built it
    sites: list[tuple[nn.Module, str]]  # every (module, name) it was registered under: ties stay tied


class DeferredParameters:
    """A context: parameters registered inside (by any module, in any thread: module construction is global)
    are put on the meta device, remembered with the device they were built on, until allocate_on_load()."""

    def __init__(self) -> None:
        self.deferred: dict[int, _Deferred] = {}  # by id of the meta parameter
        self._original: Callable | None = None

    def __enter__(self) -> DeferredParameters:
        original = self._original = nn.Module.register_parameter

        def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
            if param is not None and (id(param) in self.deferred or param.device.type != "meta"):
                param = self._defer(module, name, param)
            original(module, name, param)

        nn.Module.register_parameter = register
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._original is not None:
            nn.Module.register_parameter, self._original = self._original, None

    def _defer(self, module: nn.Module, name: str, param: nn.Parameter) -> nn.Parameter:
        entry = self.deferred.get(id(param))
        if entry is None:  # first registration: the parameter's memory is freed here
            meta = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(param.__dict__)
            entry = self.deferred[id(meta)] = _Deferred(meta, param.device, [])
        entry.sites.append((module, name))
        return entry.meta

    def allocate_on_load(self) -> None:
        """Stop deferring; give each deferred parameter a memoryless placeholder on its device (the object the
        loader will see) whose weight_loader allocates the parameter's memory on its first call."""
        self._stop()
        for entry in self.deferred.values():
            meta = entry.meta
            placeholder = torch.empty((), dtype=meta.dtype, device=entry.device).expand(meta.shape)
            param = nn.Parameter(placeholder, requires_grad=meta.requires_grad)
            param.__dict__.update(meta.__dict__)
            param.weight_loader = _allocating(getattr(meta, "weight_loader", _default_loader))
            for module, name in entry.sites:
                if module._parameters.get(name) is meta:  # not since replaced (a head tied to the embedding)
                    module._parameters[name] = param
        self.deferred.clear()


def _allocating(loader: Callable) -> Callable:
    allocated = False

    def load(param: nn.Parameter, loaded: torch.Tensor, *shard_id: object) -> None:
        nonlocal allocated
        if not allocated:  # same device and dtype as the placeholder: set in place, the object stays
            param.data = torch.empty(param.shape, dtype=param.dtype, device=param.device)
            allocated = True
        loader(param, loaded, *shard_id)

    return load


@dataclass(slots=True)
class HFModelSource(ModelSource):
    hf_model: Any = field(default=None, repr=False)
    deferred: DeferredParameters = field(default_factory=DeferredParameters, repr=False)

    def building(self) -> DeferredParameters:
        """Build the engine inside this: the model's parameters take memory only as they are loaded."""
        return self.deferred

    def iter_weights(self, dtype: torch.dtype, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """Each parameter once (tied ones too), then released: the HF model gives its memory up as ours fills.

        Called once the model is built and before loading reads its parameters: the placeholders go in now."""
        self.deferred.allocate_on_load()
        return self._release_as_read(dtype)

    def _release_as_read(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        for name, param in list(self.hf_model.named_parameters()):
            yield name, param.data.to(dtype)
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)

    def load_tokenizer(self) -> None:
        return None  # a model object carries no tokenizer: token ids in and out


def hf_model_source(hf_model: Any, arch: Any) -> HFModelSource:
    name = getattr(hf_model, "name_or_path", "") or f"<in-memory {type(hf_model).__name__}>"
    return HFModelSource(path=Path(name), format="hf_model", arch=arch, hf_model=hf_model)
