"""Presence, frequency and repetition penalties and logit bias through LLM.generate on a tiny random Llama."""

import pytest

from scaleinfer import LLM, SamplingParams
from scaleinfer.errors import InvalidRequestError

GREEDY = dict(temperature=0, max_tokens=24, ignore_eos=True)
# Token ids: a prompt this model answers with repeats (its greedy output has a token 4 times), and one
# longer than two KV blocks, so a second run of it starts from the prefix cache.
REPETITIVE = [281, 299, 281, 299, 281, 299]
LONG = [(7 * i) % 300 + 3 for i in range(40)]


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(model=str(tiny_models["llama2"][0]), device="cpu", progress=False)


def max_repeats(token_ids: list[int]) -> int:
    return max(token_ids.count(t) for t in token_ids)


def generate(llm, prompts, params):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def test_zero_penalties_give_the_old_output_exactly(llm):
    plain = generate(llm, [REPETITIVE, LONG], SamplingParams(**GREEDY))
    zeros = SamplingParams(**GREEDY, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0)
    assert generate(llm, [REPETITIVE, LONG], zeros) == plain


def test_frequency_penalty_breaks_repeats_and_stays_in_its_row(llm):
    plain = generate(llm, [REPETITIVE, LONG], SamplingParams(**GREEDY))
    assert max_repeats(plain[0]) >= 3, "the prompt must give a repetitive greedy output"
    params = [SamplingParams(**GREEDY, frequency_penalty=2.0), SamplingParams(**GREEDY)]
    penalized, neighbour = generate(llm, [REPETITIVE, LONG], params)
    assert penalized != plain[0] and max_repeats(penalized) < max_repeats(plain[0])
    assert neighbour == plain[1], "a request without penalties is untouched by its batch neighbour's"


def test_repetition_penalty_covers_prompt_tokens_from_the_prefix_cache(llm):
    params = SamplingParams(**GREEDY, repetition_penalty=1.8)
    first = generate(llm, [LONG], params)[0]
    hits_before = llm.engine.stats().prefix_cache_hit_rate
    again = generate(llm, [LONG], params)[0]
    assert llm.engine.stats().prefix_cache_hit_rate > hits_before, "the second run must hit the prefix cache"
    assert again == first
    assert first != generate(llm, [LONG], SamplingParams(**GREEDY))[0]


def test_logit_bias_forces_and_forbids_tokens(llm):
    forced = generate(llm, [REPETITIVE], SamplingParams(**GREEDY, logit_bias={42: 100.0}))[0]
    assert forced == [42] * GREEDY["max_tokens"]
    plain = generate(llm, [REPETITIVE], SamplingParams(**GREEDY))[0]
    banned = generate(llm, [REPETITIVE], SamplingParams(**GREEDY, logit_bias={plain[0]: -100.0}))[0]
    assert plain[0] not in banned


def test_token_ids_outside_the_vocabulary_are_refused(llm):
    with pytest.raises(InvalidRequestError, match="vocab size"):
        llm.generate([REPETITIVE], SamplingParams(logit_bias={10**6: 1.0}))
    assert not llm.engine.has_unfinished_requests()


def test_penalized_outputs_survive_preemption(llm, tiny_models):
    """Preemption recomputes a sequence's KV; its generated-token counts must stay as they were."""
    prompts = [REPETITIVE, LONG, [9, 8, 7, 9, 8, 7, 9], LONG[::-1]]
    params = SamplingParams(**GREEDY, frequency_penalty=1.2, presence_penalty=0.3, repetition_penalty=1.2)
    roomy = generate(llm, prompts, params)
    small = LLM(model=str(tiny_models["llama2"][0]), device="cpu", progress=False, block_size=8, num_blocks=16)
    assert generate(small, prompts, params) == roomy
    assert small.engine.stats().num_preempted > 0
