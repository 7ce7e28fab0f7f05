"""Pipeline stages on GPUs: two stages sharing one card (gloo moves the hidden states through host memory) and,
where two cards are visible, one stage per card over NCCL; both give one process's greedy tokens, and logprobs
within float32 noise."""

import pytest
import torch
from tp_helpers import assert_logprobs_close, prompts_with_shared_prefix

from scaleinfer import LLM, SamplingParams

pytestmark = pytest.mark.gpu
PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3)


def run(folder, prompts, device, **options):
    with LLM(str(folder), device=device, dtype="float32", skip_tokenizer_init=True, progress=False,
             kv_cache_memory=64 << 20, max_num_batched_tokens=16, **options) as llm:
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
