"""Pipeline stages on GPUs: two stages sharing one card (gloo moves the hidden states through host memory) and,
where two cards are visible, one stage per card over NCCL; both give one process's greedy tokens, and logprobs
within float32 noise. Each stage replays its decode steps from CUDA graphs (a stage of one rank holds no
collective; its receive and send stay outside the graphs)."""

import pytest
import torch
from tp_helpers import assert_logprobs_close, prompts_with_shared_prefix

from scaleinfer import LLM, SamplingParams

pytestmark = pytest.mark.gpu
PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3)


def start(folder, device, **options):
    return LLM(str(folder), device=device, dtype="float32", skip_tokenizer_init=True, progress=False,
               kv_cache_memory=64 << 20, max_num_batched_tokens=16, **options)


def run(folder, prompts, device, **options):
    with start(folder, device, **options) as llm:
        return llm.generate(prompts, PARAMS)


def check(folder, hf_model, device):
    prompts = prompts_with_shared_prefix(hf_model.config.vocab_size)
    reference = run(folder, prompts, "cuda:0")
    for schedule in ("hybrid", "fixed"):
        outputs = run(folder, prompts, device, pipeline_parallel_size=2, pipeline_schedule=schedule)
        assert [o.outputs[0].token_ids for o in outputs] == [r.outputs[0].token_ids for r in reference]
        assert_logprobs_close(outputs, reference, atol=2e-3)


def test_two_stages_on_one_gpu_match_one_process(tiny_models):
    check(*tiny_models["llama3.1"], "cuda:0")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_stages_on_two_gpus_over_nccl_match_one_process(tiny_models):
    check(*tiny_models["llama3.1"], "cuda")


def test_two_stages_on_one_gpu_replay_cuda_graphs_and_match_one_process(tiny_models):
    """Graphs on in both stages: the greedy tokens are one process's (which replays graphs too) and eager stages'
    alike, and rank 0's stage (the first: token rows in, hidden states and the residual out of its graphs)
    replayed decode steps. The last stage's side (hidden states into a graph) is checked in one process by
    tests/worker/test_stage_graphs.py."""
    folder, hf_model = tiny_models["llama3.1"]
    prompts = prompts_with_shared_prefix(hf_model.config.vocab_size)
    expected = [r.outputs[0].token_ids for r in run(folder, prompts, "cuda:0", max_num_seqs=8)]
    eager = run(folder, prompts, "cuda:0", max_num_seqs=8, pipeline_parallel_size=2, enforce_eager=True)
    assert [o.outputs[0].token_ids for o in eager] == expected
    with start(folder, "cuda:0", max_num_seqs=8, pipeline_parallel_size=2) as llm:
        runner = llm.engine.core.executor.runner
        assert runner.graphs is not None and runner.graphs.hidden_in is None  # the first stage embeds tokens
        outputs = llm.generate(prompts, PARAMS)
        facts = runner.describe()
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert facts["cuda_graph_sizes"] == [1, 2, 4, 8] and facts["cuda_graph_replays"] > 0, facts
