"""The paged KV cache tensors: sized from a memory budget, one K and one V tensor per layer."""

from __future__ import annotations

import torch

from scaleinfer.config import ArchConfig, CacheConfig
from scaleinfer.errors import InvalidRequestError
from scaleinfer.worker.device import available_memory

CPU_DEFAULT_CAP = 1 << 30  # CPU RAM is shared with everything else; 1 GiB holds ~23k SmolLM2 tokens in fp32
GPU_ACTIVATION_RESERVE = 2 << 30  # room for activations and logits of the largest step


def block_bytes(arch: ArchConfig, num_kv_heads: int, block_size: int, dtype: torch.dtype) -> int:
    per_token = 2 * arch.num_hidden_layers * num_kv_heads * arch.head_dim * dtype.itemsize
    return per_token * block_size


def kv_cache_dtype(config: CacheConfig, dtype: torch.dtype) -> torch.dtype:
    """The cache's element type: the run dtype, or e4m3 for kv_cache_dtype fp8 (twice the bf16 tokens)."""
    return dtype if config.kv_cache_dtype == "auto" else torch.float8_e4m3fn


def num_blocks_for(config: CacheConfig, bytes_per_block: int, device: torch.device) -> int:
    if config.num_blocks is not None:
        return config.num_blocks
    budget = config.kv_cache_memory
    if budget is None:
        free = available_memory(device)
        budget = int(free * config.memory_fraction)
        budget = min(budget, CPU_DEFAULT_CAP) if device.type == "cpu" else budget - GPU_ACTIVATION_RESERVE
    num_blocks = budget // bytes_per_block
    if num_blocks < 1:
        raise InvalidRequestError(
            f"KV cache budget of {budget} bytes holds no block of {bytes_per_block} bytes; raise kv_cache_memory"
        )
    return num_blocks


def num_host_blocks_for(config: CacheConfig, bytes_per_block: int) -> int:
    """Blocks of the host tier (kv_offload): kv_offload_memory over this rank's bytes per block; 0 without one."""
    if config.kv_offload == "none":
        return 0
    num_blocks = config.kv_offload_memory // bytes_per_block
    if num_blocks < 1:
        raise InvalidRequestError(f"kv_offload_memory={config.kv_offload_memory} bytes holds no KV block of "
                                  f"{bytes_per_block} bytes; raise kv_offload_memory")
    return num_blocks


def allocate_kv_cache(
    num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
    dtype: torch.dtype, device: torch.device,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # Zeroed, not empty: padded block-table entries are read and masked, and 0 * NaN from stale
    # uninitialized memory would poison the masked softmax.
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(num_layers)
    ]
