"""FastGGUFReader reads the same fields and tensors as gguf's GGUFReader (it only slices the mapping faster)."""

from __future__ import annotations

import numpy as np
from gguf import GGUFReader, GGUFWriter

from scaleinfer.weights.gguf_reader import FastGGUFReader


def write_gguf(path):
    writer = GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.block_count", 2)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_string("tokenizer.chat_template", "{{ messages }}")
    writer.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(300)])
    writer.add_array("tokenizer.ggml.scores", [float(i) for i in range(300)])
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((300, 8), dtype=np.float32))
    writer.add_tensor("output_norm.weight", rng.standard_normal(8).astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_fields_and_tensors_equal_the_stock_reader(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path)
    stock, fast = GGUFReader(path), FastGGUFReader(path)
    assert list(stock.fields) == list(fast.fields)
    for name, field in stock.fields.items():
        other = fast.fields[name]
        assert (field.data, field.types) == (other.data, other.types)
        assert [p.tobytes() for p in field.parts] == [p.tobytes() for p in other.parts]
    assert bytes(fast.fields["tokenizer.ggml.tokens"].parts[fast.fields["tokenizer.ggml.tokens"].data[7]]) == b"tok7"
    assert [t.name for t in stock.tensors] == [t.name for t in fast.tensors]
    for a, b in zip(stock.tensors, fast.tensors):
        assert (a.tensor_type, a.shape.tolist(), a.data_offset) == (b.tensor_type, b.shape.tolist(), b.data_offset)
        assert np.array_equal(a.data, b.data)
