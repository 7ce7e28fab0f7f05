"""A decoder layer's parameters packed into one flat byte buffer, so a layer moves in one copy."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

IO_ALIGN = 4096  # O_DIRECT wants offsets, sizes and buffer addresses on the disk's logical block
PARAM_ALIGN = 256  # each parameter starts where any kernel's vector loads are aligned


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(slots=True, frozen=True)
class ParamSlice:
    name: str  # relative to the layer, e.g. "self_attn.qkv_proj.weight"
    offset: int  # bytes from the start of the layer's buffer
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * int(torch.Size(self.shape).numel())


@dataclass(slots=True, frozen=True)
class LayerLayout:
    params: tuple[ParamSlice, ...]
    nbytes: int  # the buffer's size, a multiple of IO_ALIGN

    @classmethod
    def of(cls, layer: nn.Module, num_shards: int = 1) -> LayerLayout:
        """Pack the layer's parameters (meta or real) in named_parameters order; the size splits into
        num_shards equal IO_ALIGN-aligned shares."""
        slices, offset = [], 0
        for name, param in layer.named_parameters():
            slices.append(ParamSlice(name, offset, tuple(param.shape), param.dtype))
            offset = round_up(offset + slices[-1].nbytes, PARAM_ALIGN)
        return cls(tuple(slices), round_up(max(offset, 1), IO_ALIGN * num_shards))

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """flat: [>= nbytes] uint8 -> one typed view per parameter, in self.params order."""
        if flat.dtype != torch.uint8 or flat.numel() < self.nbytes:
            raise ValueError(f"layer buffer must be uint8 of at least {self.nbytes} bytes, got "
                             f"{flat.dtype} of {flat.numel()}")
        return [flat[p.offset: p.offset + p.nbytes].view(p.dtype).view(p.shape) for p in self.params]


def layer_params(layer: nn.Module, layout: LayerLayout) -> list[nn.Parameter]:
    return [layer.get_parameter(p.name) for p in layout.params]


def bind(params: list[nn.Parameter], layout: LayerLayout, flat: torch.Tensor) -> None:
    """Point each parameter at its slice of `flat`; nothing is copied."""
    for param, view in zip(params, layout.views(flat)):
        param.data = view
