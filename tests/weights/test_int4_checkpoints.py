"""AWQ and GPTQ 4-bit checkpoints load as they are: a tiny Llama quantized and packed by reference packers that
follow the tools' own (int4_packers.py), loaded through LLM(model=folder), against the same model with the
dequantized weights in float32 (HF transformers cannot be the oracle here: it loads AWQ and GPTQ only through
the gptqmodel package, and GPTQ through optimum too, neither of which this environment has). Layouts: AWQ GEMM,
GPTQ v1 (symmetric) and v2 (asymmetric), groups of 32 / 64 / 128, GPTQ with and without act-order; tensor
parallelism over gloo; a wrong unpack order fails the comparison; unsupported settings are refused at start."""

import json
import sys
from pathlib import Path

import pytest
import torch
from int4_packers import Layout, pack_awq, pack_gptq, quantize, write_checkpoints, write_folder
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from scaleinfer import LLM, SamplingParams
from scaleinfer.config import CacheConfig, ModelConfig
from scaleinfer.errors import ModelLoadError
from scaleinfer.weights.int4_checkpoint import awq_rows, gptq_rows
from scaleinfer.weights.source import resolve_model
from scaleinfer.worker.model_runner import ModelRunner

sys.path.insert(0, str(Path(__file__).parents[1] / "executor"))
from parity_helpers import prefill_logits  # noqa: E402
from tp_helpers import assert_logprobs_close, generate  # noqa: E402

IDS = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(1)).tolist()
# 18 prompts decode 18 rows a step: past the CPU int4 kernel's 16 (bfloat16 activations), so every matmul is the
# float32 dequantized one, as the reference's; the kernel's own accuracy is test_quant_int4's.
PROMPTS = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist()
           for n in range(5, 41, 2)]
