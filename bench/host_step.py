"""Host time of a decode step on the CPU: the engine's Python and torch-op overhead, which a GPU waits
through at small batch (bench/profile_step.py shows it on the GPU as wall time minus kernel time).

    python bench/host_step.py [--batch 1] [--steps 300] [--runs 8] [--output-kind final_only] [--frozen-heap]
The model's forward and logits are constant stubs, so what is timed is scheduling, building the step's
inputs, sampling, the runner's bookkeeping and the engine's outputs. Thread CPU time, not wall time, and
of each phase the median step of each run, best run: the 2-core CI machine is shared and noisy.
--output-kind is what the requests ask the engine's outputs for: final_only as LLM.generate does (one output at
the end), delta as the server's streams do, cumulative (every step, everything so far) as LLMEngine's default.
Medians hide the garbage collector: the result also holds each generation's collections during the timed runs
(count, total and longest pause) and the slowest step; --frozen-heap runs them as the engine core's process does
(scaleinfer/heap.py: the start-up heap frozen out of the collector's walks).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from scaleinfer import SamplingParams  # noqa: E402
from scaleinfer.config import EngineConfig  # noqa: E402
from scaleinfer.engine.llm_engine import LLMEngine  # noqa: E402
from scaleinfer.heap import frozen_heap  # noqa: E402
from scaleinfer.sampling_params import RequestOutputKind  # noqa: E402
from scaleinfer.worker import step_forward  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=4096)
PROMPT_LEN = 128


def stub_model(engine: LLMEngine) -> None:
    """Forward and logits of constant cost: the host path is all that is left."""
    runner, arch = engine.runner, engine.runner.model.arch
    hidden = torch.zeros(1, arch.hidden_size)
    logits = torch.randn(1, arch.vocab_size)
    runner.steps.forward_inputs = lambda inputs, _hidden: hidden.expand(inputs.input_ids.shape[0], -1)
    runner.model.compute_logits = lambda rows: logits.expand(rows.shape[0], -1).clone()


def timed(times: dict[str, list[int]], name: str, fn: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        start = time.thread_time_ns()
        result = fn(*args, **kwargs)
        times.setdefault(name, []).append(time.thread_time_ns() - start)
        return result
    return wrapper


def instrument(engine: LLMEngine, times: dict[str, list[int]]) -> None:
    scheduler = engine.scheduler
    scheduler.schedule = timed(times, "schedule", scheduler.schedule)
    scheduler.update = timed(times, "update", scheduler.update)
    processor = engine.output_processor
    processor.process = timed(times, "outputs", processor.process)
    engine.runner.execute = timed(times, "execute", engine.runner.execute)
    step_forward.build_step_inputs = timed(times, "build_step_inputs", step_forward.build_step_inputs)
    engine.step = timed(times, "step", engine.step)


@contextlib.contextmanager
def collector_pauses(pauses: dict[int, list[float]]) -> Iterator[None]:
    """Each garbage collection in the block: generation -> its pauses in seconds."""
    started = [0.0]

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.setdefault(info["generation"], []).append(time.perf_counter() - started[0])
    gc.callbacks.append(callback)
    try:
        yield
    finally:
        gc.callbacks.remove(callback)


def run(engine: LLMEngine, batch: int, steps: int, tag: str, output_kind: RequestOutputKind) -> None:
    params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True, output_kind=output_kind)
    for i in range(batch):
        engine.add_request(f"{tag}-{i}", list(range(3, 3 + PROMPT_LEN)), params)
    engine.step()  # the prefill
    while engine.has_unfinished_requests():
        engine.step()


def main() -> None:
    args = _parse()
    torch.set_num_threads(1)
    times: dict[str, list[int]] = {}
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        from transformers import LlamaConfig

        LlamaConfig(**TINY).save_pretrained(tmp)
        engine = LLMEngine(EngineConfig.from_kwargs(model=tmp, device="cpu", load_format="dummy",
                                                    skip_tokenizer_init=True), progress=False)
        stub_model(engine)
        output_kind = RequestOutputKind[args.output_kind.upper()]
        run(engine, args.batch, 16, "warm-up", output_kind)
        instrument(engine, times)
        pauses: dict[int, list[float]] = {}
        slowest_step = 0.0
        heap = frozen_heap() if args.frozen_heap else contextlib.nullcontext()
        with heap, collector_pauses(pauses):
            for index in range(args.runs):
                times.clear()
                run(engine, args.batch, args.steps, f"run{index}", output_kind)
                for name, values in times.items():
                    best[name] = min(best.get(name, float("inf")), statistics.median(values[1:]) / 1e3)  # no prefill
                slowest_step = max(slowest_step, max(times["step"][1:]) / 1e3)
    phases = ", ".join(f"{k} {v:.1f}" for k, v in best.items())
    collections = {f"gen{gen}": {"count": len(p), "total_ms": 1e3 * sum(p), "max_ms": 1e3 * max(p)}
                   for gen, p in sorted(pauses.items())}
    print(f"batch {args.batch}, {args.output_kind} outputs, host us per decode step: {phases}; slowest step "
          f"{slowest_step:.0f} us; collections: " + ", ".join(f"{g} {c['count']} (longest {c['max_ms']:.1f} ms)"
                                                            for g, c in collections.items()))
    payload = {"batch": args.batch, "steps": args.steps, "runs": args.runs, "prompt_len": PROMPT_LEN,
               "output_kind": args.output_kind, "frozen_heap": args.frozen_heap,
               "host_us_per_step": best, "slowest_step_us": slowest_step, "garbage_collections": collections}
    print(write_result("host-step", torch.device("cpu"), payload))


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--output-kind", choices=[k.name.lower() for k in RequestOutputKind], default="final_only")
    parser.add_argument("--frozen-heap", action="store_true", help="time with the start-up heap frozen (gc.freeze)")
    return parser.parse_args()


if __name__ == "__main__":
    main()
