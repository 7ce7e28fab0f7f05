"""Kernel tests' inputs: paged KV caches (sequences in shuffled blocks, every other slot poisoned with NaN), random
int4 weights, and tolerances per dtype."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scaleinfer.kernels.gemv_int4 import pack_int4
from scaleinfer.kernels.paged_attention import write_kv_cache


@dataclass
class PagedKV:
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim], NaN in every unused slot
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_blocks]; entries past a sequence point at poisoned blocks

    def clean(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The caches with zeros for NaN, for the references (which read the padded width and mask it)."""
        return self.k_cache.nan_to_num(0.0), self.v_cache.nan_to_num(0.0)


def paged_kv(
    context_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int,
    dtype: torch.dtype, device: torch.device, extra_blocks: int = 2, index_dtype: torch.dtype = torch.int32,
) -> PagedKV:
    """Random K/V for sequences of context_lens tokens; tables padded extra_blocks past the longest."""
    needed = [-(-n // block_size) for n in context_lens]
    width = max(needed) + extra_blocks
    num_blocks = sum(needed) + extra_blocks + 1
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    order = torch.randperm(num_blocks).tolist()
    spare = order[sum(needed):]  # blocks no sequence owns: targets of the padded table entries
    tables = []
    for n, count in zip(context_lens, needed):
        table, order = order[:count], order[count:]
        k, v = (torch.randn(n, num_kv_heads, head_dim, dtype=dtype, device=device) for _ in range(2))
        write_kv_cache(k, v, k_cache, v_cache, slots_of(table, range(n), block_size, device))
        tables.append(table + [spare[i % len(spare)] for i in range(width - count)])
    return PagedKV(k_cache, v_cache, torch.tensor(tables, dtype=index_dtype, device=device))


def slots_of(table: list[int], positions, block_size: int, device: torch.device) -> torch.Tensor:
    slots = [table[p // block_size] * block_size + p % block_size for p in positions]
    return torch.tensor(slots, dtype=torch.int64, device=device)


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


def random_int4_weight(n: int, k: int, group: int, seed: int, device: str | torch.device = "cpu"):
    """(packed levels [N, K // 2], scale, zero [N, K // group]) sized so that outputs of x ~ N(0, 1) are about 1."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale = (torch.rand(n, k // group, generator=g) + 0.5) / (4 * k**0.5)
    zero = torch.randn(n, k // group, generator=g) / (4 * k**0.5)
    return pack_int4(levels).to(device), scale.to(device), zero.to(device)