LAYOUTS = [Layout("awq", g) for g in (32, 64, 128)] + [Layout("gptq", g) for g in (32, 64, 128)] + [
    Layout("gptq", 32, act_order=True), Layout("gptq", 64, act_order=True),
    Layout("gptq", 64, act_order=True, checkpoint_format="gptq_v2")]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """Input features 128 (q/k/v/o, gate/up) and 256 (down): one to eight groups of each size."""
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("int4_llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tiny_llama, tmp_path_factory):
    """layout -> (quantized folder, dequantized folder), each written once."""
    root, written = tmp_path_factory.mktemp("int4_checkpoints"), {}

    def folders(layout: Layout) -> tuple[Path, Path]:
        if layout not in written:
            written[layout] = write_checkpoints(tiny_llama, root, layout)
        return written[layout]

    return folders


def _runner(folder, quantization=None) -> ModelRunner:
    config = ModelConfig(str(folder), device="cpu", dtype="float32", quantization=quantization)
    return ModelRunner(config, CacheConfig(num_blocks=64), resolve_model(str(folder)), progress=False)


def assert_same_model(folder: Path, dequantized: Path, tensor_parallel_size: int = 1) -> None:
    """The checkpoint as loaded gives its dequantized model's logits (float32 matmul order apart) and greedy
    tokens. The prefill's logits are compared whole at one process, the decode's top logprobs at any size."""
    if tensor_parallel_size == 1:
        torch.testing.assert_close(prefill_logits(_runner(folder), IDS), prefill_logits(_runner(dequantized), IDS),
                                   atol=2e-4, rtol=1e-4)
    reference, _ = generate(dequantized, PROMPTS, 1)
    outputs, _ = generate(folder, PROMPTS, tensor_parallel_size)
    assert [o.outputs[0].token_ids for o in outputs] == [r.outputs[0].token_ids for r in reference]
    assert_logprobs_close(outputs, reference, atol=2e-4)


def test_unpacked_rows_are_the_packed_weights_to_the_bit():
    """Our unpacking of each packer's words, as the int4 scheme's (q - 8) * scale + zero, is (q - z) * s exactly;
    without AWQ's interleave the same words unpack to other weights."""
    g = torch.Generator().manual_seed(0)
    w, k = torch.randn(48, 128, generator=g), 128
    in_order, scattered = torch.arange(k) // 32, torch.randperm(k, generator=g) // 32
    awq = quantize(w, in_order, 4, sym=False)
    assert torch.equal(awq_rows(**pack_awq(awq)).dequantize(), awq.dequantized())
    assert not torch.equal(awq_rows(**pack_awq(awq, order=None)).dequantize(), awq.dequantized())
    for v1, sym, g_idx in ((True, True, in_order), (True, True, scattered), (False, False, scattered)):
        qz = quantize(w, g_idx, 4, sym=sym)
        packed = pack_gptq(qz, v1)
        rows = gptq_rows(packed["qweight"], packed["qzeros"], packed["scales"], int(v1), packed["g_idx"])
        assert torch.equal(rows.dequantize(), qz.dequantized()), (v1, sym)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
def test_checkpoint_loads_as_its_dequantized_model(checkpoints, layout):
    folder, dequantized = checkpoints(layout)
    layer = _runner(folder).model.model.layers[0].mlp.down_proj
    assert layer.weight.dtype == torch.uint8 and layer.group_size == layout.group_size
    assert layer.weight_scale.shape == (128, 256 // layout.group_size)
    assert_same_model(folder, dequantized)


@pytest.mark.parametrize("layout", [Layout("awq", 64, awq_order=None), Layout("gptq", 64)],
                         ids=["awq-interleave-ignored", "gptq-v1-read-as-v2"])
def test_a_wrong_unpack_order_fails_the_comparison(checkpoints, layout, tmp_path):
    """The comparison can fail: AWQ words packed in plain order, and v1 zeros read as v2's (off by one)."""
    folder, dequantized = checkpoints(layout)
    if layout.method == "gptq":
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"]["checkpoint_format"] = "gptq_v2"
        write_folder(folder, tmp_path / "as_v2", load_file(folder / "model.safetensors"), None)
        (tmp_path / "as_v2" / "config.json").write_text(json.dumps(config))
        folder = tmp_path / "as_v2"
    else:
        dequantized = checkpoints(Layout("awq", 64))[1]  # the weights the interleaved words would have held
    with pytest.raises(AssertionError):
        assert_same_model(folder, dequantized)


@pytest.mark.parametrize("layout", [Layout("gptq", 32, act_order=True), Layout("awq", 64)],
                         ids=lambda layout: layout.name)
def test_checkpoints_at_two_ranks_equal_the_dequantized_model(checkpoints, layout):
    """TP=2 over gloo. AWQ in groups of 64: o_proj's rank holds 64 of its 128 input features, one whole group.
    GPTQ act-order: a row-parallel rank's features lie in every group (padded slots, test_int4_act_order.py)."""
    assert_same_model(*checkpoints(layout), tensor_parallel_size=2)


def test_offloaded_layers_stream_the_checkpoints_levels(checkpoints):
    """offload="cpu": the packed levels stream, input_perm and the scales stay resident; the same tokens."""
    folder, _ = checkpoints(Layout("gptq", 32, act_order=True))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    tokens = []
    for options in ({}, dict(offload="cpu")):
        with LLM(str(folder), device="cpu", dtype="float32", skip_tokenizer_init=True, progress=False,
                 kv_cache_memory=4 << 20, **options) as llm:
            tokens.append([o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)])
    assert tokens[0] == tokens[1]


def test_another_quantization_than_the_checkpoints_is_refused(checkpoints):
    folder, _ = checkpoints(Layout("awq", 64))
    with pytest.raises(ModelLoadError, match=r"quantization='int8': the checkpoint is already quantized \(awq, "
                                             r"4-bit weights in groups of 64\)"):
        _runner(folder, "int8")
    assert _runner(folder, "int4").model.model.layers[0].mlp.down_proj.group_size == 64


def test_a_linear_left_in_float_or_missing_a_part_is_refused(checkpoints, tiny_llama, tmp_path):
    folder, _ = checkpoints(Layout("awq", 64))
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    tensors = load_file(folder / "model.safetensors")
    floats = load_file(tiny_llama / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    cases = (
        ({k: v for k, v in tensors.items() if not k.startswith(name)} | {f"{name}.weight": floats[f"{name}.weight"]},
         r"a linear weight of dtype torch.float32, shape \(128, 256\), where packed 4-bit tensors"),
        ({k: v for k, v in tensors.items() if k != f"{name}.qzeros"}, rf"{name} lacks \['qzeros'\]"),
        (tensors | {f"{name}.scales": tensors[f"{name}.scales"][:2]}, rf"{name}.scales is \(2, 128\)"),
    )
    for i, (case, message) in enumerate(cases):
        write_folder(folder, tmp_path / str(i), case, config)
        with pytest.raises(ModelLoadError, match=message):
            _runner(tmp_path / str(i))


def test_a_g_idx_out_of_order_without_desc_act_is_refused(checkpoints, tmp_path):
    folder, _ = checkpoints(Layout("gptq", 32, act_order=True))
    config = json.loads((folder / "config.json").read_text())["quantization_config"] | {"desc_act": False}
    write_folder(folder, tmp_path / "contradicts", load_file(folder / "model.safetensors"), config)
    with pytest.raises(ModelLoadError, match="g_idx puts input features out of group order but desc_act is false"):
        _runner(tmp_path / "contradicts")


@pytest.mark.parametrize(("change", "message"), [
    (dict(quant_method="awq", bits=8), "awq bits=8 is not supported"),
    (dict(quant_method="gptq", bits=3), "gptq bits=3 is not supported"),
    (dict(quant_method="awq", version="gemv"), "awq version 'gemv' is not supported"),
    (dict(quant_method="awq", zero_point=False), "awq zero_point=False is not supported"),
    (dict(quant_method="awq", backend="llm-awq"), "awq backend 'llm-awq' is not supported"),
    (dict(quant_method="gptq", group_size=-1), "gptq group_size=-1 is not supported"),
    (dict(quant_method="gptq", checkpoint_format="marlin"), "gptq checkpoint_format 'marlin' is not supported"),
    (dict(quant_method="gptq", lm_head=True), "gptq lm_head=True is not supported"),
    (dict(quant_method="gptq", pack_dtype="int16"), "gptq pack_dtype='int16' is not supported"),
    (dict(quant_method="bitsandbytes"), "quant_method 'bitsandbytes' is not supported"),
])
def test_unsupported_settings_are_refused_at_start_naming_them(checkpoints, tmp_path, change, message):
    folder, _ = checkpoints(Layout("gptq", 64))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"bits": 4, "group_size": 64, **change}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match=message):
        resolve_model(str(tmp_path))


