"""Where a batch-1 decode step's wall time goes on the GPU: kernels, gaps inside the graph, and the host gap.

    python bench/decode_gap.py --shape llama3-8b [--batch 1] [--steps 64]
Measures, on one random-weight shape:
- engine: the median wall time of engine.step() in a generate loop (what bench/latency.py reports);
- device-only: the step's GPU work replayed back to back with no host work between (graph, LM head and
  argmax), so the difference to `engine` is host time the GPU waits through;
- graph-only: the captured decode graph replayed back to back;
- host phases: the wall time of each part of engine.step() (schedule, inputs, forward launch, logits and
  sampling launch, waiting for the sampled token, update and outputs);
- under the torch profiler: kernel time per step and the idle gaps between kernels, split into short
  ones (launch latency inside the graph) and long ones (the host).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ceilings, decode_bytes_read, write_result  # noqa: E402
from profile_step import prefill_budget, start_requests  # noqa: E402
from shapes import SHAPES, write_config  # noqa: E402

from scaleinfer import LLM  # noqa: E402
from scaleinfer.layers.sampler import sample  # noqa: E402
from scaleinfer.worker import model_runner  # noqa: E402
from scaleinfer.worker.step_inputs import build_step_inputs  # noqa: E402

SHORT_GAP_US = 20.0  # idle gaps below this are launch latency between kernels, above it the host's


def engine_step_ms(llm: LLM) -> list[float]:
    """Each decode step's wall time, back to back as generate runs them (no extra synchronization)."""
    times, engine = [], llm.engine
    while engine.has_unfinished_requests():
        begin = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - begin) * 1e3)
    return times


def host_phases_ms(llm: LLM, prompts: list[list[int]], steps: int) -> dict[str, float]:
    """Median wall ms of each phase of engine.step(), by wrapping the engine's parts."""
    engine, runner = llm.engine, llm.engine.runner
    times: dict[str, list[float]] = {}
    # forward: the step's inputs built and the model (or its graph) launched
    originals = {"schedule": (engine.scheduler, "schedule"), "update": (engine.scheduler, "update"),
                 "outputs": (engine.output_processor, "process"), "forward": (runner.steps, "run"),
                 "logits": (runner.model, "compute_logits"), "to_host": (model_runner, "_to_host"),
                 "step": (engine, "step")}
    saved = {name: getattr(obj, attr) for name, (obj, attr) in originals.items()}
    for name, (obj, attr) in originals.items():
        setattr(obj, attr, _wall(times, name, saved[name]))
    try:
        start_requests(llm, prompts, steps + 1)
        times.clear()
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        for name, (obj, attr) in originals.items():
            setattr(obj, attr, saved[name])
    return {name: statistics.median(values) for name, values in times.items()}


def _wall(times: dict[str, list[float]], name: str, fn: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        begin = time.perf_counter()
        result = fn(*args, **kwargs)
        times.setdefault(name, []).append((time.perf_counter() - begin) * 1e3)
        return result
    return wrapper


def back_to_back_ms(llm: LLM, prompts: list[list[int]], reps: int) -> dict[str, float]:
    """The decode step's device work replayed `reps` times with one synchronization at the end."""
    engine, runner = llm.engine, llm.engine.runner
    start_requests(llm, prompts, reps + 4)
    output = engine.scheduler.schedule()  # a pure-decode step, never executed through the engine
    inputs = build_step_inputs(output, runner.block_size, runner.device)
    if runner.graphs is None or not runner.graphs.can_run(inputs):
        raise RuntimeError("no captured graph runs this step; the device-only figures need one")

    def graph() -> None:
        runner.graphs.run(inputs)

    def step() -> None:
        hidden = runner.graphs.run(inputs)
        logits = runner.model.compute_logits(inputs.sampled_hidden(hidden))
        sample(logits, runner.sampling.batch(inputs.sampled, logits.shape[1]), runner.sampling.default_generator)

    with torch.inference_mode():
        return {"graph_only_ms": _per_call_ms(graph, reps), "device_only_ms": _per_call_ms(step, reps)}


def _per_call_ms(fn: Callable[[], None], reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - begin) * 1e3 / reps


def profiled_gaps(llm: LLM, prompts: list[list[int]], steps: int) -> dict[str, float]:
    """Per step under the profiler: kernel time, short gaps (between kernels), long gaps (the host)."""
    start_requests(llm, prompts, steps + 1)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        num_steps = len(engine_step_ms(llm))
    kernels = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA)
    busy = sum(end - begin for begin, end in kernels)
    gaps = [max(0.0, b2 - e1) for (_, e1), (b2, _) in zip(kernels, kernels[1:])]
    short = sum(g for g in gaps if g < SHORT_GAP_US)
    long = sum(g for g in gaps if g >= SHORT_GAP_US)
    return {"kernels_per_step": len(kernels) / num_steps, "kernel_ms": busy / 1e3 / num_steps,
            "short_gap_ms": short / 1e3 / num_steps, "long_gap_ms": long / 1e3 / num_steps,
            "short_gap_limit_us": SHORT_GAP_US}


def main() -> None:
    args = _parse()
    rng = random.Random(0)
    device = torch.device("cuda")
    limits = ceilings(device, torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        write_config(args.shape, Path(tmp))
        llm = LLM(model=tmp, dtype="bfloat16", load_format="dummy", skip_tokenizer_init=True,
                  kv_cache_memory=8 << 30, progress=False, enable_prefix_caching=False,
                  max_num_batched_tokens=prefill_budget(args.batch, args.prompt_len))
        prompts = [[rng.randrange(1000, 30000) for _ in range(args.prompt_len)] for _ in range(args.batch)]
        start_requests(llm, prompts, 8)
        engine_step_ms(llm)  # warm-up
        start_requests(llm, prompts, args.steps + 1)
        engine_ms = statistics.median(engine_step_ms(llm))
        phases = host_phases_ms(llm, prompts, args.steps)
        gaps = profiled_gaps(llm, prompts, args.steps)
        replay = back_to_back_ms(llm, prompts, args.steps)
    weight_gb = decode_bytes_read(llm.engine.runner.model) / 1e9
    payload = {"shape": args.shape, "batch": args.batch, "prompt_len": args.prompt_len, "steps": args.steps,
               "ceilings": limits, "engine_step_ms": engine_ms, **replay, "host_phases_ms": phases,
               "profiler": gaps, "host_gap_ms": engine_ms - replay["device_only_ms"],
               "floor_ms": weight_gb / limits["copy_gb_s"] * 1e3}
    print({k: v for k, v in payload.items() if k != "ceilings"})
    print(write_result(f"decode-gap-{args.shape}", device, payload))


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=64)
    return parser.parse_args()


if __name__ == "__main__":
    main()
