"""The LLM API end to end on the embedded model: batch invariance, preemption, prefix caching, sampling
controls, and bad input that fails alone without leaking KV blocks."""

import pytest

from scaleinfer import LLM, SamplingParams
from scaleinfer.errors import InvalidRequestError

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea:",
    "1, 2, 3, 4,",
    "In 1969, the first person to walk on the moon was",
    "A recipe for pancakes: first,",
    "def add(a, b):\n    return",
    "The largest planet in the solar system is Jupiter, which is known for its Great Red Spot, a storm",
    "Q: What is the boiling point of water at sea level?\nA:",
]
GREEDY = SamplingParams(temperature=0, max_tokens=24)


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def assert_no_blocks_held(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert stats.num_used_blocks == 0 and stats.num_running == 0 and stats.num_waiting == 0


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu", progress=False)


@pytest.fixture(scope="module")
def alone(llm):
    return [token_ids(llm.generate(p, GREEDY))[0] for p in PROMPTS]


def test_batch_equals_one_at_a_time(llm, alone):
    assert token_ids(llm.generate(PROMPTS, GREEDY)) == alone
    assert_no_blocks_held(llm)


def test_preemption_keeps_outputs_equal(alone):
    # 8 sequences of ~10-30 prompt + 24 new tokens need ~32 blocks of 8 at once; 14 forces preemption.
    small = LLM(device="cpu", progress=False, num_blocks=14, block_size=8)
    assert token_ids(small.generate(PROMPTS, GREEDY)) == alone
    assert small.engine.stats().num_preempted > 0
    assert_no_blocks_held(small)


def test_chunked_prefill_keeps_outputs_equal(alone):
    chunked = LLM(device="cpu", progress=False, max_num_batched_tokens=8)
    assert token_ids(chunked.generate(PROMPTS, GREEDY)) == alone
    assert_no_blocks_held(chunked)


def run_with_long_prompts_arriving(**options):
    """Two streams decode when two long prompts arrive. Returns {request id: tokens} and, for each step until
    both prompts are computed, how many of their tokens it computed (a and b get a token in each of them)."""
    engine = LLM(device="cpu", progress=False, **options).engine
    decode = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    engine.add_request("a", PROMPTS[0], decode)
    engine.add_request("b", PROMPTS[1], decode)
    tokens = {}

    def step():
        tokens.update((output.request_id, output.outputs[0].token_ids) for output in engine.step())

    step()  # both prompts; from now on they decode
    long = " ".join(reversed(PROMPTS))  # no prefix in common with a's or b's
    engine.add_request("c", long + " " + PROMPTS[2], GREEDY)
    engine.add_request("d", PROMPTS[3] + " " + long, GREEDY)
    seqs = [engine.scheduler.get(request_id) for request_id in "abcd"]

    def num_prompt_computed():
        return sum(min(seq.num_computed_tokens, seq.num_prompt_tokens) for seq in seqs[2:])

    per_step = []
    while num_prompt_computed() < sum(seq.num_prompt_tokens for seq in seqs[2:]):
        before = [seq.num_output_tokens for seq in seqs[:2]], num_prompt_computed()
        step()
        assert [seq.num_output_tokens for seq in seqs[:2]] == [num + 1 for num in before[0]]
        per_step.append(num_prompt_computed() - before[1])
    while engine.has_unfinished_requests():
        step()
    return tokens, per_step


def test_mixed_prefill_cap_keeps_outputs_equal():
    capped, capped_steps = run_with_long_prompts_arriving(max_mixed_prefill_tokens=16)
    plain, plain_steps = run_with_long_prompts_arriving()
    assert capped == plain and len(capped) == 4
    assert max(capped_steps) == 16 and len(capped_steps) > 2 * 6  # ~100 tokens each, 16 a step beside the decodes
    assert plain_steps == [sum(plain_steps)]  # 1,024 by default: both prompts in one step


def test_prefix_cache_hits_keep_outputs_equal(llm, alone):
    shared = "You are a helpful assistant. Answer briefly and truthfully. " * 4
    first = token_ids(llm.generate([shared + p for p in PROMPTS[:3]], GREEDY))
    before = llm.engine.block_manager.prefix_cache_stats.num_hit_tokens
    again = token_ids(llm.generate([shared + p for p in PROMPTS[:3]], GREEDY))
    assert llm.engine.block_manager.prefix_cache_stats.num_hit_tokens > before
    assert again == first
    assert_no_blocks_held(llm)


def test_seeded_sampling_is_reproducible_in_any_batch(llm):
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=1234, max_tokens=16)
    alone = token_ids(llm.generate(PROMPTS[0], params))[0]
    batch = [SamplingParams(temperature=1.0, max_tokens=8)] * 3 + [params]
    assert token_ids(llm.generate(PROMPTS[1:4] + [PROMPTS[0]], batch))[3] == alone
    other_seed = token_ids(llm.generate(PROMPTS[0], SamplingParams(temperature=0.8, seed=99, max_tokens=16)))[0]
    assert other_seed != alone


