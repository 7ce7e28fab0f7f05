"""GGUF weights kept quantized (quantization="gguf"): the embedded file's Q4_1 tensors as int4 rows equal, once
dequantized, the tensors the dequantizing path gives (q/k rows un-permuted together with their scales and
zeros); the plan keeps every linear of an all-Q4 file, and a file without Q4 linears is dequantized whole."""

import logging
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from scaleinfer.layers.linear import UNQUANTIZED
from scaleinfer.layers.quant_gguf import GGUFScheme
from scaleinfer.layers.quant_int4 import Int4Rows
from scaleinfer.models.llama import LlamaForCausalLM
from scaleinfer.weights.gguf import GGUFQuant, open_gguf
from scaleinfer.weights.gguf_quant import is_linear_weight, read_q4


@pytest.fixture(scope="module")
def embedded(embedded_gguf):
    return open_gguf(embedded_gguf)


@pytest.mark.parametrize("part", ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"])
def test_kept_rows_dequantize_to_the_dequantized_paths_tensor_exactly(embedded, part):
    tensor = next(t for t in embedded.reader.tensors if t.name == f"blk.3.{part}.weight")
    assert tensor.tensor_type == GGMLQuantizationType.Q4_1
    expected = embedded._to_torch(tensor, torch.float32)
    embedded.kept = frozenset({tensor.name})
    try:
        kept = embedded._to_torch(tensor, torch.float32)
    finally:
        embedded.kept = frozenset()
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


def test_the_scheme_keeps_every_linear_of_an_all_q4_file(embedded, caplog):
    scheme = GGUFQuant(embedded).scheme("gguf")
    assert isinstance(scheme, GGUFScheme) and scheme.group_size == 32 and scheme.lm_head_int8
    with caplog.at_level(logging.INFO):
        try:
            assert scheme.layer_schemes(SimpleNamespace(stacked_params=LlamaForCausalLM.stacked_params)) == {}
            linears = [t.name for t in embedded.reader.tensors if is_linear_weight(t.name)]
            assert embedded.kept == frozenset(linears) and len(linears) == 7 * embedded.arch.num_hidden_layers
        finally:
            embedded.kept = frozenset()
    assert f"keeps {len(linears)} Q4_1 linear weights quantized and dequantizes none" in caplog.text
    assert GGUFQuant(embedded).scheme(None) is UNQUANTIZED


def test_a_file_without_q4_linears_is_dequantized_whole(embedded, caplog):
    class Q6Reader:  # the embedded file's tensors, every one Q6_K
        tensors = [SimpleNamespace(name=t.name, tensor_type=GGMLQuantizationType.Q6_K) for t in embedded.reader.tensors]

    with caplog.at_level(logging.WARNING):
        scheme = GGUFQuant(replace(embedded, reader=Q6Reader)).scheme("gguf")
    assert scheme is UNQUANTIZED
    assert "this file's are Q6_K, so every linear weight is dequantized" in caplog.text
