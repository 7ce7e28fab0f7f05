"""kv_cache_dtype="fp8": e4m3 KV pages, twice the bf16 tokens (four times fp32's) in the same memory, logits
and greedy tokens close to the unquantized cache's; the commands take --kv-cache-dtype."""

import sys
from pathlib import Path

import pytest
import torch

from scaleinfer import LLM, SamplingParams
from scaleinfer.config import CacheConfig, ModelConfig
from scaleinfer.outputs import ScheduledSequence, SchedulerOutput
from scaleinfer.weights.source import resolve_model
from scaleinfer.worker.model_runner import ModelRunner
from scaleinfer.worker.step_inputs import build_step_inputs

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
from parity_helpers import prefill_logits  # noqa: E402


def _runner(folder, dtype="float32", **cache):
    config = ModelConfig(str(folder), device="cpu", dtype=dtype)
    return ModelRunner(config, CacheConfig(**cache), resolve_model(str(folder)), progress=False)


def test_an_fp8_cache_holds_twice_the_bf16_blocks_in_the_same_memory(tiny_models):
    folder, _ = tiny_models["llama3.1"]
    budget = 1 << 20
    blocks = {(dtype, kv): _runner(folder, dtype, kv_cache_memory=budget, kv_cache_dtype=kv).num_blocks
              for dtype in ("bfloat16", "float32") for kv in ("auto", "fp8")}
    assert blocks["bfloat16", "fp8"] == 2 * blocks["bfloat16", "auto"]
    assert blocks["float32", "fp8"] == 4 * blocks["float32", "auto"]
    # 2 layers x 2 (K, V) x 2 KV heads x head_dim 16 x 16 tokens, one byte each
    assert blocks["bfloat16", "fp8"] == budget // (2 * 2 * 2 * 16 * 16)
    runner = _runner(folder, "bfloat16", num_blocks=4, kv_cache_dtype="fp8_e4m3")
    attn = runner.model.model.layers[0].self_attn.attn
    assert attn.k_cache.dtype == attn.v_cache.dtype == torch.float8_e4m3fn and attn.cache_scales == (1.0, 1.0)


def _decode_logits(runner: ModelRunner, token_ids: list[int]) -> torch.Tensor:
    """Prefill all but the last token, then the last as a decode step: its logits [1, vocab]."""
    block_table = list(range(-(-len(token_ids) // runner.block_size)))
    prefix = ScheduledSequence("p", token_ids[:-1], 0, block_table, True, SamplingParams())
    step = ScheduledSequence("p", token_ids[-1:], len(token_ids) - 1, block_table, False, SamplingParams())
    with torch.inference_mode():
        for seq in (prefix, step):
            inputs = build_step_inputs(SchedulerOutput([seq]), runner.block_size, runner.device)
            hidden = runner.model(inputs.input_ids, inputs.positions, inputs.attn)
    return runner.model.compute_logits(hidden[-1:])


def test_logits_over_an_fp8_cache_are_close_to_the_unquantized_caches(tiny_models):
    """Every attention reads its keys and values from the cache (a chunk's own too), so every position sees e4m3
    K/V: measured relative error 7.6-7.9% of the logits after two random layers (initializer_range 0.2, K and V
    around 1, so the default scale 1.0 keeps them normal e4m3 numbers), for prefill chunks and a decode step."""
    folder, _ = tiny_models["llama3.1"]
    ids = torch.randint(2, 300, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    exact, fp8 = (_runner(folder, num_blocks=64, kv_cache_dtype=kv) for kv in ("auto", "fp8"))
    for run in (prefill_logits, _decode_logits):
        want, got = run(exact, ids), run(fp8, ids)
        assert 0 < (got - want).norm() / want.norm() < 0.15
    prefill_exact, prefill_fp8 = prefill_logits(exact, ids), prefill_logits(fp8, ids)
    assert (prefill_fp8.argmax(-1) == prefill_exact.argmax(-1)).float().mean() >= 0.8


def test_generate_over_an_fp8_cache_starts_with_the_same_tokens(tiny_models):
    """End to end: the engine's steps over an fp8 cache; the random tiny model is chaotic, so later tokens drift
    (measured: equal for the first 1-4 tokens of each prompt)."""
    folder, _ = tiny_models["llama3.1"]
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 300, (n,), generator=g).tolist() for n in (5, 17, 30)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outputs = []
    for kv in ("auto", "fp8"):
        with LLM(str(folder), device="cpu", dtype="float32", skip_tokenizer_init=True, progress=False,
                 kv_cache_memory=4 << 20, kv_cache_dtype=kv) as llm:
            outputs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
    exact, fp8 = outputs
    assert [t[0] for t in fp8] == [t[0] for t in exact] and all(len(t) == 12 for t in fp8)


@pytest.mark.parametrize("command", [["generate", "hi"], ["serve"]])
def test_kv_cache_dtype_flag_reaches_the_cache_config(command):
    from scaleinfer import cli

    args = cli._parser().parse_args([*command, "--kv-cache-dtype", "fp8"])
    assert cli._engine_config(args).cache.kv_cache_dtype == "fp8"
    with pytest.raises(SystemExit):
        cli._parser().parse_args([*command, "--kv-cache-dtype", "int8"])
