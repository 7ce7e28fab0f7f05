"""kv_offload="cpu" end to end on a tiny random Llama: a working set twice the device's KV blocks completes by
swapping (no recompute) with the unconstrained run's greedy tokens; a prefix-cache hit served from host memory
gives what one from device memory gives; both tiers are empty once every request ended; bad options are refused
naming the value, and the commands' flags reach the config."""

import pytest
import torch
from cli_helpers import config_of

from scaleinfer import LLM, SamplingParams
from scaleinfer.config import EngineConfig
from scaleinfer.errors import InvalidRequestError

BLOCK_SIZE = 8
BLOCK_BYTES = 2 * 2 * 2 * 16 * 4 * BLOCK_SIZE  # layers x (K, V) x KV heads x head_dim x fp32 x tokens
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def start(folder, device="cpu", **options):
    return LLM(str(folder), device=device, dtype="float32", skip_tokenizer_init=True, progress=False,
               block_size=BLOCK_SIZE, **options)


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def random_prompts(num, low, high, seed, vocab=300):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()
            for _ in range(num)]


def assert_both_tiers_empty(llm):
    stats, bm = llm.engine.stats(), llm.engine.block_manager
    assert stats.num_used_blocks == 0 and stats.num_running == 0 and stats.num_waiting == 0
    assert bm.host.num_free == bm.num_host_blocks and not bm.swapped and stats.host_kv_cache_usage == 0.0


@pytest.fixture(scope="module")
def folder(tiny_models):
    return tiny_models["llama3.1"][0]


def test_twice_the_device_budget_swaps_and_keeps_the_tokens(folder):
    prompts = random_prompts(12, 24, 40, seed=0)
    num_needed = sum(-(-(len(p) + GREEDY.max_tokens - 1) // BLOCK_SIZE) for p in prompts)
    assert num_needed == 89  # blocks of every sequence at its end: about twice the 45 below
    with start(folder, num_blocks=128) as roomy:
        expected = token_ids(roomy.generate(prompts, GREEDY))
        assert roomy.engine.stats().num_preempted == 0
    with start(folder, num_blocks=45, kv_offload="cpu", kv_offload_memory=64 * BLOCK_BYTES) as llm:
        assert llm.engine.block_manager.num_host_blocks == 64
        assert token_ids(llm.generate(prompts, GREEDY)) == expected
        stats = llm.engine.stats()
        assert stats.num_preempted > 0 and stats.num_swapped == stats.num_preempted, stats
        assert stats.num_prompt_tokens_computed == sum(map(len, prompts))  # nothing recomputed
        assert_both_tiers_empty(llm)


def test_a_prefix_hit_from_host_memory_equals_one_from_device_memory(folder):
    """A request's prefix is evicted from the device by others and served from the host on the next request."""
    shared = random_prompts(1, 40, 41, seed=1)[0]
    first, later = shared + [5, 6, 7], shared + [9, 8]
    fillers = random_prompts(6, 30, 40, seed=2)
    results = {}
    for tier, options in (("device", dict(num_blocks=128)),
                          ("host", dict(num_blocks=24, kv_offload="cpu", kv_offload_memory=64 * BLOCK_BYTES))):
        with start(folder, **options) as llm:
            llm.generate([first], GREEDY)
            for filler in fillers:  # one at a time: no preemption, only eviction
                llm.generate([filler], GREEDY)
            stats = llm.engine.block_manager.prefix_cache_stats
            hits, host_hits = stats.num_hit_tokens, stats.num_host_hit_tokens
            results[tier] = token_ids(llm.generate([later], GREEDY))
            assert stats.num_hit_tokens - hits == 40, tier  # five full blocks of the shared 40 tokens
            assert stats.num_host_hit_tokens - host_hits == (40 if tier == "host" else 0), tier
            assert llm.engine.stats().num_preempted == 0
            assert_both_tiers_empty(llm)
    with start(folder, num_blocks=128, enable_prefix_caching=False) as uncached:
        assert results["host"] == results["device"] == token_ids(uncached.generate([later], GREEDY))


@pytest.mark.parametrize("options, message", [
    (dict(kv_offload="gpu"), "kv_offload must be one of ('none', 'cpu'), got 'gpu'"),
    (dict(kv_offload="cpu"), "kv_offload='cpu' needs kv_offload_memory"),
    (dict(kv_offload="cpu", kv_offload_memory=0), "kv_offload_memory must be positive bytes, got 0"),
    (dict(kv_offload="cpu", kv_offload_memory="1GiB"), "kv_offload_memory must be positive bytes, got '1GiB'"),
    (dict(kv_offload_memory=1 << 30), "kv_offload_memory=1073741824 is only used with kv_offload='cpu'"),
    (dict(kv_offload_h2d_gb_s=50.0), "kv_offload_h2d_gb_s=50.0 is only used with kv_offload='cpu'"),
    (dict(kv_offload="cpu", kv_offload_memory=1 << 30, kv_offload_tflop_s=-1.0),
     "kv_offload_tflop_s must be a positive rate, got -1.0"),
])
def test_bad_options_are_refused_naming_the_value(options, message):
    with pytest.raises(InvalidRequestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EngineConfig.from_kwargs(**options)


def test_kv_offload_memory_that_holds_no_block_is_refused(folder):
    with pytest.raises(InvalidRequestError, match=f"kv_offload_memory=100 bytes holds no KV block of {BLOCK_BYTES}"):
        start(folder, num_blocks=8, kv_offload="cpu", kv_offload_memory=100)


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"], ["serve"]])
def test_the_commands_take_kv_offload(command, monkeypatch):
    config = config_of([*command, "--kv-offload", "cpu", "--kv-offload-memory", "2GiB"], monkeypatch)
    assert (config.cache.kv_offload, config.cache.kv_offload_memory) == ("cpu", 2 << 30)
    assert config_of(command, monkeypatch).cache.kv_offload == "none"


@pytest.mark.gpu
def test_on_a_gpu_swaps_through_pinned_memory_keep_the_tokens(folder):
    """The side-stream copies under the engine, CUDA graphs on: the same greedy tokens as room for everything.
    The rates make swapping win for a model this small (at an H200's it recomputes)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    prompts = random_prompts(12, 24, 40, seed=0)
    with start(folder, device="cuda", num_blocks=128) as roomy:
        expected = token_ids(roomy.generate(prompts, GREEDY))
    with start(folder, device="cuda", num_blocks=45, kv_offload="cpu", kv_offload_memory=64 * BLOCK_BYTES,
               kv_offload_h2d_gb_s=1e6) as llm:
        assert llm.engine.runner.kv_host.pinned and llm.engine.runner.graphs is not None
        assert token_ids(llm.generate(prompts, GREEDY)) == expected
        stats = llm.engine.stats()
        assert stats.num_preempted > 0 and stats.num_swapped == stats.num_preempted, stats
        assert_both_tiers_empty(llm)
