"""GGUF weights kept quantized (quantization="gguf"): the embedded file's Q4_1 tensors as int4 rows equal, once
dequantized, the tensors the dequantizing path gives (q/k rows un-permuted together with their scales and
zeros); the kept path is chosen only for files whose linears are all Q4_0/Q4_1, and says so otherwise."""

import logging

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from scaleinfer.layers.linear import UNQUANTIZED
from scaleinfer.layers.quant_int4 import Int4Rows, Int4Scheme
from scaleinfer.weights.gguf import GGUFQuant, open_gguf
from scaleinfer.weights.gguf_quant import keeps_linears, read_q4


@pytest.fixture(scope="module")
def embedded(embedded_gguf):
    return open_gguf(embedded_gguf)


@pytest.mark.parametrize("part", ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"])
def test_kept_rows_dequantize_to_the_dequantized_paths_tensor_exactly(embedded, part):
    tensor = next(t for t in embedded.reader.tensors if t.name == f"blk.3.{part}.weight")
    assert tensor.tensor_type == GGMLQuantizationType.Q4_1
    embedded.keep_int4 = False
    expected = embedded._to_torch(tensor, torch.float32)
    embedded.keep_int4 = True
    try:
        kept = embedded._to_torch(tensor, torch.float32)
    finally:
        embedded.keep_int4 = False
    assert isinstance(kept, Int4Rows) and kept.group_size == 32 and kept.levels.max() <= 15
    assert torch.equal(kept.dequantize(), expected)


def test_q4_0_blocks_are_symmetric_levels_with_zero_zeros():
    rows = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    data = quantize(rows, GGMLQuantizationType.Q4_0)

    class Tensor:  # what read_q4 reads of a ReaderTensor
        tensor_type, shape = GGMLQuantizationType.Q4_0, np.array([64, 4])

    Tensor.data = data
    blocks = read_q4(Tensor)
    assert (blocks.zero == 0).all()
    from gguf.quants import dequantize

    want = dequantize(data, GGMLQuantizationType.Q4_0)
    got = (blocks.levels.astype(np.float32) - 8) * np.repeat(blocks.scale, 32, axis=1)
    np.testing.assert_array_equal(got, want)


def test_the_scheme_keeps_an_all_q4_file_and_dequantizes_others(embedded, caplog):
    scheme = GGUFQuant(embedded).scheme("gguf")
    try:
        assert isinstance(scheme, Int4Scheme) and scheme.group_size == 32 and embedded.keep_int4
    finally:
        embedded.keep_int4 = False
    assert GGUFQuant(embedded).scheme(None) is UNQUANTIZED and not embedded.keep_int4
    tensors = [t for t in embedded.reader.tensors if t.name.startswith("blk.0.")]
    q8 = next(t for t in embedded.reader.tensors if t.name == "token_embd.weight")

    class Renamed:  # a Q8_0 tensor under a linear's name
        name, tensor_type = "blk.0.ffn_down.weight", q8.tensor_type

    with caplog.at_level(logging.WARNING):
        assert keeps_linears(tensors, "f.gguf")
        assert not keeps_linears(tensors + [Renamed], "f.gguf")
    assert "include Q8_0, so every linear weight is dequantized" in caplog.text
