"""Pipeline parallelism on CPU processes over gloo: P stages (and T x P ranks) give one process's greedy tokens
and logprobs, with chunked prefill, prefix caching and preemption in play, under the hybrid and the fixed
micro-batch schedules; a dead or hung stage ends the run naming its rank. One LLM per world size: its processes
serve every case of the module."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from tp_helpers import (
    assert_logprobs_close,
    assert_no_process_left,
    hf_greedy,
    prompts_with_shared_prefix,
    signal_worker_after,
)
from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig

from scaleinfer import LLM, SamplingParams
from scaleinfer.errors import InvalidRequestError, RankFailedError
from scaleinfer.parallel.pipeline import MicroBatchPlan

# Chunks of 16 tokens and a cache too small for every sequence at once (preemption by recompute).
PRESSURE = dict(max_num_batched_tokens=16, num_blocks=10, block_size=8)
NUM_TOKENS = 8
PARAMS = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=3)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, initializer_range=0.2, bos_token_id=None, eos_token_id=None,
            pad_token_id=None)


def save(tmp_path_factory, name, config):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """5 layers (stages of 3 + 2 at P=2, 2 + 1 + 1 + 1 at P=4) and a tied head: the last stage, without the
    embedding, loads the head from the embedding's tensor."""
    return save(tmp_path_factory, "llama_pp", LlamaConfig(num_hidden_layers=5, tie_word_embeddings=True, **TINY))


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    config = MixtralConfig(num_hidden_layers=3, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
                           **TINY)
    return save(tmp_path_factory, "mixtral_pp", config)


def start(folder, **options):
    return LLM(str(folder), device="cpu", dtype="float32", skip_tokenizer_init=True, progress=False, **options)


def reference(folder, hf_model):
    """(prompts, one process's outputs)."""
    prompts = prompts_with_shared_prefix(hf_model.config.vocab_size)
    with start(folder, kv_cache_memory=4 << 20) as llm:
        return prompts, llm.generate(prompts, PARAMS)


def check_schedules(llm, prompts, expected, hf_model):
    """Hybrid then fixed on the same processes (the schedule is the engine core's alone): every token equals HF's
    greedy and one process's, logprobs within float32 noise, and the small cache preempted."""
    scheduler = llm.engine.core.scheduler
    for plan in (scheduler.plan, MicroBatchPlan(pp_size=scheduler.plan.pp_size, schedule="fixed")):
        scheduler.plan = plan
        before = llm.engine.stats().num_preempted
        outputs = llm.generate(prompts, PARAMS)
        assert llm.engine.stats().num_preempted > before, "the cache was meant to be too small for every sequence"
        for prompt, output in zip(prompts, outputs, strict=True):
            assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, NUM_TOKENS), (plan, prompt)
        assert_logprobs_close(outputs, expected)
        assert scheduler.in_flight == set() and llm.engine.stats().num_used_blocks == 0


def test_two_stages_llama_hybrid_and_fixed(llama):
    folder, hf_model = llama
    prompts, expected = reference(folder, hf_model)
    with start(folder, pipeline_parallel_size=2, **PRESSURE) as llm:
        assert llm.engine.core.executor.num_stages == 2
        check_schedules(llm, prompts, expected, hf_model)
        check_one_process_beside(folder, prompts, expected)
        check_abort_in_flight(llm, prompts, expected)


def check_one_process_beside(folder, prompts, expected):
    """An LLM built in this process while rank 0 (stage 0) lives is one whole process (its layers, its head), and
    its steps leave rank 0's groups alone (the pipeline's next run still checks out)."""
    with start(folder, kv_cache_memory=4 << 20) as alone:
        assert alone.engine.runner.model.stage.pp_size == 1
        outputs = alone.generate(prompts, PARAMS)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]


def check_abort_in_flight(llm, prompts, expected):
    """A request aborted while its micro-batch is on the stages: the others' tokens are unchanged, its blocks (which
    a later micro-batch may take) come back, nothing stays in flight."""
    engine, core = llm.engine, llm.engine.core
    for i, prompt in enumerate(prompts):
        engine.add_request(f"abort-{i}", prompt, PARAMS)
    outputs = {}
    engine.step()  # fills the pipe: some micro-batches are still in flight
    victim = next(iter(core.scheduler.in_flight))
    engine.abort_request([victim])
    while engine.has_unfinished_requests():
        outputs |= {o.request_id: o for o in engine.step() if o.finished}
    assert victim not in outputs and len(outputs) == len(prompts) - 1
    for i, reference in enumerate(expected):
        if f"abort-{i}" in outputs:
            assert outputs[f"abort-{i}"].outputs[0].token_ids == reference.outputs[0].token_ids
    assert not core.scheduler.in_flight and engine.stats().num_used_blocks == 0