def test_stop_string_truncates_and_reports(llm):
    full = llm.generate("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    assert " 7" in full.text
    out = llm.generate("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=12, stop=[" 7"]))[0].outputs[0]
    assert out.text == full.text[: full.text.index(" 7")]
    assert (out.finish_reason, out.stop_reason) == ("stop", " 7")


def test_stop_token_ids_and_length(llm):
    full = llm.generate("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=6))[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 6
    stop_id = full.token_ids[2]
    out = llm.generate("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=6, stop_token_ids=[stop_id]))[0]
    assert out.outputs[0].token_ids == full.token_ids[:3]
    assert (out.outputs[0].finish_reason, out.outputs[0].stop_reason) == ("stop", stop_id)


def test_logprobs_and_n(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=4, logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == 4
    for token_id, entry in zip(out.token_ids, out.logprobs):
        assert entry[token_id].rank == 1 and len(entry) == 3
    many = llm.generate(PROMPTS[0], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8))[0]
    assert [c.index for c in many.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in many.outputs}) > 1


def test_chat_applies_template(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}], GREEDY)[0]
    assert "<|im_start|>" not in out.outputs[0].text and "Paris" in out.outputs[0].text


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(temperature=-1), "temperature must be >= 0, got -1"),
    (dict(top_p=0), "top_p must be in (0, 1], got 0"),
    (dict(top_p=1.5), "got 1.5"),
    (dict(max_tokens=0), "max_tokens must be an integer >= 1, got 0"),
])
def test_invalid_sampling_values_name_the_value(kwargs, fragment):
    with pytest.raises(InvalidRequestError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        SamplingParams(**kwargs)


def test_bad_prompts_fail_alone(llm):
    engine = llm.engine
    engine.add_request("good", PROMPTS[0], GREEDY)
    engine.step()  # the good request is running
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("empty", "", GREEDY)
    with pytest.raises(InvalidRequestError, match="8192"):
        engine.add_request("long", [1] * 9000, GREEDY)
    with pytest.raises(InvalidRequestError, match="max_tokens is 9000"):
        engine.add_request("past", PROMPTS[0], SamplingParams(max_tokens=9000))
    with pytest.raises(InvalidRequestError, match="49152"):
        engine.add_request("vocab", [1, 49152], GREEDY)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in outputs] == ["good"]
    assert outputs[0].outputs[0].token_ids == token_ids(llm.generate(PROMPTS[0], GREEDY))[0]
    assert_no_blocks_held(llm)


def test_generate_with_one_bad_prompt_raises_and_leaves_nothing(llm):
    with pytest.raises(InvalidRequestError):
        llm.generate([PROMPTS[0], ""], GREEDY)
    assert not llm.engine.has_unfinished_requests()
    assert_no_blocks_held(llm)


def test_abort_frees_blocks(llm):
    llm.engine.add_request("a", PROMPTS[6], SamplingParams(max_tokens=50))
    llm.engine.step()
    assert llm.engine.stats().num_used_blocks > 0
    llm.engine.abort_request(["a"])
    assert_no_blocks_held(llm)


def test_a_request_failing_inside_the_engine_fails_alone(llm, alone):
    engine = llm.engine
    engine.add_request("ok", PROMPTS[0], GREEDY)
    engine.add_request("broken", PROMPTS[1], GREEDY)
    (broken,) = engine.output_processor.requests["broken"].children  # the front's state of its one sequence

    class Corrupted:
        def update(self, *args, **kwargs):
            raise RuntimeError("detokenizer state corrupted")

    broken.detokenizer = Corrupted()
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert "detokenizer state corrupted" in finished["broken"].error
    assert finished["ok"].error is None and finished["ok"].outputs[0].token_ids == alone[0]
    assert_no_blocks_held(llm)


def test_a_request_failing_in_its_step_returns_its_error_with_a_warning(llm, alone, monkeypatch):
    runner = llm.engine.runner
    launch = runner.launch  # the engine queues each step there

    def fails_once_alone(scheduler_output):
        if len(scheduler_output.scheduled) == 1:  # the short request is done: the long one's third step
            raise RuntimeError("injected fault")
        return launch(scheduler_output)

    monkeypatch.setattr(runner, "launch", fails_once_alone)
    params = [SamplingParams(temperature=0, max_tokens=2), GREEDY]
    with pytest.warns(RuntimeWarning, match=r"1 of 2 requests failed inside the engine .*: prompt 1 \(request "
                                            r"'\d+'\): RuntimeError: injected fault"):
        short, failed = llm.generate(PROMPTS[:2], params)
    assert short.error is None and short.outputs[0].token_ids == alone[0][:2]
    assert failed.finished and failed.error == "RuntimeError: injected fault"
    assert failed.outputs[0].token_ids == alone[1][:2]
    assert_no_blocks_held(llm)
