"""Start-up: seconds from a new process to the first request's first token, and where they go (imports,
weights, KV cache, CUDA-graph capture graph by graph, warm-up), for a random-weight shape on one GPU.

    python bench/startup.py --shape llama3-8b

Each trial is a fresh process: first with an empty Triton cache (a new machine), then with the cache the
first left (every later start on that machine), then the warm cache with --enforce-eager (no graphs). The
first request after start-up is timed against the second, the same, to show whether the first is slower.
The parent writes the shape's config.json once (transformers' config classes are the bench's, not the
engine's: a child imports only what a user's `LLM(...)` does) and each child records the clock at each phase
(torch imported, scaleinfer imported, LLM built, first token); a fourth, warm trial runs the LLM build under
cProfile and records the functions it spent most in (cumulative; the profiler slows it, so its times are not
the figures).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START = time.perf_counter()


def child(args: argparse.Namespace) -> dict:
    import contextlib
    import cProfile

    import torch

    torch_at = time.perf_counter() - START
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from latency import timed_steps

    from scaleinfer import LLM, SamplingParams

    imported = time.perf_counter() - START
    begin = time.perf_counter()
    profile = cProfile.Profile() if args.profile else None
    with profile or contextlib.nullcontext():
        llm = LLM(model=args.config_dir, dtype="bfloat16", load_format="dummy", skip_tokenizer_init=True,
                  progress=False, kv_cache_memory=args.kv_cache_gib << 30, enforce_eager=args.enforce_eager)
    built = time.perf_counter() - begin
    prompt = list(range(1000, 1128))
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    first, second = (_request(llm, prompt, params, timed_steps) for _ in range(2))
    torch.cuda.synchronize()
    runner = llm.engine.runner
    graphs = runner.graphs
    log = graphs.capture_log if graphs else []
    return {"torch_import_s": torch_at, "import_s": imported, "llm_s": built,
            "to_first_token_s": first.pop("first_token_at_s"), "describe": runner.describe(), "num_graphs": len(log),
            "graph_warm_up_s": sum(entry[2] for entry in log), "graph_capture_s": sum(entry[3] for entry in log),
            "slowest_graphs": sorted(log, key=lambda e: -(e[2] + e[3]))[:8],
            "llm_profile": _top(profile, 30) if profile else None,
            "first_request": first, "second_request": {k: v for k, v in second.items() if k != "first_token_at_s"}}


def _top(profile, n: int) -> list[list]:
    """The n functions of the profile with the most cumulative seconds: [seconds, calls, 'file:line(name)']."""
    import pstats

    stats = pstats.Stats(profile).stats
    rows = [(cumulative, calls, f"{Path(file).name}:{line}({name})")
            for (file, line, name), (_, calls, _, cumulative, _) in stats.items()]
    return [[round(s, 4), c, where] for s, c, where in sorted(rows, reverse=True)[:n]]


def _request(llm, prompt: list[int], params, timed_steps) -> dict:
    stamps = timed_steps(llm, prompt, params)
    decode = (stamps[-1] - stamps[1]) / (len(stamps) - 2)
    return {"ttft_ms": (stamps[1] - stamps[0]) * 1e3, "ms_per_token": decode * 1e3,
            "first_token_at_s": stamps[1] - START}


def trial(args: argparse.Namespace, triton_cache: str, enforce_eager: bool, profile: bool = False) -> dict:
    env = {**os.environ, "TRITON_CACHE_DIR": triton_cache}
    command = [sys.executable, __file__, "--child", "--config-dir", args.config_dir, "--kv-cache-gib",
               str(args.kv_cache_gib)]
    command += ["--enforce-eager"] if enforce_eager else []
    command += ["--profile"] if profile else []
    begin = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    out = json.loads(run.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - begin
    return out


def main() -> None:
    args = _parse()
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import ceilings, write_result
    from shapes import write_config

    device = torch.device("cuda")
    result = {"shape": args.shape, "ceilings": ceilings(device, torch.bfloat16)}

    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as folder:
        write_config(args.shape, Path(folder))
        args.config_dir = folder
        result["cold_triton_cache"] = trial(args, cache, enforce_eager=False)
        result["warm_triton_cache"] = trial(args, cache, enforce_eager=False)
        result["warm_enforce_eager"] = trial(args, cache, enforce_eager=True)
        result["warm_profiled"] = trial(args, cache, enforce_eager=False, profile=True)
    path = write_result(f"startup-{args.shape}", device, result)
    print(json.dumps(result))
    print(f"wrote {path}")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--kv-cache-gib", type=int, default=16)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config-dir", help=argparse.SUPPRESS)  # the child's: the folder the parent wrote
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    main()
