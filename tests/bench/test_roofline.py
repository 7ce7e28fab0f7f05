"""bench/roofline.py: a step's FLOPs and bytes counted by hand for small cases, and the steps recorded from a
real run of the embedded model."""

from __future__ import annotations

import pytest
from roofline import ModelShape, ScheduledChunk, recorded_steps, roofline_seconds, step_cost

from scaleinfer import LLM, SamplingParams

# hidden 8, 2 layers, 2 heads of 4 (1 KV head), MLP 16, vocab 10, 1000 bytes of weights
DENSE = ModelShape(hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4, intermediate_size=16,
                   vocab_size=10, weight_bytes=1000.0)


def test_a_decode_token_costs_its_weights_and_its_context():
    flops, nbytes = step_cost(DENSE, [ScheduledChunk(num_tokens=1, context_len=5, sample=True)])
    attention_params = 8 * 4 * (2 * 2 + 2 * 1)  # q, o: 2 heads; k, v: 1 head
    mlp_params = 3 * 8 * 16
    expected = 2 * 2 * (attention_params + mlp_params) + 4 * 2 * 2 * 4 * 5 + 2 * 8 * 10
    assert flops == expected
    assert nbytes == 1000 + 2 * 2 * 1 * 4 * 2.0 * 5  # K and V of 5 positions, 2 layers, 1 head of 4, bf16


def test_a_prefill_chunk_attends_causally_and_samples_once():
    one, _ = step_cost(DENSE, [ScheduledChunk(1, 1, False)])
    three, _ = step_cost(DENSE, [ScheduledChunk(3, 3, True)])
    per_pair = 4 * 2 * 2 * 4
    assert three - 3 * one == per_pair * (1 + 2 + 3 - 3) + 2 * 8 * 10  # pairs beyond the diagonal, one LM head row


def test_moe_reads_only_the_experts_its_tokens_can_reach():
    moe = ModelShape(8, 2, 2, 1, 4, 16, 10, weight_bytes=1000.0, expert_bytes=800.0, num_experts=8, top_k=2)
    _, one_token = step_cost(moe, [ScheduledChunk(1, 1, True)])
    _, many = step_cost(moe, [ScheduledChunk(1, 1, True) for _ in range(8)])
    kv = 2 * 2 * 1 * 4 * 2.0
    assert one_token == pytest.approx(1000 - 800 * (1 - 2 / 8) + kv)
    assert many == pytest.approx(1000 + 8 * kv)  # 16 routings reach all 8 experts


def test_the_roofline_is_the_sum_of_each_steps_bound():
    steps = [[ScheduledChunk(1, 5, True)], [ScheduledChunk(64, 64, True)]]
    flops = [step_cost(DENSE, s)[0] for s in steps]
    nbytes = [step_cost(DENSE, s)[1] for s in steps]
    out = roofline_seconds(DENSE, steps, matmul_flop_s=1e6, copy_bytes_s=1e6)
    assert out["roofline_s"] == pytest.approx(sum(max(f, b) / 1e6 for f, b in zip(flops, nbytes)))
    assert out["num_steps"] == 2


def test_steps_are_recorded_from_a_real_run():
    llm = LLM(device="cpu", dtype="float32", progress=False, num_threads=1, max_model_len=256, num_blocks=64,
              max_num_batched_tokens=16)
    prompt = list(range(100, 140))  # 40 tokens: chunks of 16, 16, 8 under the budget
    with recorded_steps(llm) as steps:
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    chunks = [c for step in steps for c in step]
    assert [c.num_tokens for c in chunks] == [16, 16, 8, 1, 1]
    assert [c.context_len for c in chunks] == [16, 32, 40, 41, 42]
    assert [c.sample for c in chunks] == [False, False, True, True, True]
    llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)
    assert len(steps) == 5  # recording ends with the block
