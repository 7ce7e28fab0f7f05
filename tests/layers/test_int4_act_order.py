"""GPTQ act-order on the int4 scheme (layers/quant_int4_checkpoint.py): the features sorted by group and the
activations gathered in that order equal the weight as g_idx defines it, at one rank and at two (a row-parallel
rank's features of every group in padded slots; column-parallel fused shards sharing one order); shards whose
orders differ, and a g_idx that overfills a group, are refused."""

import pytest
import torch
from rank_helpers import as_tp_rank

from scaleinfer.errors import ModelLoadError
from scaleinfer.layers import quant_int4
from scaleinfer.layers.linear import MergedColumnParallelLinear, RowParallelLinear, linear_scheme
from scaleinfer.layers.quant_int4 import Int4Rows
from scaleinfer.layers.quant_int4_checkpoint import Int4CheckpointScheme, sorted_by_group

GROUP = 32


def _act_order_rows(n: int, k: int, seed: int) -> Int4Rows:
    g = torch.Generator().manual_seed(seed)
    g_idx = torch.randperm(k, generator=g) // GROUP  # GPTQ's: the position in its quantization order // group
    return Int4Rows(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8),
                    torch.rand(n, k // GROUP, generator=g) + 0.1, torch.randn(n, k // GROUP, generator=g), g_idx)


@pytest.fixture(autouse=True)
def _dequantized_matmul(monkeypatch):
    """The float32 dequantized matmul (the CPU kernel's bfloat16 activations are test_quant_int4's)."""
    monkeypatch.setattr(quant_int4, "CPU_KERNEL_ROWS", 0)


def test_sorted_rows_hold_each_feature_in_a_slot_of_its_group():
    rows = _act_order_rows(8, 128, seed=0)
    kept, perm = sorted_by_group(rows, None)
    assert sorted(perm.tolist()) == list(range(128))  # one rank: a permutation, no padding
    assert torch.equal(kept.dequantize(), rows.dequantize()[:, perm])
    part, perm = sorted_by_group(rows, (64, 64))  # a row-parallel rank's half: 64 of 128 slots padding
    filled = perm < 64
    assert int(filled.sum()) == 64 and sorted(perm[filled].tolist()) == list(range(64))
    assert torch.equal(rows.g_idx[64 + perm[filled]], torch.arange(128)[filled] // GROUP)  # each in its group
    assert torch.equal(part.dequantize()[:, filled], rows.dequantize()[:, 64 + perm[filled]])


def test_row_parallel_ranks_sum_to_the_whole_weights_matmul():
    """Each rank gathers its own input features (and zeros) into slots; the ranks' partial sums add up to x @ W.T."""
    rows, x = _act_order_rows(48, 128, seed=1), torch.randn(3, 128)
    partial = []
    for rank in range(2):
        with as_tp_rank(rank), linear_scheme(Int4CheckpointScheme("gptq", GROUP, act_order=True)):
            layer = RowParallelLinear(128, 48)
        assert layer.weight.shape == (48, 64) and layer.input_padded  # 128 slots: the whole layer's width
        layer.weight_loader(layer.weight, rows)
        partial.append(layer.scheme.apply(layer, x[:, 64 * rank: 64 * rank + 64], None))
    torch.testing.assert_close(partial[0] + partial[1], x @ rows.dequantize().T, atol=1e-4, rtol=1e-5)


def test_fused_shards_share_one_order_and_other_orders_are_refused():
    gate, up = _act_order_rows(32, 128, seed=2), _act_order_rows(32, 128, seed=3)
    up_same_order = Int4Rows(up.levels, up.scale, up.zero, gate.g_idx)
    x = torch.randn(2, 128)
    for rank in range(2):
        with as_tp_rank(rank), linear_scheme(Int4CheckpointScheme("gptq", GROUP, act_order=True)):
            layer = MergedColumnParallelLinear(128, [32, 32])
        assert not layer.input_padded
        layer.weight_loader(layer.weight, gate, 0)
        layer.weight_loader(layer.weight, up_same_order, 1)
        rank_rows = torch.cat([gate.dequantize()[16 * rank: 16 * rank + 16],
                               up_same_order.dequantize()[16 * rank: 16 * rank + 16]])
        torch.testing.assert_close(layer(x), x @ rank_rows.T, atol=1e-4, rtol=1e-5)
        with pytest.raises(ModelLoadError, match="shard 1 of a fused linear orders its input features"):
            layer.weight_loader(layer.weight, up, 1)


def test_a_g_idx_that_overfills_a_group_is_refused():
    rows = _act_order_rows(4, 64, seed=4)
    rows.g_idx = torch.zeros(64, dtype=torch.int64)
    with pytest.raises(ModelLoadError, match="g_idx puts 64 input features in group 0; groups hold 32"):
        sorted_by_group(rows, None)
