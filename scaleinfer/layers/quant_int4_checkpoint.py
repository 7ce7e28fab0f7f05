"""AWQ and GPTQ checkpoints' 4-bit weights on the int4 scheme (layers/quant_int4.py), GPTQ's act-order included.

weights/int4_checkpoint.py turns each linear's packed tensors into int4 rows; this scheme stores them as
Int4Scheme stores GGUF's kept rows (the same kernels serve them: tinygemm on a GPU, the CPU kernel), in the
checkpoint's group size, whose fit to each rank's input features is checked at start. A linear the checkpoint
left in float is refused: quantizing it here would not be loading the checkpoint as it is.

Act-order (GPTQ `desc_act`): g_idx assigns each input feature to a group, a group's features scattered over the
row, where our layout needs them contiguous. As vLLM's exllama path does (gptq_shuffle: the weight's input
features sorted by g_idx once at load, the activations taken in that order), the layer stores its features
sorted by group and gathers x through `input_perm` before the matmul: y = x[:, perm] @ W[:, perm].T. A fused
layer's shards (q, k, v; gate, up) share one order: GPTQ orders by the Hessian of the shared input, so their
g_idx agree, and one that does not is refused. A row-parallel rank under tensor parallelism holds, in general,
some features of every group (vLLM falls back there to a kernel that reads g_idx): here it keeps one slot per
input feature of the whole layer, group g's slots [g * group_size, ...) filled with the rank's features of g and
the rest padding that reads a zero appended to x. The same kernels then serve it, at a cost: such a rank's
row-parallel weights are the whole layer's size, not its 1 / T share.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scaleinfer.errors import ModelLoadError
from scaleinfer.kernels.gemv_int4 import ZERO_POINT
from scaleinfer.layers.linear import Columns, RowParallelLinear
from scaleinfer.layers.quant_int4 import Int4Rows, Int4Scheme, int4_linear


class Int4CheckpointScheme(Int4Scheme):
    """An AWQ / GPTQ checkpoint's int4 rows in its groups of `group_size`; act_order: rows carry g_idx."""

    def __init__(self, method: str, group_size: int, act_order: bool) -> None:
        super().__init__(group_size=group_size)
        self.method, self.act_order = method, act_order

    def create_weights(self, layer: nn.Module, output_size: int, input_size: int) -> None:
        if not self.act_order:
            super().create_weights(layer, output_size, input_size)
            return
        slots = input_size * layer.tp_size if isinstance(layer, RowParallelLinear) else input_size  # the layer's
        if slots % self.group_size:
            raise ModelLoadError(f"{self.method} group size {self.group_size} does not divide a linear's {slots} "
                                 "input features")
        super().create_weights(layer, output_size, slots)
        # load_format="dummy": the rank's features in order, then padding
        layer.register_buffer("input_perm", torch.arange(slots).clamp_(max=input_size))  # [slots]
        layer.input_padded, layer.input_order_loaded = slots > input_size, False

    def load_rows(self, layer: nn.Module, offset: int, rows: torch.Tensor | Int4Rows, columns: Columns,
                  shard_id: object) -> None:
        if not isinstance(rows, Int4Rows):
            raise ModelLoadError(f"{self.method} checkpoint: a linear weight of dtype {rows.dtype}, shape "
                                 f"{tuple(rows.shape)}, where packed 4-bit tensors (qweight, qzeros, scales) were "
                                 "expected (linears the quantization_config leaves unquantized are not supported)")
        if not self.act_order:
            super().load_rows(layer, offset, rows, columns, shard_id)
            return
        if rows.group_size != layer.group_size:
            raise ModelLoadError(f"{self.method} checkpoint rows in groups of {rows.group_size} do not fit a layer "
                                 f"built with groups of {layer.group_size}")
        kept, perm = sorted_by_group(rows, columns)
        self._set_order(layer, perm.to(layer.input_perm.device), shard_id)
        self._store(layer, offset, kept)

    def _set_order(self, layer: nn.Module, perm: torch.Tensor, shard_id: object) -> None:
        if not layer.input_order_loaded:
            layer.input_perm.copy_(perm)
            layer.input_order_loaded = True
        elif not torch.equal(layer.input_perm, perm):
            raise ModelLoadError(f"{self.method} act-order: shard {shard_id!r} of a fused linear orders its input "
                                 "features (g_idx) unlike the shard loaded before it; one order of the shared "
                                 "input serves a fused matmul")

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.act_order:
            x = F.pad(x, (0, 1)) if layer.input_padded else x
            x = x.index_select(-1, layer.input_perm)  # [..., slots]: the features group by group
        return int4_linear(x, layer, bias)


def sorted_by_group(rows: Int4Rows, columns: Columns) -> tuple[Int4Rows, torch.Tensor]:
    """Act-order rows [n, K] (g_idx set) -> (rows [n, K] whose slot g * group_size + i holds the i-th of this
    rank's features (columns; None: all) in group g, padding after them; perm [K]: the rank's feature at each
    slot, the rank's feature count at a padding slot). Every slot is a feature when the rank holds them all."""
    start, size = columns if columns is not None else (0, rows.shape[1])
    group, num_groups = rows.group_size, rows.scale.shape[1]
    g_idx = rows.g_idx[start : start + size].to(torch.int64)  # [size]
    if g_idx.min() < 0 or g_idx.max() >= num_groups:
        raise ModelLoadError(f"act-order g_idx names groups {int(g_idx.min())}..{int(g_idx.max())} of "
                             f"{num_groups}")
    counts = torch.bincount(g_idx, minlength=num_groups)  # [G]
    if counts.max() > group:
        raise ModelLoadError(f"act-order g_idx puts {int(counts.max())} input features in group "
                             f"{int(counts.argmax())}; groups hold {group}")
    order = torch.argsort(g_idx, stable=True)  # the rank's features, group by group
    grouped = g_idx[order]
    first = torch.cumsum(counts, 0) - counts  # [G]: where each group starts in `order`
    slot = grouped * group + torch.arange(size) - first[grouped]  # [size]: the slot of each feature of `order`
    perm = torch.full((rows.shape[1],), size, dtype=torch.int64)
    perm[slot] = order
    levels = torch.full(rows.shape, ZERO_POINT, dtype=torch.uint8)  # padding: any level (its activation is 0)
    levels[:, slot] = rows.levels[:, start + order]
    return Int4Rows(levels, rows.scale, rows.zero), perm
