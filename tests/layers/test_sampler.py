"""Sampling: greedy, top-k/top-p support, seeded reproducibility independent of the batch, logprobs."""

import torch

from scaleinfer.layers.sampler import SamplingBatch, sample

VOCAB = 50


def batch(temps, top_ps=None, top_ks=None, gens=None, banned=None, num_logprobs=-1):
    n = len(temps)
    return SamplingBatch(
        temperatures=torch.tensor(temps, dtype=torch.float32),
        top_ps=None if top_ps is None else torch.tensor(top_ps, dtype=torch.float32),
        top_ks=None if top_ks is None else torch.tensor(top_ks),
        generators=gens or [None] * n,
        banned_token_ids=banned or [[] for _ in range(n)],
        num_logprobs=num_logprobs,
        all_greedy=all(t == 0 for t in temps),
    )


def seeded(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def test_greedy_is_argmax():
    logits = torch.randn(3, VOCAB)
    out = sample(logits.clone(), batch([0, 0, 0]), None)
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()


def test_banned_tokens_are_never_chosen():
    logits = torch.zeros(2, VOCAB)
    logits[:, 7] = 100.0
    out = sample(logits, batch([0, 1.0], banned=[[7], [7]]), seeded(0))
    assert 7 not in out.token_ids.tolist()


def test_top_k_1_is_greedy_and_top_p_keeps_only_the_nucleus():
    logits = torch.randn(4, VOCAB)
    out = sample(logits.clone(), batch([1.0] * 4, top_ks=[1] * 4), seeded(1))
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()
    logits = torch.full((1, VOCAB), -10.0)
    logits[0, [3, 9]] = torch.tensor([5.0, 4.0])  # ~73% and ~27% of the mass
    draws = {sample(logits.clone(), batch([1.0], top_ps=[0.5]), seeded(s)).token_ids.item() for s in range(30)}
    assert draws == {3}
    draws = {sample(logits.clone(), batch([1.0], top_ps=[0.99]), seeded(s)).token_ids.item() for s in range(60)}
    assert draws == {3, 9}


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2] + [0.0] * (VOCAB - 3))
    logits = probs.clamp_min(1e-30).log().repeat(4000, 1)
    out = sample(logits, batch([1.0] * 4000), seeded(0))
    freq = torch.bincount(out.token_ids, minlength=VOCAB)[:3].float() / 4000
    torch.testing.assert_close(freq, probs[:3], atol=0.03, rtol=0)


def test_seeded_row_is_independent_of_the_batch():
    torch.manual_seed(0)
    row = torch.randn(1, VOCAB)
    alone = [sample(row.clone(), batch([0.9], gens=[g]), None).token_ids.item() for g in [seeded(42)] * 1]
    mixed_logits = torch.cat([torch.randn(2, VOCAB), row, torch.randn(3, VOCAB)])
    gens = [None, None, seeded(42), seeded(7), None, None]
    mixed = sample(mixed_logits, batch([0.9, 0, 0.9, 0.5, 1.0, 0], gens=gens), seeded(3)).token_ids[2].item()
    assert mixed == alone[0]


def test_logprobs_rank_and_top():
    logits = torch.randn(2, VOCAB)
    out = sample(logits.clone(), batch([0, 0], num_logprobs=3), None)
    expected = torch.log_softmax(logits, -1)
    torch.testing.assert_close(out.logprobs, expected.max(-1).values)
    assert out.ranks.tolist() == [1, 1]
    torch.testing.assert_close(out.top_logprobs, expected.topk(3).values)
