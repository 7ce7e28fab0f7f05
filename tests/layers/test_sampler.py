"""Sampling: greedy, top-k/top-p support, seeded reproducibility independent of the batch, logprobs, logit bias
and penalties against a token-by-token reference."""

import torch

from scaleinfer.layers.sampler import LogitBias, PenaltyBatch, SamplingBatch, sample

VOCAB = 50


def batch(temps, top_ps=None, top_ks=None, gens=None, banned=None, num_logprobs=-1, penalties=None, logit_bias=None,
          min_ps=None):
    n = len(temps)
    return SamplingBatch(
        temperatures=None if all(t == 0 for t in temps) else torch.tensor(temps, dtype=torch.float32),
        top_ps=None if top_ps is None else torch.tensor(top_ps, dtype=torch.float32),
        top_ks=None if top_ks is None else torch.tensor(top_ks),
        generators=gens or [None] * n,
        banned=None if banned is None else banned_pairs(banned),
        num_logprobs=num_logprobs,
        all_greedy=all(t == 0 for t in temps),
        penalties=penalties,
        logit_bias=logit_bias,
        min_ps=None if min_ps is None else torch.tensor(min_ps, dtype=torch.float32),
    )


def banned_pairs(banned):
    """Per-row lists of banned ids as the (row, token, -inf) triples SamplingBatch carries."""
    pairs = [(row, t) for row, ids in enumerate(banned) for t in ids]
    return LogitBias(rows=torch.tensor([r for r, _ in pairs]), token_ids=torch.tensor([t for _, t in pairs]),
                     biases=torch.full((len(pairs),), float("-inf")))


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
    logits[1, 3] = 90.0
    out = sample(logits, batch([0, 1.0], banned=[[7], [7, 3]]), seeded(0))
    assert 7 not in out.token_ids.tolist() and out.token_ids[1].item() != 3
    assert logits[0, 3].item() == 0.0  # row 0 bans only 7


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


# ---- logit bias and penalties ------------------------------------------------------------------------


def reference_penalties(row, prompt_ids, output_ids, presence, frequency, repetition):
    """One row, token by token, as the OpenAI and vLLM docs state the rules."""
    out = row.clone()
    for t in set(prompt_ids) | set(output_ids):
        out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
    for t in set(output_ids):
        out[t] -= frequency * output_ids.count(t) + presence
    return out


def penalty_batch(rows, prompts, outputs, presence, frequency, repetition):
    counts = torch.zeros(len(rows), VOCAB, dtype=torch.int32)
    mask = torch.zeros(len(rows), VOCAB, dtype=torch.bool)
    for i, (prompt, output) in enumerate(zip(prompts, outputs)):
        mask[i, prompt] = True
        for t in output:
            counts[i, t] += 1
    return PenaltyBatch(rows=torch.tensor(rows), slots=torch.arange(len(rows)), output_counts=counts,
                        prompt_mask=mask, presence=torch.tensor(presence), frequency=torch.tensor(frequency),
                        repetition=torch.tensor(repetition))


def test_penalties_match_the_reference_on_random_logits():
    gen = seeded(0)
    rows, presence, frequency, repetition = [0, 2, 3], [0.5, -1.0, 0.0], [0.7, 0.3, 0.0], [1.3, 0.8, 2.0]
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (5, 9, 3)]
    outputs = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (12, 4, 0)]
    logits = torch.randn(4, VOCAB, generator=gen) * 3
    penalized = logits.clone()
    penalties = penalty_batch(rows, prompts, outputs, presence, frequency, repetition)
    out = sample(penalized, batch([0] * 4, num_logprobs=5, penalties=penalties), None)
    expected = logits.clone()
    for i, row in enumerate(rows):
        expected[row] = reference_penalties(logits[row], prompts[i], outputs[i], presence[i], frequency[i],
                                            repetition[i])
    assert not torch.equal(expected, logits)
    torch.testing.assert_close(penalized, expected)  # row 1 has no penalty: untouched
    assert out.token_ids.tolist() == expected.argmax(-1).tolist()
    torch.testing.assert_close(out.top_logprobs, torch.log_softmax(expected, -1).topk(5).values)


def test_logit_bias_is_added_before_sampling():
    logits = torch.randn(3, VOCAB, generator=seeded(1))
    bias = LogitBias(rows=torch.tensor([0, 0, 2]), token_ids=torch.tensor([4, 9, 4]),
                     biases=torch.tensor([100.0, -3.0, -100.0]))
    biased = logits.clone()
    out = sample(biased, batch([0, 0, 1.0], gens=[None, None, seeded(2)], logit_bias=bias), None)
    expected = logits.clone()
    expected[0, 4] += 100.0
    expected[0, 9] -= 3.0
    expected[2, 4] -= 100.0
    torch.testing.assert_close(biased, expected)
    assert out.token_ids[0].item() == 4 and out.token_ids[2].item() != 4


# ---- min-p -------------------------------------------------------------------------------------------


def reference_min_p_draw(row, temperature, min_p, gen):
    """One row as vLLM's docs state min_p: after temperature, tokens with probability below min_p times the
    top token's are removed; then the exponential race with the row's own noise."""
    probs = torch.softmax(row / temperature, dim=-1)
    kept = torch.where(probs >= min_p * probs.max(), probs, torch.zeros_like(probs))
    kept = kept / kept.sum()
    noise = torch.empty_like(kept).exponential_(generator=gen)
    return (kept / noise).argmax().item(), set(torch.nonzero(kept).flatten().tolist())


def test_min_p_matches_the_reference_row_by_row():
    logits = torch.randn(4, VOCAB, generator=seeded(5)) * 3
    temps, min_ps = [0.7, 1.0, 1.3, 1.0], [0.3, 0.0, 0.05, 1.0]
    for seed in range(20):
        gens = [seeded(seed * 10 + row) for row in range(4)]
        out = sample(logits.clone(), batch(temps, gens=gens, min_ps=min_ps), None)
        for row in range(4):
            token, kept = reference_min_p_draw(logits[row], temps[row], min_ps[row], seeded(seed * 10 + row))
            assert out.token_ids[row].item() == token and token in kept, (seed, row)
    assert len(reference_min_p_draw(logits[3], 1.0, 1.0, seeded(0))[1]) == 1  # min_p 1: only the top token


def test_min_p_removes_the_tail_and_keeps_the_rest():
    logits = torch.full((1, VOCAB), -10.0)
    logits[0, [3, 9, 12]] = torch.tensor([5.0, 4.0, 2.0])  # p(9) / p(3) ~ 0.37, p(12) / p(3) ~ 0.05
    draws = {sample(logits.clone(), batch([1.0], min_ps=[0.2]), seeded(s)).token_ids.item() for s in range(80)}
    assert draws == {3, 9}
