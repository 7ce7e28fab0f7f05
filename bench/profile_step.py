"""Where a step's time goes: torch profiler over a prefill and decode steps of a random-weight shape.

    python bench/profile_step.py --shape llama3-8b [--batch 1] [--eager]
Prints per-step wall times and the top kernels by device time.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import SHAPES, write_config  # noqa: E402

from scaleinfer import LLM, SamplingParams  # noqa: E402


def step_times(llm: LLM, prompts: list[list[int]], new_tokens: int) -> list[float]:
    engine = llm.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(f"p{time.time()}-{i}", prompt, SamplingParams(temperature=0, max_tokens=new_tokens,
                                                                          ignore_eos=True))
    times = []
    while engine.has_unfinished_requests():
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--eager", action="store_true")
    args = parser.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        write_config(args.shape, Path(tmp))
        llm = LLM(model=tmp, dtype="bfloat16", load_format="dummy", skip_tokenizer_init=True,
                  kv_cache_memory=8 << 30, enforce_eager=args.eager, progress=False, enable_prefix_caching=False)
        prompts = [[rng.randrange(1000, 30000) for _ in range(128)] for _ in range(args.batch)]
        step_times(llm, prompts, 8)  # warm-up
        times = step_times(llm, prompts, 16)
        print(f"prefill step {times[0]:.2f} ms; decode steps median {sorted(times[1:])[len(times) // 2]:.2f} ms")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step_times(llm, prompts, 4)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))


if __name__ == "__main__":
    main()
