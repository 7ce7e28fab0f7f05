"""quantization="gguf" chooses per linear: in a file that mixes Q4_K with Q8_0, Q6_K and Q5_K (a Q4_K_M file
mixes Q6_K in), the linears whose tensors are all Q4_K keep them as int4, those all Q8_0 as group-wise int8, the
others (a fused qkv with one Q6_K part, a gate_up of Q4_K and Q8_0 included) are dequantized to the run dtype,
and the model runs as the fully dequantized one."""

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize, quantize

from scaleinfer import LLM, SamplingParams
from scaleinfer.layers import quant_gguf
from scaleinfer.weights import gguf as scaleinfer_gguf

sys.path.insert(0, str(Path(__file__).parent))
from gguf_tiny import write_tiny_llama  # noqa: E402

T = GGMLQuantizationType
# every linear Q4_K but these
OTHER_TYPES = {"blk.0.attn_v.weight": T.Q6_K, "blk.0.attn_output.weight": T.Q8_0, "blk.0.ffn_down.weight": T.Q6_K,
               **{f"blk.1.attn_{p}.weight": T.Q8_0 for p in "qkv"}, "blk.1.attn_output.weight": T.Q5_K,
               "blk.1.ffn_up.weight": T.Q8_0}
INT4 = {(0, "mlp.gate_up_proj"), (1, "mlp.down_proj")}
INT8 = {(0, "self_attn.o_proj"), (1, "self_attn.qkv_proj")}
DENSE = {(0, "self_attn.qkv_proj"), (0, "mlp.down_proj"), (1, "self_attn.o_proj"), (1, "mlp.gate_up_proj")}
# float16 d (and dmin) of a super-block: where they sit, and a range that keeps the weights of order 1
HEADERS = {T.Q4_K: ((0, 2), (1e-3, 4e-3)), T.Q5_K: ((0, 2), (5e-4, 2e-3)), T.Q6_K: ((208,), (1e-4, 4e-4))}


def random_k_quant(rows: int, cols: int, kind: GGMLQuantizationType, seed: int) -> np.ndarray:
    """[rows, cols / 256 * bytes] uint8: random levels, scales and mins, small positive float16 d (and dmin)."""
    rng = np.random.default_rng(seed)
    weights, size = GGML_QUANT_SIZES[kind]
    supers = cols // weights
    blocks = rng.integers(0, 256, (rows, supers, size), dtype=np.uint8)
    starts, (low, high) = HEADERS[kind]
    for start in starts:
        d = rng.uniform(low, high, (rows, supers)).astype(np.float16)
        blocks[..., start:start + 2] = d[..., None].view(np.uint8).reshape(rows, supers, 2)
    return blocks.reshape(rows, -1)


@pytest.fixture(scope="module")
def mixed_llama(tmp_path_factory):
    """The tiny Llama, its linears random Q4_K but OTHER_TYPES (Q8_0 ones quantized from the HF weights)."""
    def linear_data(i: int, name: str, tensor: torch.Tensor):
        kind = OTHER_TYPES.get(name, T.Q4_K)
        return (quantize(tensor.numpy(), kind) if kind == T.Q8_0 else random_k_quant(*tensor.shape, kind, seed=i)), kind

    return write_tiny_llama(tmp_path_factory.mktemp("mixed") / "tiny-q4_k_m.gguf", linear_data)


def test_random_blocks_of_the_other_types_dequantize():
    for kind in (T.Q5_K, T.Q6_K):
        values = dequantize(random_k_quant(2, 256, kind, seed=1), kind)
        assert np.isfinite(values).all() and 0.01 < np.abs(values).mean() < 10


