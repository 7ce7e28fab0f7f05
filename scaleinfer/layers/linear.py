"""Linear layers that know their tensor-parallel shard.

Each parameter carries a `weight_loader(param, loaded_weight, shard_id=None)`: the checkpoint gives the
full HF tensor, the loader narrows it to this rank's slice and copies it in place. Fused layers (QKV,
gate/up) take one checkpoint tensor per shard_id and place it at its offset.
"""

from __future__ import annotations

import torch
from torch import nn

from scaleinfer.kernels.gemv import linear
from scaleinfer.parallel.comm import tp_all_reduce
from scaleinfer.parallel.state import get_parallel_state


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what}={numerator} is not divisible by tensor_parallel_size={denominator}")
    return numerator // denominator


class LinearBase(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool) -> None:
        super().__init__()
        state = get_parallel_state()
        self.tp_rank, self.tp_size = state.tp_rank, state.tp_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        _copy_checked(param.data, loaded)


class ReplicatedLinear(LinearBase):
    """The same full weight on every rank."""


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks: y_rank = x @ W[rank rows].T; no communication."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        tp_size = get_parallel_state().tp_size
        super().__init__(input_size, _divide(output_size, tp_size, "output_size"), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        rows = param.shape[0]
        _copy_checked(param.data, loaded.narrow(0, self.tp_rank * rows, rows))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate_proj and up_proj); shard_id is the index."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        assert isinstance(shard_id, int), f"merged linear needs an integer shard_id, got {shard_id!r}"
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        shard = loaded.narrow(0, self.tp_rank * size, size)
        _copy_checked(param.data.narrow(0, offset, size), shard)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul; heads split across ranks (kv heads replicated if fewer)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool) -> None:
        tp_size = get_parallel_state().tp_size
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp_size, "num_attention_heads")
        self.num_kv_heads = max(1, num_kv_heads // tp_size)
        self.kv_replicas = max(1, tp_size // num_kv_heads)
        output_size = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, output_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        offset, size, rank = {
            "q": (0, q_size, self.tp_rank),
            "k": (q_size, kv_size, self.tp_rank // self.kv_replicas),
            "v": (q_size + kv_size, kv_size, self.tp_rank // self.kv_replicas),
        }[shard_id]
        _copy_checked(param.data.narrow(0, offset, size), loaded.narrow(0, rank * size, size))


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial sums are all-reduced (bias added once, after)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        tp_size = get_parallel_state().tp_size
        super().__init__(_divide(input_size, tp_size, "input_size"), output_size, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = tp_all_reduce(linear(x, self.weight))
        return y if self.bias is None else y + self.bias

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        if param.dim() == 1:  # bias: whole on every rank
            _copy_checked(param.data, loaded)
            return
        cols = param.shape[1]
        _copy_checked(param.data, loaded.narrow(1, self.tp_rank * cols, cols))


def _copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(src.shape)} does not fit parameter {tuple(dst.shape)}")
    dst.copy_(src)
