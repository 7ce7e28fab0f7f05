"""GGUF Q4_K linear weights kept quantized (quantization="gguf"): random super-blocks decoded into the int4
scheme's groups of 32 give gguf's own dequantization (its scales and mins packing included), and a tiny Llama
whose linears are Q4_K runs kept as it runs dequantized (greedy tokens, logits)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from scaleinfer import LLM, SamplingParams
from scaleinfer.layers.quant_int4 import Int4Rows
from scaleinfer.weights.gguf import open_gguf
from scaleinfer.weights.gguf_quant import Q4_K_BYTES, Q4_K_WEIGHTS, read_q4

sys.path.insert(0, str(Path(__file__).parent))
from gguf_tiny import write_tiny_llama  # noqa: E402

Q4_K = GGMLQuantizationType.Q4_K


def random_q4_k(rows: int, cols: int, seed: int) -> np.ndarray:
    """[rows, cols / 256 * 144] uint8: random levels, scale and min bits, small positive float16 d and dmin."""
    rng = np.random.default_rng(seed)
    supers = cols // Q4_K_WEIGHTS
    blocks = rng.integers(0, 256, (rows, supers, Q4_K_BYTES), dtype=np.uint8)
    d = rng.uniform(1e-3, 4e-3, (rows, supers)).astype(np.float16)
    dmin = rng.uniform(1e-3, 4e-3, (rows, supers)).astype(np.float16)
    blocks[..., 0:2] = d[..., None].view(np.uint8).reshape(rows, supers, 2)
    blocks[..., 2:4] = dmin[..., None].view(np.uint8).reshape(rows, supers, 2)
    return blocks.reshape(rows, -1)


class _Tensor:  # what read_q4 reads of a ReaderTensor
    tensor_type = Q4_K

    def __init__(self, data: np.ndarray, cols: int) -> None:
        self.data, self.shape = data, np.array([cols, data.shape[0]])


@pytest.mark.parametrize("rows, cols", [(3, 256), (5, 1024)])
def test_q4_k_blocks_decode_to_ggufs_dequantization(rows, cols):
    data = random_q4_k(rows, cols, seed=cols)
    blocks = read_q4(_Tensor(data, cols))
    assert blocks.levels.shape == (rows, cols) and blocks.scale.shape == (rows, cols // 32)
    assert blocks.levels.max() <= 15
    got = (blocks.levels.astype(np.float32) - 8) * np.repeat(blocks.scale, 32, axis=1) + np.repeat(blocks.zero, 32,
                                                                                                     axis=1)
    want = dequantize(data, Q4_K).reshape(rows, cols)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())


def test_every_sub_block_takes_its_own_scale_and_min():
    """One super-block whose eight scales and mins are all different: a sub-block read with a neighbour's scale or
    min (the packing of sub-blocks 4-7 is the error-prone part) does not give gguf's values."""
    data = random_q4_k(1, 256, seed=7)
    packed = np.array([1, 2, 3, 4, 5, 6, 7, 8, 0x9A, 0xBC, 0xDE, 0xF5], dtype=np.uint8) | np.array(
        [64, 128, 192, 0, 0, 64, 128, 192, 0, 0, 0, 0], dtype=np.uint8)
    data[0, 4:16] = packed
    blocks = read_q4(_Tensor(data, 256))
    assert len(set(blocks.scale[0].tolist())) == 8 and len(set(blocks.zero[0].tolist())) == 8
    got = (blocks.levels.astype(np.float32) - 8) * np.repeat(blocks.scale, 32, axis=1) + np.repeat(blocks.zero, 32,
                                                                                                     axis=1)
    np.testing.assert_allclose(got, dequantize(data, Q4_K).reshape(1, 256), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def q4_k_llama(tmp_path_factory):
    """The tiny Llama with every linear weight random Q4_K."""
    return write_tiny_llama(tmp_path_factory.mktemp("q4k") / "tiny-q4k.gguf",
                            lambda i, name, tensor: (random_q4_k(*tensor.shape, seed=i), Q4_K))


def test_a_q4_k_file_is_kept_and_runs_as_its_dequantized_weights(q4_k_llama):
    """(The q/k rows are stored permuted by no one here: unpermuting random rows changes nothing this compares, as
    both paths unpermute alike.)"""
    source = open_gguf(q4_k_llama)
    tensor = next(t for t in source.reader.tensors if t.name == "blk.1.ffn_down.weight")
    source.kept = frozenset({tensor.name})
    kept = source._to_torch(tensor, torch.float32)
    source.kept = frozenset()
    assert isinstance(kept, Int4Rows) and kept.group_size == 32
    torch.testing.assert_close(kept.dequantize(), source._to_torch(tensor, torch.float32), rtol=0, atol=1e-6)
    # 18 prompts decode 18 rows a step: past the CPU int4 kernel's 16 (bfloat16 activations), so the linears
    # multiply in float32 on both paths; "gguf" makes the embedding and LM head per-row int8 (README), hence the
    # logprob bound (a misread scale or min moves logits by far more)
    prompts = [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in range(5, 41, 2)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
    outputs = {}
    for quantization in ("gguf", None):
        llm = LLM(str(q4_k_llama), device="cpu", dtype="float32", quantization=quantization,
                  skip_tokenizer_init=True, progress=False)
        if quantization == "gguf":
            assert llm.engine.runner.model.model.layers[0].mlp.down_proj.weight.dtype == torch.uint8
        outputs[quantization] = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for kept, dense in zip(outputs["gguf"], outputs[None]):
        assert kept.outputs[0].token_ids == dense.outputs[0].token_ids
        for a, b in zip(kept.outputs[0].logprobs, dense.outputs[0].logprobs):
            token = next(iter(b))
            assert abs(a[token].logprob - b[token].logprob) < 0.1
