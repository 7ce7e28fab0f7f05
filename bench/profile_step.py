"""Where a decode step's time goes: torch profiler over decode steps of a random-weight shape.

    python bench/profile_step.py --shape llama3-8b [--batch 1] [--prompt-len 128] [--eager]
    python bench/profile_step.py --batch 64 --prompt-len 4096 --kv-cache-gib 40 --kv-cache-dtype fp8   # FP8 KV
    python bench/profile_step.py --batch 128 --prompt-len 512 --mixed-prompt 512 --kv-cache-gib 24   # mixed steps
Prints the step's wall time and the host time to queue it (unprofiled), then, under the profiler, its wall time
against the device time of its kernels (the rest is host time the device
waits through: scheduling, input building, launches, the sampled-token copy), then the top kernels.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import SHAPES, write_config  # noqa: E402

from scaleinfer import LLM, SamplingParams  # noqa: E402
from scaleinfer.config import KV_CACHE_DTYPES, QUANTIZATIONS  # noqa: E402


def start_requests(llm: LLM, prompts: list[list[int]], new_tokens: int) -> None:
    """Add the prompts and run their prefill, so that the next steps are pure decodes of all of them. The engine
    needs a token budget that holds every prompt (prefill_budget): a prefill over several steps lets the first
    requests spend their tokens before the last start, and the decodes would not be the batch asked for."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    ids = {f"p{time.time()}-{i}" for i in range(len(prompts))}
    for request_id, prompt in zip(sorted(ids), prompts):
        engine.add_request(request_id, prompt, params)
    while ids:
        ids -= {out.request_id for out in engine.step() if out.outputs[0].token_ids}
    running = engine.stats().num_running
    if running != len(prompts):
        raise RuntimeError(f"{running} of {len(prompts)} requests decode after the prefill: give the engine "
                           f"max_num_batched_tokens >= {sum(map(len, prompts))} and KV room for all of them")


def prefill_budget(batch: int, prompt_len: int) -> int:
    """max_num_batched_tokens for start_requests: every prompt in one step (2048, the default, at least)."""
    return max(2048, batch * prompt_len)


def decode_step_ms(llm: LLM) -> list[float]:
    """Wall time of each step until the requests finish, each synchronized on both ends."""
    times = []
    while llm.engine.has_unfinished_requests():
        torch.cuda.synchronize()
        start = time.perf_counter()
        llm.engine.step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def mixed_step_ms(llm: LLM, prompt_len: int, steps: int, rng: random.Random) -> list[float]:
    """Wall time of steps that each decode the running batch and prefill one new prompt of prompt_len tokens (one
    output token, so it leaves when its prefill ends): the mixed steps a server under load runs."""
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    times, prefilled = [], 0
    for step in range(steps):
        prompt = [rng.randrange(1000, 30000) for _ in range(prompt_len)]
        llm.engine.add_request(f"mixed-{time.time()}-{step}", prompt, params)
        torch.cuda.synchronize()
        start = time.perf_counter()
        outputs = llm.engine.step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
        prefilled += sum(out.finished for out in outputs if out.request_id.startswith("mixed-"))
    if prefilled < steps - 1:  # the last prompt may come out one step late (a step launched ahead)
        raise RuntimeError(f"{prefilled} of {steps} new prompts were prefilled in {steps} steps: the steps were not "
                           f"mixed; give the KV cache room for the running batch and one prompt (--kv-cache-gib)")
    return times


def start_batch(llm: LLM, args: argparse.Namespace, prompts: list[list[int]]) -> None:
    start_requests(llm, prompts, args.steps + (2 if args.mixed_prompt else 1))


def timed_steps(llm: LLM, args: argparse.Namespace, rng: random.Random) -> list[float]:
    """args.steps decode (or mixed) steps of the started batch."""
    return mixed_step_ms(llm, args.mixed_prompt, args.steps, rng) if args.mixed_prompt else decode_step_ms(llm)


@contextmanager
def launch_timer(llm: LLM) -> Iterator[list[float]]:
    """The host milliseconds of each runner.launch (scheduled step -> every kernel queued) while inside."""
    runner = llm.engine.core.executor.runner
    launch, times = runner.launch, []

    def timed(output):
        start = time.perf_counter()
        try:
            return launch(output)
        finally:
            times.append((time.perf_counter() - start) * 1e3)

    runner.launch = timed
    try:
        yield times
    finally:
        del runner.launch


def kernel_ms(prof: profile) -> float:
    return sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA) / 1e3


def main() -> None:
    args = _parse()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        write_config(args.shape, Path(tmp))
        llm = LLM(model=tmp, dtype="bfloat16", load_format="dummy", skip_tokenizer_init=True,
                  kv_cache_memory=args.kv_cache_gib << 30, enforce_eager=args.eager, progress=False,
                  max_num_batched_tokens=prefill_budget(args.batch, args.prompt_len), enable_prefix_caching=False,
                  quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
        prompts = [[rng.randrange(1000, 30000) for _ in range(args.prompt_len)] for _ in range(args.batch)]
        start_requests(llm, prompts, 8)  # warm-up
        decode_step_ms(llm)
        if args.mixed_prompt:
            start_requests(llm, prompts, 4)
            mixed_step_ms(llm, args.mixed_prompt, 2, rng)  # warm-up
            decode_step_ms(llm)
        start_batch(llm, args, prompts)
        with launch_timer(llm) as launches:
            plain = timed_steps(llm, args, rng)
        decode_step_ms(llm)  # the rest of a mixed run's batch
        start_batch(llm, args, prompts)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            times = timed_steps(llm, args, rng)
    device = kernel_ms(prof) / len(times)
    wall = statistics.median(times)
    kind = f"mixed steps (+{args.mixed_prompt} prompt tokens)" if args.mixed_prompt else "decode steps"
    print(f"{args.shape} batch {args.batch} x {args.prompt_len} (weights {args.quantization or 'bf16'}, KV cache "
          f"{args.kv_cache_dtype}), {len(times)} {kind}: median wall {statistics.median(plain):.3f} ms, of which "
          f"the host takes {statistics.median(launches):.3f} ms to queue the step (runner.launch). Under the "
          f"profiler: median wall {wall:.3f} ms, kernels {device:.3f} ms per step, the rest {wall - device:.3f} ms")
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=30, max_name_column_width=60))


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--mixed-prompt", type=int, default=0, metavar="N",
                        help="profile steps that also prefill one new N-token prompt each")
    parser.add_argument("--kv-cache-gib", type=int, default=8)
    parser.add_argument("--quantization", choices=[q for q in QUANTIZATIONS if q], default=None)
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto")
    return parser.parse_args()


if __name__ == "__main__":
    main()
