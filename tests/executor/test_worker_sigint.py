"""Ctrl-C at a terminal reaches every process of its group: spawned workers ignore it and the engine's process
decides (scaleinfer chat stops a reply and goes on with the same workers)."""

from __future__ import annotations

import os
import signal

from scaleinfer import LLM, SamplingParams


def test_a_worker_survives_sigint_and_the_run_goes_on(tiny_models):
    folder = tiny_models["llama2"][0]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with LLM(str(folder), device="cpu", dtype="float32", skip_tokenizer_init=True, progress=False,
             tensor_parallel_size=2, kv_cache_memory=4 << 20) as llm:
        before = llm.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0].token_ids
        os.kill(llm.engine.executor.worker_pids[0], signal.SIGINT)
        after = llm.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0].token_ids
    assert after == before
