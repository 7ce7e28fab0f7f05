"""Weight loaders: fused QKV / gate-up placement, and each tensor-parallel rank's shard."""

import torch
from rank_helpers import as_tp_rank

from scaleinfer.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear


def test_fused_qkv_equals_separate_projections():
    layer = QKVParallelLinear(hidden_size=8, head_dim=2, num_heads=4, num_kv_heads=2, bias=True)
    weights = {s: torch.randn(n, 8) for s, n in (("q", 8), ("k", 4), ("v", 4))}
    biases = {s: torch.randn(w.shape[0]) for s, w in weights.items()}
    for s in "qkv":
        layer.weight_loader(layer.weight, weights[s], s)
        layer.weight_loader(layer.bias, biases[s], s)
    x = torch.randn(3, 8)
    expected = torch.cat([x @ weights[s].T + biases[s] for s in "qkv"], dim=-1)
    torch.testing.assert_close(layer(x), expected)


def test_each_rank_loads_its_shard():
    full_q, full_k = torch.randn(8, 4), torch.randn(4, 4)
    full_gate, full_down = torch.randn(6, 4), torch.randn(4, 6)
    for rank in range(2):
        with as_tp_rank(rank):
            qkv = QKVParallelLinear(hidden_size=4, head_dim=2, num_heads=4, num_kv_heads=2, bias=False)
            gate_up = MergedColumnParallelLinear(4, [6, 6])
            down = RowParallelLinear(6, 4)
        qkv.weight_loader(qkv.weight, full_q, "q")
        qkv.weight_loader(qkv.weight, full_k, "k")
        gate_up.weight_loader(gate_up.weight, full_gate, 0)
        down.weight_loader(down.weight, full_down)
        torch.testing.assert_close(qkv.weight[:4], full_q[rank * 4 : rank * 4 + 4])
        torch.testing.assert_close(qkv.weight[4:6], full_k[rank * 2 : rank * 2 + 2])
        torch.testing.assert_close(gate_up.weight[:3], full_gate[rank * 3 : rank * 3 + 3])
        torch.testing.assert_close(down.weight, full_down[:, rank * 3 : rank * 3 + 3])
