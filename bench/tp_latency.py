"""Batch-1 decode at tensor-parallel sizes T on random weights of a real shape, against each rank's floor.

Per T: ms/token of scaleinfer (T processes, one per GPU), the per-GPU floor (the bytes of one rank's shard
read once per token at the card's measured copy bandwidth), and the all-reduce time per token: one decode
all-reduce ([1, hidden] in the run dtype) timed alone on T ranks, inside a CUDA graph on GPUs, times the
all-reduces a token issues (two per layer and the embedding's). Speedups are against T=1 in the same run.

    python bench/tp_latency.py --shape llama3-8b --sizes 1,2,4 [--device cuda|cpu] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ceilings, decode_bytes_read, timed, write_result  # noqa: E402
from latency import timed_steps  # noqa: E402
from shapes import SHAPES, write_config  # noqa: E402

from scaleinfer import LLM, SamplingParams  # noqa: E402

REPEATS = 64  # all-reduces per timed graph: a token's worth for an 8B model


def decode_latency(folder: Path, size: int, device: str, dtype: str, prompt: list[int], new_tokens: int) -> dict:
    start = time.perf_counter()
    with LLM(model=str(folder), device=device, dtype=dtype, load_format="dummy", skip_tokenizer_init=True,
             kv_cache_memory=2 << 30 if device == "cuda" else 64 << 20, tensor_parallel_size=size,
             progress=False) as llm:
        startup = time.perf_counter() - start
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))  # warm-up
        stamps = timed_steps(llm, prompt, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
        shard_bytes = decode_bytes_read(llm.engine.runner.model)
    decode = (stamps[-1] - stamps[1]) / (len(stamps) - 2)
    return {"startup_s": startup, "ttft_ms": (stamps[1] - stamps[0]) * 1e3, "ms_per_token": decode * 1e3,
            "tok_s": 1 / decode, "rank0_weight_bytes": shard_bytes}


def all_reduce_us(size: int, hidden: int, device: str, dtype: torch.dtype) -> float:
    """Microseconds of one [1, hidden] all-reduce over `size` ranks, as the layers issue it."""
    with mp.Manager() as manager, tempfile.TemporaryDirectory() as tmp:
        out = manager.dict()
        mp.spawn(_all_reduce_rank, args=(size, f"file://{tmp}/rdzv", hidden, device, dtype, out), nprocs=size)
        return out["us"]


def _all_reduce_rank(rank: int, size: int, init: str, hidden: int, device: str, dtype: torch.dtype, out) -> None:
    from scaleinfer.parallel.comm import tp_all_reduce
    from scaleinfer.parallel.groups import RankSpec, backend_for, join_tensor_parallel, leave_tensor_parallel

    dev = torch.device(f"cuda:{rank}" if device == "cuda" else "cpu")
    join_tensor_parallel(RankSpec(rank, size, init, backend_for(dev), 60.0), dev, dtype)
    x = torch.randn(1, hidden, dtype=dtype, device=dev)

    def reduce_many() -> None:
        for _ in range(REPEATS):
            tp_all_reduce(x.clone())

    run = reduce_many
    if dev.type == "cuda":
        reduce_many()
        torch.cuda.synchronize(dev)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            reduce_many()
        run = graph.replay
    best = timed(run, repeats=10, device=dev)
    if rank == 0:
        out["us"] = best / REPEATS * 1e6
    leave_tensor_parallel()


def main() -> None:
    args = _parse()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    shape = SHAPES[args.shape]
    prompt = [random.Random(0).randrange(100, 1000) for _ in range(args.prompt_len)]
    result = {"shape": args.shape, "config": shape, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "batch": 1, "ceilings": ceilings(device, dtype), "sizes": {}}
    copy_gb_s = result["ceilings"]["copy_gb_s"]
    with tempfile.TemporaryDirectory() as tmp:
        write_config(args.shape, Path(tmp))
        for size in args.sizes:
            run = decode_latency(Path(tmp), size, args.device, str(dtype).removeprefix("torch."), prompt,
                                 args.new_tokens)
            run["floor_ms_per_token"] = run["rank0_weight_bytes"] / copy_gb_s / 1e6
            run["fraction_of_floor_speed"] = run["floor_ms_per_token"] / run["ms_per_token"]
            if size > 1:
                per_token = 2 * shape["num_hidden_layers"] + 1
                us = all_reduce_us(size, shape["hidden_size"], args.device, dtype)
                run |= {"all_reduce_us": us, "all_reduces_per_token": per_token,
                        "all_reduce_ms_per_token": us * per_token / 1e3}
            result["sizes"][str(size)] = run
    base = result["sizes"].get("1")
    if base is not None:
        result["ratios"] = {f"speedup_tp{s}": base["ms_per_token"] / r["ms_per_token"]
                            for s, r in result["sizes"].items() if s != "1"}
    path = write_result(f"tp-latency-{args.shape}", device, result)
    print({k: v for k, v in result.items() if k != "config"})
    print(f"wrote {path}")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    return parser.parse_args()


if __name__ == "__main__":
    main()
