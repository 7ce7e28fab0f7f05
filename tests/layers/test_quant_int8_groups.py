"""The group-wise int8 scheme (GGUF Q8_0 kept): kept rows placed at their offsets in fused layers and narrowed by
whole groups for a row-parallel rank at TP=2, float rows quantized per group, a group size that does not divide
a rank's columns refused, the GPU paths by rows (GEMV, GEMM, dequantized matmul), and a built int4 layer re-made
in it (LinearBase.use_scheme) loads and runs."""

import pytest
import torch
from rank_helpers import as_tp_rank

from scaleinfer.errors import ModelLoadError
from scaleinfer.kernels.dispatch import HAS_TRITON, force_triton
from scaleinfer.kernels.gemv_int8_groups import int8_groups_linear_ref
from scaleinfer.layers import quant_int8_groups
from scaleinfer.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    linear_scheme,
)
from scaleinfer.layers.quant_int4 import Int4Scheme
from scaleinfer.layers.quant_int8_groups import Int8GroupRows, Int8GroupScheme, quantize_int8_groups

GROUP = 32


def rows(n: int, k: int, seed: int) -> Int8GroupRows:
    g = torch.Generator().manual_seed(seed)
    return Int8GroupRows(torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8),
                         torch.rand(n, k // GROUP, generator=g) / 100 + 1e-3)


def cat(parts: list[Int8GroupRows]) -> Int8GroupRows:
    return Int8GroupRows(torch.cat([p.levels for p in parts]), torch.cat([p.scale for p in parts]))


def test_fused_and_sharded_loaders_place_kept_rows_and_whole_groups():
    full_q, full_k, full_v = rows(8, 64, 1), rows(4, 64, 2), rows(4, 64, 3)
    full_gate, full_up, full_down = rows(6, 64, 4), rows(6, 64, 5), rows(4, 128, 6)
    x64, x_down = torch.randn(3, 64), torch.randn(3, 64)
    for rank in range(2):
        with as_tp_rank(rank), linear_scheme(Int8GroupScheme(GROUP)):
            qkv = QKVParallelLinear(hidden_size=64, head_dim=2, num_heads=4, num_kv_heads=2, bias=False)
            gate_up = MergedColumnParallelLinear(64, [6, 6])
            down = RowParallelLinear(128, 4)
        for shard, full in zip("qkv", (full_q, full_k, full_v)):
            qkv.weight_loader(qkv.weight, full, shard)
        gate_up.weight_loader(gate_up.weight, full_gate, 0)
        gate_up.weight_loader(gate_up.weight, full_up, 1)
        down.weight_loader(down.weight, full_down)
        assert qkv.weight.dtype == gate_up.weight.dtype == down.weight.dtype == torch.int8
        qkv_rows = cat([full_q.narrow(0, rank * 4, 4), full_k.narrow(0, rank * 2, 2), full_v.narrow(0, rank * 2, 2)])
        gate_up_rows = cat([full_gate.narrow(0, rank * 3, 3), full_up.narrow(0, rank * 3, 3)])
        torch.testing.assert_close(qkv(x64), int8_groups_linear_ref(x64, qkv_rows.levels, qkv_rows.scale))
        torch.testing.assert_close(gate_up(x64), int8_groups_linear_ref(x64, gate_up_rows.levels, gate_up_rows.scale))
        levels = full_down.levels.narrow(1, rank * 64, 64)
        scale = full_down.scale.narrow(1, rank * 2, 2)  # the rank's two groups of 32
        torch.testing.assert_close(down.scheme.apply(down, x_down, None), int8_groups_linear_ref(x_down, levels, scale))


def test_float_rows_are_quantized_per_group():
    weight = torch.randn(16, 96) * torch.logspace(-2, 1, 3).repeat_interleave(32)  # groups of very different sizes
    with linear_scheme(Int8GroupScheme(GROUP)):
        layer = ColumnParallelLinear(96, 16)
    layer.weight_loader(layer.weight, weight)
    kept = quantize_int8_groups(weight, GROUP)
    assert torch.equal(layer.weight, kept.levels) and torch.equal(layer.weight_scale, kept.scale)
    error = (kept.dequantize() - weight).abs()
    assert (error <= kept.scale.repeat_interleave(32, dim=1) / 2 + 1e-7).all()


def test_a_group_size_that_does_not_divide_a_ranks_columns_is_refused():
    with as_tp_rank(0), linear_scheme(Int8GroupScheme(GROUP)), pytest.raises(ModelLoadError, match="group size 32"):
        RowParallelLinear(96, 4)  # 48 columns a rank


def test_a_built_int4_layer_remade_as_int8_groups_drops_its_int4_state():
    with linear_scheme(Int4Scheme(group_size=GROUP)):
        layer = ColumnParallelLinear(64, 8, bias=True)
    assert layer.weight.dtype == torch.uint8 and hasattr(layer, "weight_zero") and hasattr(layer, "cpu_int4")
    layer.use_scheme(Int8GroupScheme(GROUP))
    assert not hasattr(layer, "weight_zero") and not hasattr(layer, "cpu_int4") and not hasattr(layer, "tinygemm")
    assert {n for n, _ in layer.named_parameters()} == {"weight", "bias"}
    assert {n for n, _ in layer.named_buffers()} == {"weight_scale"}
    kept = rows(8, 64, 9)
    layer.weight_loader(layer.weight, kept)
    layer.weight_loader(layer.bias, torch.ones(8))
    x = torch.randn(17, 64)
    torch.testing.assert_close(layer(x), int8_groups_linear_ref(x, kept.levels, kept.scale, torch.ones(8)))


@pytest.mark.parametrize("m,path", [(3, "gemv"), (5, "gemm"), (100, "gemm"), (513, "dequantized")])
def test_gpu_paths_by_rows(m, path, monkeypatch):
    """The kernels forced through Triton's interpreter: up to 4 rows the GEMV, 5..512 the weight-only GEMM, past it
    the dequantized matmul; each gives the reference."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    calls = []
    for name in ("int8_groups_gemv_triton", "int8_groups_gemm_triton"):
        kernel = getattr(quant_int8_groups, name)
        monkeypatch.setattr(quant_int8_groups, name,
                            lambda x, *args, kernel=kernel, name=name: calls.append(name) or kernel(x, *args))
    with linear_scheme(Int8GroupScheme(GROUP)):
        layer = ColumnParallelLinear(64, 24, bias=True)
    kept = rows(24, 64, m)
    layer.weight_loader(layer.weight, kept)
    layer.bias.data = torch.randn(24)
    x = torch.randn(m, 64)
    with force_triton():
        got = layer(x)
    assert calls == {"gemv": ["int8_groups_gemv_triton"], "gemm": ["int8_groups_gemm_triton"], "dequantized": []}[path]
    torch.testing.assert_close(got, int8_groups_linear_ref(x, kept.levels, kept.scale, layer.bias), atol=1e-4,
                               rtol=1e-4)
