"""Tensor parallelism on one GPU: two ranks sharing the card over gloo (NCCL refuses two ranks on one GPU), and
the symmetric-memory all-reduce on a group of one (the most one card allows) against torch.distributed's."""

import tempfile

import pytest
import torch
import torch.distributed as dist
from tp_helpers import prompts_with_shared_prefix

from scaleinfer import LLM, SamplingParams

pytestmark = pytest.mark.gpu


def run(folder, prompts, dtype, size):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3)
    with LLM(str(folder), device="cuda:0", dtype=dtype, skip_tokenizer_init=True, progress=False,
             kv_cache_memory=64 << 20, tensor_parallel_size=size, max_num_batched_tokens=16) as llm:
        return llm.generate(prompts, params)


def test_two_ranks_on_one_gpu_match_one_rank(tiny_models):
    folder, hf_model = tiny_models["llama3.1"]
    prompts = prompts_with_shared_prefix(hf_model.config.vocab_size)
    fp32 = run(folder, prompts, "float32", 1)
    for ours, ref in zip(run(folder, prompts, "float32", 2), fp32, strict=True):
        assert ours.outputs[0].token_ids == ref.outputs[0].token_ids
    # bf16: the first token's logprobs (same inputs everywhere) are no further from float32's at two ranks than
    # at one, within bf16's rounding of logits near 10 (a few hundredths)
    tp2, tp1 = first_logprob_errors(run(folder, prompts, "bfloat16", 2), fp32), \
        first_logprob_errors(run(folder, prompts, "bfloat16", 1), fp32)
    assert max(tp2) <= 2 * max(tp1) + 0.02, (tp2, tp1)


def first_logprob_errors(outputs, reference) -> list[float]:
    errors = []
    for ours, ref in zip(outputs, reference, strict=True):
        first, first_ref = ours.outputs[0].logprobs[0], ref.outputs[0].logprobs[0]
        errors += [abs(first[t].logprob - first_ref[t].logprob) for t in first.keys() & first_ref.keys()]
    return errors


def test_symmetric_memory_all_reduce_equals_nccl_in_a_graph():
    from scaleinfer.parallel.symm_mem import SmallAllReduce

    device = torch.device("cuda:0")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl", init_method=f"file://{tmp}/rdzv", rank=0, world_size=1)
        try:
            group = dist.new_group([0])
            small = SmallAllReduce.create(device, group, torch.bfloat16)
            assert small is not None, "symmetric memory did not set up on this GPU"
            for numel in (4096, 8192 * 4, small.buffer.numel()):
                x = torch.randn(1, numel, dtype=torch.bfloat16, device=device)
                expected = x.clone()
                dist.all_reduce(expected, group=group)
                assert small.fits(x)
                torch.testing.assert_close(small(x), expected, rtol=0, atol=0)
            x = torch.randn(8, 4096, dtype=torch.bfloat16, device=device)
            small(x)  # warm-up before the capture
            graph, out = torch.cuda.CUDAGraph(), None
            with torch.cuda.graph(graph):
                out = small(x)
            x.copy_(torch.randn_like(x))
            graph.replay()
            torch.testing.assert_close(out, x, rtol=0, atol=0)  # a group of one sums to itself
        finally:
            dist.destroy_process_group()
