"""Mixtral against HF transformers on a tiny random model: logits, greedy tokens, init_inference on the HF
object (its in-memory expert layout), and streamed weights (offload cpu / nvme) against resident ones."""

import pytest
import torch
from family_checks import (
    assert_greedy_match,
    assert_init_inference_matches,
    assert_logits_match,
    random_prompts,
    save_tiny,
)
from safetensors import safe_open
from transformers import MixtralConfig

from scaleinfer import LLM, SamplingParams
from scaleinfer.errors import ModelLoadError
from scaleinfer.models.registry import model_class
from scaleinfer.offload.layout import LayerLayout
from scaleinfer.offload.loader import parameters_on_meta
from scaleinfer.weights.hf_config import arch_from_hf
from scaleinfer.weights.source import resolve_model

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=512,
    initializer_range=0.2,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
    tie_word_embeddings=False,
)
VARIANTS = {"top2": {}, "top1": dict(num_experts_per_tok=1)}


@pytest.fixture(scope="module")
def mixtral_models(tmp_path_factory):
    """variant -> (saved folder, the HF model object)."""
    out = {}
    for name, overrides in VARIANTS.items():
        folder = tmp_path_factory.mktemp(f"mixtral_{name}")
        out[name] = (folder, save_tiny(MixtralConfig(**{**TINY, **overrides}), folder))
    return out


def test_saved_checkpoint_names_experts_one_matrix_each(mixtral_models):
    """transformers 5 holds fused [E, 2I, H] stacks but saves the released per-expert names: both load."""
    folder, hf_model = mixtral_models["top2"]
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        names = set(handle.keys())
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in names
    assert "model.layers.0.block_sparse_moe.gate.weight" in names
    assert "model.layers.0.mlp.experts.gate_up_proj" in dict(hf_model.named_parameters())


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_hf(mixtral_models, variant):
    assert_logits_match(*mixtral_models[variant])


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_tokens_match_hf(mixtral_models, variant):
    folder, hf_model = mixtral_models[variant]
    assert_greedy_match(folder, hf_model, random_prompts(TINY["vocab_size"]), max_new_tokens=12)


def test_init_inference_left_padded_batch_matches_hf_and_one_at_a_time(mixtral_models):
    assert_init_inference_matches(mixtral_models["top2"][0], random_prompts(TINY["vocab_size"]), max_new_tokens=12)


@pytest.mark.parametrize("offload", ["cpu", "nvme"])
def test_offloaded_greedy_tokens_match_resident(mixtral_models, offload, tmp_path):
    """The 3-D expert stacks pack into the streamed layer buffer like any other parameter; a budget of one
    layer makes both layers take turns in one slot, every step."""
    folder = str(mixtral_models["top2"][0])
    prompts, params = random_prompts(TINY["vocab_size"]), SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    common = dict(device="cpu", skip_tokenizer_init=True, kv_cache_memory=32 << 20, progress=False)
    resident = LLM(model=folder, **common).generate(prompts, params)
    options = dict(offload_path=str(tmp_path)) if offload == "nvme" else {}
    llm = LLM(model=folder, offload=offload, offload_gpu_budget=layer_bytes(folder), **options, **common)
    streamed = llm.generate(prompts, params)
    assert llm.engine.runner.streamer.streams
    assert [o.outputs[0].token_ids for o in streamed] == [o.outputs[0].token_ids for o in resident]


def layer_bytes(folder: str) -> int:
    """One streamed layer's bytes (float32 on the CPU), from a model built on the meta device."""
    arch = resolve_model(folder).arch
    with parameters_on_meta():
        model = model_class(arch)(arch)
    return LayerLayout.of(model.model.layers[0]).nbytes


def test_config_maps_expert_counts():
    config = {**TINY, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "sliding_window": None}
    arch = arch_from_hf(config)
    assert (arch.num_local_experts, arch.num_experts_per_tok, arch.layer_types) == (4, 2, ())
    with pytest.raises(ModelLoadError, match="num_experts_per_tok=5"):
        arch_from_hf({**config, "num_experts_per_tok": 5})


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.mark.gpu
def test_gpu_greedy_tokens_match_hf_and_cuda_graph_decode_equals_eager(mixtral_models, cuda):
    """The Triton MoE path (float32, exact products) gives HF's tokens; decode replayed in CUDA graphs, where a
    host sync would fail the capture, gives the eager tokens, in a batch and alone."""
    folder, hf_model = mixtral_models["top2"]
    prompts, params = random_prompts(TINY["vocab_size"]), SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    common = dict(device="cuda", dtype="float32", skip_tokenizer_init=True, kv_cache_memory=1 << 30, progress=False)
    eager = LLM(model=str(folder), enforce_eager=True, **common)
    expected = [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
    del eager
    hf = hf_model.to("cuda")
    for prompt, tokens in zip(prompts, expected, strict=True):
        ids = torch.tensor([prompt], device="cuda")
        with torch.no_grad():
            out = hf.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16, pad_token_id=0
            )
        assert tokens == out[0, len(prompt) :].tolist()
    hf.to("cpu")
    graphs = LLM(model=str(folder), max_num_seqs=8, **common)
    assert graphs.engine.runner.graphs is not None
    assert [o.outputs[0].token_ids for o in graphs.generate(prompts, params)] == expected
    assert graphs.generate(prompts[0], params)[0].outputs[0].token_ids == expected[0]


@pytest.mark.gpu
def test_gpu_offloaded_greedy_tokens_match_resident(mixtral_models, cuda):
    """Layers streamed through one device slot from pinned host memory (float32: layer_bytes' size)."""
    folder = str(mixtral_models["top2"][0])
    prompts, params = random_prompts(TINY["vocab_size"]), SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    common = dict(device="cuda", dtype="float32", skip_tokenizer_init=True, kv_cache_memory=1 << 30, progress=False)
    resident = LLM(model=folder, **common).generate(prompts, params)
    llm = LLM(model=folder, offload="cpu", offload_gpu_budget=layer_bytes(folder), **common)
    assert llm.engine.runner.streamer.streams
    streamed = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in streamed] == [o.outputs[0].token_ids for o in resident]


@pytest.mark.gpu
def test_gpu_mixtral_8x7b_shape_logits_match_hf_bf16(tmp_path, cuda):
    """Two layers of the Mixtral-8x7B shape in bfloat16 against an fp32 HF oracle: as close as HF's own bf16."""
    from parity_helpers import bf16_logit_errors
    from shapes import write_config

    config = write_config("mixtral-8x7b", tmp_path)
    config.num_hidden_layers = 2
    config.save_pretrained(tmp_path)
    ids = torch.randint(100, 32000, (200,), generator=torch.Generator().manual_seed(0))
    ours_err, hf_err, _, _ = bf16_logit_errors(tmp_path, config, ids)
    assert ours_err < 1.25 * hf_err + 1e-3, (ours_err, hf_err)
