"""Expert parallelism on CPU processes over gloo: experts split over E groups of ranks, each sliced over the rest,
tokens sent to them by the all-to-all (plain and coordinated) give one process's greedy tokens and logprobs;
skewed routing (layer 0 sends every token to the same two experts, the others get none); the coordinated
all-to-all moves 1/S of the plain one's bytes; placements that cannot run are refused with their values."""

import pytest
import torch
from cli_helpers import config_of
from family_checks import save_tiny
from safetensors.torch import load_file, save_file
from tp_helpers import assert_logprobs_close, generate, prompts_with_shared_prefix
from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

from scaleinfer import LLM, SamplingParams
from scaleinfer.errors import InvalidRequestError
from scaleinfer.layers.moe import select_experts
from scaleinfer.parallel.all_to_all import comm_bytes, reset_comm_bytes

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
            max_position_embeddings=512, initializer_range=0.2, bos_token_id=None, eos_token_id=None,
            pad_token_id=None, tie_word_embeddings=False)
NUM_TOKENS = 6
# Every step's token count a multiple of 4 (4 prompts of 8, then decodes of 4): the owned shares are exact.
UNIFORM = [[(7 * i + 3 * j) % 250 + 2 for j in range(8)] for i in range(4)]


def skewed(folder):
    """Layer 0's router all zeros: every token picks the same top 2 (a tie), six experts get nothing."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.mlp.gate.weight"].zero_()
    save_file(tensors, path, metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (folder, one process's outputs on the shared-prefix prompts)."""
    configs = {"qwen2_moe": Qwen2MoeConfig(**TINY, shared_expert_intermediate_size=48),
               "qwen3_moe": Qwen3MoeConfig(**TINY, norm_topk_prob=True),
               "mixtral_2_experts": MixtralConfig(**{**TINY, "num_experts": 2, "num_local_experts": 2})}
    out = {}
    for name, config in configs.items():
        folder = tmp_path_factory.mktemp(name)
        save_tiny(config, folder)
        folder = skewed(folder) if name == "qwen2_moe" else folder
        out[name] = (folder, generate(folder, prompts(), 1, NUM_TOKENS)[0])
    return out


def prompts():
    return prompts_with_shared_prefix(TINY["vocab_size"])


def assert_same(outputs, reference):
    assert [o.outputs[0].token_ids for o in outputs] == [r.outputs[0].token_ids for r in reference]
    assert_logprobs_close(outputs, reference)