def test_two_stages_mixtral(mixtral):
    folder, hf_model = mixtral
    prompts, expected = reference(folder, hf_model)
    with start(folder, pipeline_parallel_size=2, **PRESSURE) as llm:
        check_schedules(llm, prompts, expected, hf_model)


def test_two_ranks_by_two_stages_and_four_stages(llama):
    folder, hf_model = llama
    prompts, expected = reference(folder, hf_model)
    for options in (dict(tensor_parallel_size=2, pipeline_parallel_size=2), dict(pipeline_parallel_size=4)):
        with start(folder, **options, **PRESSURE) as llm:
            pids = llm.engine.core.executor.worker_pids
            check_schedules(llm, prompts, expected, hf_model)
        assert len(pids) == 3 and not any(Path(f"/proc/{pid}").exists() for pid in pids)


def test_a_killed_stage_ends_the_run_naming_it(llama):
    folder, _ = llama
    with start(folder, pipeline_parallel_size=2, kv_cache_memory=4 << 20) as llm:
        executor = llm.engine.core.executor
        steps_done, pid = executor._run.workers.steps_done, executor.worker_pids[0]

        def kill_after_three_steps() -> None:
            while steps_done[1] < 3:
                time.sleep(0.01)
            os.kill(pid, signal.SIGKILL)

        threading.Thread(target=kill_after_three_steps, daemon=True).start()
        start_time = time.monotonic()
        with pytest.raises(RankFailedError) as failure:
            llm.generate([[5, 6, 7], [8, 9]], SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
        assert time.monotonic() - start_time < 60
        assert "rank 1" in str(failure.value) and "SIGKILL" in str(failure.value), failure.value
        with pytest.raises(RankFailedError):  # every later call names it again
            llm.generate([[5, 6]], SamplingParams(max_tokens=2))


def test_a_hung_stage_ends_the_run_naming_it(llama):
    """SIGSTOP freezes the last stage between two steps: alive, silent. Rank 0 waits for the micro-batch's tokens
    at most (P + 1) x collective_timeout, then names the stage and its rank and stops every process."""
    folder, _ = llama
    with start(folder, pipeline_parallel_size=2, kv_cache_memory=4 << 20, collective_timeout=3.0) as llm:
        pids = llm.engine.executor.worker_pids
        signal_worker_after(llm, signal.SIGSTOP, num_steps=3)
        with pytest.raises(RankFailedError) as failure:
            llm.generate([[5, 6, 7], [8, 9]], SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
        message = str(failure.value)
        assert "pipeline stage 1, rank(s) [1], did not finish step" in message and "hung" in message, message
        with pytest.raises(RankFailedError, match="pipeline stage 1"):  # every later call names it again
            llm.generate([[5, 6]], SamplingParams(max_tokens=2))
    assert_no_process_left(pids)


def test_pipelines_that_cannot_run_are_refused_with_the_value(llama, tmp_path):
    folder, _ = llama
    with pytest.raises(InvalidRequestError, match="pipeline_parallel_size=6 exceeds .*num_hidden_layers=5"):
        start(folder, pipeline_parallel_size=6)
    with pytest.raises(InvalidRequestError, match="pipeline_parallel_size must be an integer >= 1, got 0"):
        start(folder, pipeline_parallel_size=0)
    with pytest.raises(InvalidRequestError, match="pipeline_schedule must be one of"):
        start(folder, pipeline_parallel_size=2, pipeline_schedule="gpipe")
    with pytest.raises(InvalidRequestError, match="pipeline_micro_batches=3 is the fixed schedule's count"):
        start(folder, pipeline_parallel_size=2, pipeline_micro_batches=3)
    with pytest.raises(InvalidRequestError, match="offload='cpu'"):
        start(folder, pipeline_parallel_size=2, offload="cpu")


def test_generate_under_torchrun_in_two_stages_prints_what_one_process_prints(tiny_models):
    """torchrun starts both ranks: rank 0 runs the command and stage 0, rank 1 the last stage's worker loop."""
    folder, _ = tiny_models["llama3.1"]
    args = ["-m", "scaleinfer.cli", "generate", "The capital of France", "--device", "cpu", "--dtype", "float32",
            "--max-tokens", "10", "--model", str(folder)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    alone = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, env=env)
    assert alone.returncode == 0, alone.stderr
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    together = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", *args, "--pipeline-parallel-size",
                               "2"], capture_output=True, text=True, timeout=600, env=env)
    assert together.returncode == 0, together.stderr
    assert together.stdout == alone.stdout
