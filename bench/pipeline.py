"""Pipeline parallelism: throughput and TTFT of the hybrid prompt/token schedule against one fixed micro-batch
count and against tensor parallelism alone on the same GPUs, over one workload (random weights of a real shape,
random prompts and output lengths, eos ignored).

Each run is named t<T>p<P>[-hybrid|-fixed]: T ranks per stage, P stages (T x P processes, one per GPU, or
CPU processes over gloo). On one GPU only t1p1 runs (the degenerate pipeline: a check that the script and
the engine's micro-batch path agree with TP=1); on a multi-GPU host every run that fits.

    python bench/pipeline.py --shape llama3-8b --runs t2p1,t1p2-hybrid,t1p2-fixed,t2p2-hybrid,t2p2-fixed
    python bench/pipeline.py --shape tiny-llama --device cpu --num-requests 8 --min-prompt 16 --max-prompt 64 \
        --min-output 8 --max-output 16 --runs t1p1,t1p2-hybrid,t1p2-fixed     # the CPU check
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ceilings, write_result  # noqa: E402
from shapes import SHAPES, write_config  # noqa: E402
from throughput import make_workload, run_scaleinfer  # noqa: E402

from scaleinfer import LLM  # noqa: E402


def parse_run(name: str) -> dict:
    """t2p2-fixed -> tensor_parallel_size=2, pipeline_parallel_size=2, pipeline_schedule="fixed"."""
    sizes, _, schedule = name.partition("-")
    tp, pp = sizes.removeprefix("t").split("p")
    return {"tensor_parallel_size": int(tp), "pipeline_parallel_size": int(pp),
            "pipeline_schedule": schedule or "hybrid"}


def run_one(folder: Path, name: str, args: argparse.Namespace, dtype: str, work) -> dict:
    options = parse_run(name)
    kv = dict(kv_cache_memory=args.kv_cache_memory) if args.kv_cache_memory else {}
    start = time.perf_counter()
    with LLM(model=str(folder), device=args.device, dtype=dtype, load_format="dummy", skip_tokenizer_init=True,
             progress=False, max_num_batched_tokens=args.max_num_batched_tokens, **kv, **options) as llm:
        startup = time.perf_counter() - start
        figures = run_scaleinfer(llm, work)
        stats = llm.engine.stats()
    return {**options, "startup_s": startup, **asdict(figures), "num_preempted": stats.num_preempted,
            "num_blocks": stats.num_blocks}


def ratios(runs: dict[str, dict]) -> dict[str, float]:
    """hybrid over fixed at each size, and each pipeline over TP alone on as many GPUs."""
    out = {}
    for name, run in runs.items():
        if name.endswith("-hybrid") and name.replace("-hybrid", "-fixed") in runs:
            fixed = runs[name.replace("-hybrid", "-fixed")]
            out[f"{name}_over_fixed"] = run["output_tok_s"] / fixed["output_tok_s"]
        world = run["tensor_parallel_size"] * run["pipeline_parallel_size"]
        tp_alone = runs.get(f"t{world}p1")
        if run["pipeline_parallel_size"] > 1 and tp_alone is not None:
            out[f"{name}_over_t{world}p1"] = run["output_tok_s"] / tp_alone["output_tok_s"]
    return out


def main() -> None:
    args = _parse()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    gpus = torch.cuda.device_count() if args.device == "cuda" else None
    names = [n for n in args.runs if gpus is None or _world(n) <= gpus]
    work = make_workload(args.num_requests, (args.min_prompt, args.max_prompt), (args.min_output, args.max_output),
                         SHAPES[args.shape]["vocab_size"], seed=0)
    result = {"shape": args.shape, "config": SHAPES[args.shape], "num_requests": args.num_requests,
              "prompt_range": [args.min_prompt, args.max_prompt], "output_range": [args.min_output, args.max_output],
              "max_num_batched_tokens": args.max_num_batched_tokens, "ceilings": ceilings(device, dtype),
              "skipped": sorted(set(args.runs) - set(names)), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        write_config(args.shape, Path(tmp))
        for name in names:
            result["runs"][name] = run_one(Path(tmp), name, args, str(dtype).removeprefix("torch."), work)
            print(name, {k: v for k, v in result["runs"][name].items() if k != "latency_ms"}, flush=True)
    result["ratios"] = ratios(result["runs"])
    path = write_result(f"pipeline-{args.shape}", device, result)
    print(result["ratios"])
    print(f"wrote {path}")


def _world(name: str) -> int:
    options = parse_run(name)
    return options["tensor_parallel_size"] * options["pipeline_parallel_size"]


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--runs", type=lambda s: s.split(","),
                        default=["t1p1", "t2p1", "t1p2-hybrid", "t1p2-fixed", "t4p1", "t2p2-hybrid", "t2p2-fixed"])
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--min-prompt", type=int, default=128)
    parser.add_argument("--max-prompt", type=int, default=1024)
    parser.add_argument("--min-output", type=int, default=128)
    parser.add_argument("--max-output", type=int, default=512)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--kv-cache-memory", type=int, default=None, help="bytes per rank (default: the engine's)")
    return parser.parse_args()


if __name__ == "__main__":
    main()