def test_a_group_larger_than_a_ranks_input_features_is_refused_at_start(checkpoints):
    """Groups of 128 at TP=2: o_proj's rank holds 64 input features, half a group."""
    folder, _ = checkpoints(Layout("awq", 128))
    with pytest.raises(Exception) as error:
        generate(folder, PROMPTS[:1], 2)
    assert "int4 group size 128 does not divide the 64 input features of each rank at tensor_parallel_size=2" \
        in str(error.value), error.value


@pytest.mark.gpu
@pytest.mark.parametrize("layout", [Layout("awq", 128), Layout("gptq", 32, act_order=True)],
                         ids=lambda layout: layout.name)
def test_checkpoints_on_gpu_give_the_dequantized_models_tokens(checkpoints, layout):
    """float32 on the GPU: the Triton GEMV at decode (4 rows at most: one prompt at a time), the dequantized
    weight and cuBLAS at prefill, CUDA graphs; the same greedy tokens as the dequantized model on the CPU, and
    eager's with graphs. bfloat16 (the GEMV's usual dtype) starts like them."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    folder, dequantized = checkpoints(layout)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    def tokens(model, device, **options):
        with LLM(str(model), device=device, progress=False, kv_cache_memory=1 << 28, skip_tokenizer_init=True,
                 **options) as llm:
            return [llm.generate([p], params)[0].outputs[0].token_ids for p in PROMPTS[:4]]

    expected = tokens(dequantized, "cpu", dtype="float32")
    assert tokens(folder, "cuda", dtype="float32", enforce_eager=True) == expected
    assert tokens(folder, "cuda", dtype="float32") == expected
    assert [t[:2] for t in tokens(folder, "cuda", dtype="bfloat16")] == [t[:2] for t in expected]

