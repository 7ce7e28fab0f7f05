"""Running a model at several tensor-parallel sizes against HF transformers and against one process; faults
made on purpose (a signal to a worker once it has done some steps) and the check that no process is left."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import torch

from scaleinfer import LLM, SamplingParams

PROMPT_LENGTHS = (5, 17, 9, 30, 23, 12)


def prompts_with_shared_prefix(vocab: int, seed: int = 3) -> list[list[int]]:
    """Random prompts; the last two share a 20-token prefix with the fourth (the prefix cache serves them)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, vocab, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
    prefix = prompts[3][:20]
    return prompts[:4] + [prefix + p[:3] for p in prompts[4:]]


@torch.no_grad()
def hf_greedy(hf_model, prompt: list[int], num_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    for _ in range(num_tokens):
        next_id = hf_model(ids).logits[0, -1].argmax()
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


def generate(folder, prompts, tensor_parallel_size: int, max_tokens: int = 8, **options):
    """(outputs, number of preemptions) of one LLM at this size; its processes are stopped after."""
    options.setdefault("kv_cache_memory", 4 << 20)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=3)
    with LLM(str(folder), device="cpu", dtype="float32", skip_tokenizer_init=True, progress=False,
             tensor_parallel_size=tensor_parallel_size, **options) as llm:
        outputs = llm.generate(prompts, params)
        return outputs, llm.engine.stats().num_preempted


def assert_logprobs_close(outputs, reference, atol: float = 1e-4) -> None:
    for ours, theirs in zip(outputs, reference, strict=True):
        for mine, ref in zip(ours.outputs[0].logprobs, theirs.outputs[0].logprobs, strict=True):
            assert mine.keys() == ref.keys()
            for token_id, logprob in mine.items():
                assert abs(logprob.logprob - ref[token_id].logprob) < atol, (token_id, logprob, ref[token_id])


def signal_worker_after(llm, signum: int, num_steps: int, rank: int = 1) -> threading.Thread:
    """Send signum to worker `rank` once it has finished num_steps steps (from a thread: generate() is running)."""
    executor = llm.engine.executor
    steps_done, pid = executor._run.workers.steps_done, executor.worker_pids[rank - 1]

    def send() -> None:
        while steps_done[rank] < num_steps:
            time.sleep(0.01)
        os.kill(pid, signum)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def assert_no_process_left(pids: list[int]) -> None:
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
