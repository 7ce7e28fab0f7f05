"""The KV cache's host tier on one device: the FlexGen workload (prompt 512, 32 new tokens, greedy, eos ignored)
with the device's KV budget at a fraction (default half) of what every request needs at once, preempted
sequences swapped to host memory and back (kv_offload="cpu", the swap decision at this card's measured pinned
host-to-device rate and matmul rate) against the same budget recomputing them, and against a budget that holds
everything (no preemption: the ceiling either approaches). Random weights of a real shape; one JSON result.

    python bench/kv_tier.py --shape llama3-8b                      # one GPU
    python bench/kv_tier.py --shape tiny-llama --device cpu --num-requests 16 --prompt-len 64 --new-tokens 8
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ceilings, write_result  # noqa: E402
from shapes import SHAPES, write_config  # noqa: E402

from scaleinfer import LLM, SamplingParams  # noqa: E402

BLOCK_SIZE = 16
RUNS = ("full", "recompute", "swap")


def workload(num_requests: int, prompt_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, min(vocab_size, 30000)) for _ in range(prompt_len)] for _ in range(num_requests)]


def blocks_needed(num_requests: int, prompt_len: int, new_tokens: int) -> int:
    """KV blocks of every request at its end (its last token is never fed back)."""
    return num_requests * -(-(prompt_len + new_tokens - 1) // BLOCK_SIZE)


def run_options(run: str, num_blocks: int, limits: dict[str, float], block_bytes: int) -> dict:
    """The LLM options of a run over num_blocks device blocks: swap's host tier holds twice as many, and decides
    at the measured rates."""
    if run != "swap":
        return {"num_blocks": num_blocks}
    h2d = limits.get("pinned_h2d_gb_s", limits["copy_gb_s"] / 2)  # a CPU's "host to device" is a memcpy
    tflop_s = next(v for k, v in limits.items() if k.startswith("matmul_"))
    return {"num_blocks": num_blocks, "kv_offload": "cpu", "kv_offload_memory": 2 * num_blocks * block_bytes,
            "kv_offload_h2d_gb_s": h2d, "kv_offload_tflop_s": tflop_s}


def measure(folder: Path, args: argparse.Namespace, dtype: str, options: dict, prompts: list[list[int]]) -> dict:
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    with LLM(str(folder), device=args.device, dtype=dtype, load_format="dummy", skip_tokenizer_init=True,
             progress=False, block_size=BLOCK_SIZE, max_num_batched_tokens=args.max_num_batched_tokens,
             max_num_seqs=args.num_requests, **options) as llm:
        warm_up = workload(2, len(prompts[0]), llm.engine.arch.vocab_size, seed=1)  # not the measured prompts' prefixes
        llm.generate(warm_up, params, use_tqdm=False)  # kernels compiled before the clock starts
        before = llm.engine.stats()
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        stats = llm.engine.stats()
    assert all(len(o.outputs[0].token_ids) == args.new_tokens for o in outputs)
    num_output = args.new_tokens * len(prompts)
    return {"options": options, "seconds": seconds, "output_tok_s": num_output / seconds,
            "total_tok_s": (num_output + sum(map(len, prompts))) / seconds,
            "num_preempted": stats.num_preempted - before.num_preempted,
            "num_swapped": stats.num_swapped - before.num_swapped,
            "num_prompt_tokens_computed": stats.num_prompt_tokens_computed - before.num_prompt_tokens_computed,
            "tokens": [o.outputs[0].token_ids for o in outputs]}


def block_bytes_of(shape: dict, itemsize: int) -> int:
    head_dim = shape.get("head_dim", shape["hidden_size"] // shape["num_attention_heads"])
    return 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * head_dim * itemsize * BLOCK_SIZE


def main() -> None:
    args = _parse()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    limits = ceilings(device, dtype)
    shape = SHAPES[args.shape]
    prompts = workload(args.num_requests, args.prompt_len, shape["vocab_size"])
    num_needed = blocks_needed(args.num_requests, args.prompt_len, args.new_tokens)
    num_blocks = max(1, int(num_needed * args.kv_fraction))
    block_bytes = block_bytes_of(shape, dtype.itemsize)
    result = {"shape": args.shape, "config": shape, "num_requests": args.num_requests, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "block_size": BLOCK_SIZE, "blocks_needed": num_needed,
              "kv_fraction": args.kv_fraction, "num_blocks": num_blocks, "block_bytes": block_bytes,
              "max_num_batched_tokens": args.max_num_batched_tokens, "ceilings": limits, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        write_config(args.shape, Path(tmp))
        for run in args.runs:
            blocks = num_needed if run == "full" else num_blocks
            figures = measure(Path(tmp), args, str(dtype).removeprefix("torch."),
                              run_options(run, blocks, limits, block_bytes), prompts)
            result["runs"][run] = figures
            print(run, {k: v for k, v in figures.items() if k != "tokens"}, flush=True)
    result["ratios"] = ratios(result["runs"])
    for figures in result["runs"].values():
        figures.pop("tokens")
    path = write_result(f"kv-tier-{args.shape}", device, result)
    print(result["ratios"])
    print(f"wrote {path}")


def ratios(runs: dict[str, dict]) -> dict[str, float]:
    """swap over recompute (the target: at least 1.3), each over full; and how many requests' greedy tokens
    equal the full run's (bf16 batches of other sizes may round differently)."""
    out = {}
    if "swap" in runs and "recompute" in runs:
        out["swap_over_recompute"] = runs["swap"]["output_tok_s"] / runs["recompute"]["output_tok_s"]
    for run in ("swap", "recompute"):
        if run in runs and "full" in runs:
            out[f"{run}_over_full"] = runs[run]["output_tok_s"] / runs["full"]["output_tok_s"]
            same = sum(a == b for a, b in zip(runs[run]["tokens"], runs["full"]["tokens"], strict=True))
            out[f"{run}_tokens_equal_full"] = same / len(runs["full"]["tokens"])
    return out


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--kv-fraction", type=float, default=0.5,
                        help="the device's KV blocks as a fraction of what every request needs at once")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--runs", type=lambda s: s.split(","), default=list(RUNS),
                        help=f"a comma-separated subset of {','.join(RUNS)}")
    args = parser.parse_args()
    if unknown := set(args.runs) - set(RUNS):
        parser.error(f"unknown runs {sorted(unknown)}; choose from {RUNS}")
    return args


if __name__ == "__main__":
    main()
