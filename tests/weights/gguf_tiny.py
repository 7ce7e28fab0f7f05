"""A tiny Llama written as a GGUF file for the kept-quantization tests: hidden 256, intermediate 512 (whole K-quant
super-blocks), random HF weights; each linear's data and type from the caller, the other tensors float32."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_gguf_reader import gguf_name  # noqa: E402

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# (index in the state dict, GGUF tensor name, HF tensor) -> (the tensor's GGUF data, its type)
LinearData = Callable[[int, str, torch.Tensor], tuple[np.ndarray, gguf.GGMLQuantizationType]]


def write_tiny_llama(path: Path, linear_data: LinearData) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, initializer_range=0.2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((writer.add_block_count, 2), (writer.add_context_length, 128),
                       (writer.add_embedding_length, 256), (writer.add_feed_forward_length, 512),
                       (writer.add_head_count, 4), (writer.add_head_count_kv, 2), (writer.add_rope_freq_base, 10000.0),
                       (writer.add_layer_norm_rms_eps, 1e-5), (writer.add_rope_dimension_count, 64)):
        add(value)
    for i, (name, tensor) in enumerate(model.state_dict().items()):
        if name.split(".")[-2] in LINEARS:
            data, kind = linear_data(i, gguf_name(name), tensor)
            writer.add_tensor(gguf_name(name), data, raw_dtype=kind)
        else:
            writer.add_tensor(gguf_name(name), tensor.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