def run_and_count(folder, size, **options):
    """(outputs on the shared-prefix prompts, rank 0's bytes per collective on the UNIFORM prompts)."""
    with LLM(str(folder), device="cpu", dtype="float32", skip_tokenizer_init=True, progress=False,
             kv_cache_memory=4 << 20, tensor_parallel_size=size, **options) as llm:
        params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=3)
        outputs = llm.generate(prompts(), params)
        reset_comm_bytes()
        llm.generate(UNIFORM, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        return outputs, comm_bytes()


def test_skewed_layer_routes_every_token_to_one_expert_group():
    weights, ids = select_experts(torch.zeros(5, 8), 2, renormalize=False)
    assert (ids == ids[0]).all() and len(set((ids // 4).flatten().tolist())) == 1
    torch.testing.assert_close(weights, torch.full((5, 2), 1 / 8))


def test_two_expert_groups_on_two_ranks_equal_one_process(models):
    """E = 2 over T = 2: whole experts, four per rank; layer 0 sends every token to one rank's experts."""
    folder, reference = models["qwen2_moe"]
    outputs, _ = generate(folder, prompts(), 2, NUM_TOKENS, expert_parallel_size=2)
    assert_same(outputs, reference)


def test_two_expert_groups_sliced_two_ways_coordinated_and_plain(models):
    """E = 2 x S = 2 over 4 ranks, the shared expert and attention sliced 4 ways: both all-to-alls give one
    process's tokens; on steps whose tokens split evenly the plain one sends exactly S = 2 times the bytes."""
    folder, reference = models["qwen2_moe"]
    coordinated, coordinated_bytes = run_and_count(folder, 4, expert_parallel_size=2)
    plain, plain_bytes = run_and_count(folder, 4, expert_parallel_size=2, moe_all_to_all="plain")
    assert_same(coordinated, reference)
    assert_same(plain, reference)
    a2a, plain_a2a = coordinated_bytes["all_to_all"], plain_bytes["all_to_all"]
    assert a2a.calls == plain_a2a.calls == 3 * 2 * 3  # 3 steps x 2 MoE layers x (tokens, ids, outputs)
    assert plain_a2a.sent == 2 * a2a.sent and plain_a2a.received == 2 * a2a.received
    assert "slice_all_gather" in coordinated_bytes and "slice_all_reduce" in plain_bytes


def test_four_expert_groups_equal_one_process(models):
    folder, reference = models["qwen3_moe"]
    reset_comm_bytes()
    outputs, _ = generate(folder, prompts(), 4, NUM_TOKENS, expert_parallel_size=4)
    assert_same(outputs, reference)
    assert set(comm_bytes()) == {"all_to_all", "restore_all_gather"}  # whole experts: no slice group


def test_two_experts_on_four_ranks_each_sliced_two_ways(models):
    """More ranks than experts: each expert on its own pair of ranks, half its width on each."""
    folder, reference = models["mixtral_2_experts"]
    reset_comm_bytes()
    outputs, _ = generate(folder, prompts(), 4, NUM_TOKENS, expert_parallel_size=2)
    assert_same(outputs, reference)
    assert {"all_to_all", "slice_all_gather", "slice_reduce_scatter"} <= set(comm_bytes())


def test_placements_that_cannot_run_are_refused_with_the_values(models, tiny_models):
    mixtral = str(models["mixtral_2_experts"][0])
    common = dict(device="cpu", skip_tokenizer_init=True, progress=False)
    with pytest.raises(InvalidRequestError, match=r"expert_parallel_size=4 does not divide the model's "
                                                  r"num_experts=2; .* choose one of \[1, 2\]"):
        LLM(mixtral, tensor_parallel_size=4, expert_parallel_size=4, **common)
    with pytest.raises(InvalidRequestError, match="expert_parallel_size=3 .* tensor_parallel_size=4 .* 3 does not"):
        LLM(mixtral, tensor_parallel_size=4, expert_parallel_size=3, **common)
    with pytest.raises(InvalidRequestError, match="moe_all_to_all must be one of"):
        LLM(mixtral, tensor_parallel_size=2, expert_parallel_size=2, moe_all_to_all="ring", **common)
    with pytest.raises(InvalidRequestError, match="expert_parallel_size=2 needs a mixture-of-experts model"):
        LLM(str(tiny_models["llama3.1"][0]), tensor_parallel_size=2, expert_parallel_size=2, **common)


@pytest.mark.parametrize("command", [["generate", "hi"], ["serve"]])
def test_expert_parallel_flags_reach_the_parallel_config(command, monkeypatch):
    from scaleinfer import cli

    parallel = config_of([*command, "--tensor-parallel-size", "4", "--expert-parallel-size", "2", "--moe-all-to-all",
                          "plain"], monkeypatch).parallel
    assert (parallel.expert_parallel_size, parallel.moe_all_to_all) == (2, "plain")
    assert cli.main([*command, "--tensor-parallel-size", "4", "--expert-parallel-size", "3"]) == 1


@pytest.mark.gpu
def test_gpu_two_expert_groups_in_cuda_graphs_equal_one_gpu(models):
    """Two GPUs over NCCL: the all-to-all inside captured decode steps (a host sync would fail the capture) gives
    one GPU's tokens in float32, plain and coordinated alike."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    folder = str(models["qwen2_moe"][0])
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    common = dict(device="cuda", dtype="float32", skip_tokenizer_init=True, kv_cache_memory=1 << 30, progress=False)
    with LLM(folder, **common) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(prompts(), params)]
    for mode in ("coordinated", "plain"):
        with LLM(folder, tensor_parallel_size=2, expert_parallel_size=2, moe_all_to_all=mode, **common) as llm:
            assert llm.engine.runner.graphs is not None
            assert [o.outputs[0].token_ids for o in llm.generate(prompts(), params)] == expected, mode