def test_each_linear_keeps_its_q4_k_blocks_or_is_dequantized_and_runs_as_the_dequantized_model(
        mixed_llama, monkeypatch, caplog):
    # the embedding and LM head as dequantized as the other path's (HEAD_INT8 off): only the linears differ
    monkeypatch.setattr(scaleinfer_gguf, "HEAD_INT8", False)
    # Q8_0 kept on the CPU too: its dequantized matmul, the path a GPU takes past the GEMV's 4 rows
    monkeypatch.setattr(quant_gguf, "Q8_0_DEVICES", ("cuda", "cpu"))
    # 18 prompts decode 18 rows a step: past the CPU int4 kernel's 16 (bfloat16 activations), so kept linears
    # multiply their dequantized blocks in float32, as the dense path does
    prompts = [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in range(5, 41, 2)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
    outputs = {}
    for quantization in ("gguf", None):
        with caplog.at_level(logging.INFO, logger="scaleinfer.weights.gguf"):
            llm = LLM(str(mixed_llama), device="cpu", dtype="float32", quantization=quantization,
                      skip_tokenizer_init=True, progress=False)
        if quantization == "gguf":
            layers = llm.engine.runner.model.model.layers
            for index, name in INT4:
                linear = layers[index].get_submodule(name)
                assert linear.weight.dtype == torch.uint8 and linear.weight_scale.shape[1] == linear.input_size // 32
            for index, name in INT8:
                linear = layers[index].get_submodule(name)
                assert linear.weight.dtype == torch.int8 and linear.weight_scale.shape[1] == linear.input_size // 32
            for index, name in DENSE:
                linear = layers[index].get_submodule(name)
                assert linear.weight.dtype == torch.float32 and not hasattr(linear, "weight_scale")
                assert tuple(linear.weight.shape) == (linear.output_size, linear.input_size)
            said = [r.getMessage() for r in caplog.records if "linear weights quantized" in r.getMessage()]
            assert len(said) == 1 and said[0].endswith("quantization='gguf' keeps 3 Q4_K, 4 Q8_0 linear weights "
                                                       "quantized and dequantizes 3 Q4_K, 1 Q5_K, 2 Q6_K, 1 Q8_0")
        outputs[quantization] = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for kept, dense in zip(outputs["gguf"], outputs[None]):
        assert kept.outputs[0].token_ids == dense.outputs[0].token_ids
        for a, b in zip(kept.outputs[0].logprobs, dense.outputs[0].logprobs):
            for token in b:
                assert abs(a[token].logprob - b[token].logprob) < 1e-3


def test_offloaded_layers_take_the_same_schemes(mixed_llama, monkeypatch):
    """The offload loader builds its layers on the meta device and chooses their schemes the same way: each
    streamed linear holds the same kind of weight and the greedy tokens are those of the resident model."""
    monkeypatch.setattr(quant_gguf, "Q8_0_DEVICES", ("cuda", "cpu"))
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = [{"prompt_token_ids": [1, 2, 3, 4, 5]}, {"prompt_token_ids": [9, 8, 7]}]
    tokens, dtypes = {}, {}
    for offload in ("none", "cpu"):
        llm = LLM(str(mixed_llama), device="cpu", dtype="float32", quantization="gguf", skip_tokenizer_init=True,
                  progress=False, offload=offload)
        layers = llm.engine.runner.model.model.layers
        dtypes[offload] = {(i, n): layers[i].get_submodule(n).weight.dtype for i, n in INT4 | INT8 | DENSE}
        tokens[offload] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert dtypes["cpu"] == dtypes["none"] and tokens["cpu"] == tokens["none"]


def test_q8_0_linears_are_dequantized_on_the_cpu(mixed_llama, caplog):
    """No CPU kernel beats the dequantized matmul for Q8_0's groups: on the CPU its linears take the run dtype (a
    gate_up of Q4_K and Q8_0 was dense anyway) and the line says so; the Q4_K ones stay int4."""
    with caplog.at_level(logging.WARNING, logger="scaleinfer.weights.gguf"):
        llm = LLM(str(mixed_llama), device="cpu", dtype="float32", quantization="gguf", skip_tokenizer_init=True,
                  progress=False)
    layers = llm.engine.runner.model.model.layers
    assert all(layers[i].get_submodule(n).weight.dtype == torch.float32 for i, n in INT8 | DENSE)
    assert all(layers[i].get_submodule(n).weight.dtype == torch.uint8 for i, n in INT4)
    assert ("keeps 3 Q4_K linear weights quantized and dequantizes 3 Q4_K, 1 Q5_K, 2 Q6_K, 5 Q8_0 (Q8_0 is kept on "
            "a GPU only)") in caplog.text


def test_every_tensor_is_transformers_gguf_load_of_the_file(mixed_llama):
    """transformers as the oracle (its own renaming, dequantization and q/k un-permutation): each tensor the
    planned file yields, kept rows dequantized, equals its state dict's (Q8_0 and the dense ones exactly, Q4_K
    within float32's rounding of one subtraction)."""
    from test_gguf_reader import _transformers_gguf_state_dict

    from scaleinfer.layers.quant_int4 import Int4Rows
    from scaleinfer.layers.quant_int8_groups import Int8GroupRows
    from scaleinfer.models.llama import LlamaForCausalLM
    from scaleinfer.weights.gguf import GGUFQuant, open_gguf

    source = open_gguf(mixed_llama)
    expected = _transformers_gguf_state_dict(source.path, source.arch)
    GGUFQuant(source).plan(LlamaForCausalLM.stacked_params, keep_q8_0=True)
    kinds = {}
    for name, tensor in source.iter_weights(torch.float32, progress=False):
        kinds[type(tensor).__name__] = kinds.get(type(tensor).__name__, 0) + 1
        if isinstance(tensor, Int4Rows):
            torch.testing.assert_close(tensor.dequantize(), expected[name], rtol=0, atol=1e-6, msg=name)
        else:
            got = tensor.dequantize() if isinstance(tensor, Int8GroupRows) else tensor
            assert torch.equal(got, expected[name]), name
    assert kinds == {"Int4Rows": 3, "Int8GroupRows": 4, "Tensor": len(expected) - 7}


@pytest.mark.gpu
def test_on_gpu_q8_0_and_q4_k_are_kept_and_give_the_dequantized_models_tokens(mixed_llama, monkeypatch):
    """float32 on the GPU (Q8_0_DEVICES as shipped): the Q8_0 GEMV and the int4 Triton GEMV at decode (one
    prompt at a time), dequantized weights at prefill, CUDA graphs and eager; the same greedy tokens as the
    dequantized model on the CPU. bfloat16 (tinygemm for the int4 linears) gives their first token wherever
    float32's top two are apart by more than bf16 moves them (prompt 5's are 0.02 apart: bf16 picks the
    other, on the CPU's dequantized bf16 model too)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    monkeypatch.setattr(scaleinfer_gguf, "HEAD_INT8", False)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    prompts = [{"prompt_token_ids": torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist()}
               for n in (5, 9, 17, 30)]

    def outputs(device, quantization, **options):
        with LLM(str(mixed_llama), device=device, quantization=quantization, progress=False, kv_cache_memory=1 << 28,
                 skip_tokenizer_init=True, **options) as llm:
            if device == "cuda":
                layers = llm.engine.runner.model.model.layers
                assert all(layers[i].get_submodule(n).weight.dtype == torch.int8 for i, n in INT8)
            return [llm.generate([p], params)[0].outputs[0] for p in prompts]

    def tokens(outs):
        return [out.token_ids for out in outs]

    expected = outputs("cpu", None, dtype="float32")
    assert tokens(outputs("cuda", "gguf", dtype="float32", enforce_eager=True)) == tokens(expected)
    assert tokens(outputs("cuda", "gguf", dtype="float32")) == tokens(expected)
    first_margins = [_top_two_gap(out.logprobs[0]) for out in expected]
    clear = [i for i, gap in enumerate(first_margins) if gap > 0.25]
    assert len(clear) >= 3, first_margins
    bf16 = tokens(outputs("cuda", "gguf", dtype="bfloat16"))
    assert [bf16[i][0] for i in clear] == [tokens(expected)[i][0] for i in clear]


def _top_two_gap(logprobs: dict) -> float:
    first, second = sorted((lp.logprob for lp in logprobs.values()), reverse=True)[:2]
    return first - second
