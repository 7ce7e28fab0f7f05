"""Mixture of experts on random weights of a real shape: batch-1 decode against the active-weight floor, the fused
MoE kernel's bandwidth at batch 1, 8, 64, and at E > 1 the all-to-all's time and bytes, plain and coordinated.

    python bench/moe.py --shape mixtral-8x7b|qwen3-30b-a3b|tiny-moe [--device cuda|cpu] [--new-tokens 64]
        [--requests 256] [--skip-hf] [--ep-world 4 --ep-size 2]

- decode: scaleinfer's ms/token at batch 1 (one process), the floor (the bytes a token reads: every dense weight
  once, top_k of each MoE layer's experts, at the card's measured copy bandwidth), and HF transformers eager on
  the same shape in the same run (--skip-hf drops it; on a CPU it is skipped).
- --requests N: the output tok/s of N requests (prompt 128, output 128) offline.
- kernel: one MoE layer's fused_moe (the Triton kernel replayed from a CUDA graph over GRAPH_LAYERS stacks of
  experts on a GPU, the reference on a CPU) at 1, 2, 8, 16, 64 tokens with random routing: the bytes of the
  experts the routing touches / time, against the copy bandwidth; each row names its token-expert pairs and
  the path fused_moe takes (decode GEMV or grouped GEMM), and on a GPU times both paths (decode_us, grouped_us).
- all-to-all (--ep-world W > 1): W ranks (one per GPU, or CPU processes over gloo), E = --ep-size expert groups;
  parallel/all_to_all.py's exchange of one MoE layer at 1, 8, 64 tokens with the experts replaced by a copy,
  timed and its bytes counted per rank, plain and coordinated.
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
from latency import hf_latency, timed_steps  # noqa: E402
from shapes import SHAPES, write_config  # noqa: E402

from scaleinfer import LLM, SamplingParams  # noqa: E402
from scaleinfer.layers.moe import FusedMoE  # noqa: E402

BATCHES = (1, 8, 64)
KERNEL_BATCHES = (1, 2, 8, 16, 64)
# Distinct expert stacks one timed graph runs in turn, as consecutive layers of a decode step: timing one layer
# alone would read a batch's experts from L2 (Qwen3-30B-A3B's batch-1 experts, 75 MB, mostly fit the H200's).
GRAPH_LAYERS = 4


def active_bytes(model: torch.nn.Module, top_k: int) -> int:
    """A batch-1 decode token's reads: decode_bytes_read with each MoE layer's experts counted top_k of M."""
    total = decode_bytes_read(model)
    for moe in (m for m in model.modules() if isinstance(m, FusedMoE)):
        stack = moe.w13_weight.nbytes + moe.w2_weight.nbytes
        total -= stack - stack * top_k // moe.num_local_experts
    return total


def decode(folder: Path, device: str, dtype: str, prompt: list[int], new_tokens: int, requests: int) -> dict:
    kv = 8 << 30 if device == "cuda" else 64 << 20
    with LLM(model=str(folder), device=device, dtype=dtype, load_format="dummy", skip_tokenizer_init=True,
             kv_cache_memory=kv, progress=False) as llm:
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))  # warm-up
        stamps = timed_steps(llm, prompt, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
        model = llm.engine.runner.model
        step = (stamps[-1] - stamps[1]) / (len(stamps) - 2)
        out = {"ms_per_token": step * 1e3, "tok_s": 1 / step, "ttft_ms": (stamps[1] - stamps[0]) * 1e3,
               "active_bytes_per_token": active_bytes(model, model.arch.num_experts_per_tok),
               "weight_bytes": sum(p.nbytes for p in model.parameters())}
        if requests:
            out["offline"] = offline(llm, requests)
    return out


def offline(llm: LLM, requests: int) -> dict:
    rng, vocab = random.Random(1), llm.engine.runner.model.arch.vocab_size
    prompts = [[rng.randrange(1, vocab) for _ in range(128)] for _ in range(requests)]
    start = time.perf_counter()
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=128, ignore_eos=True))
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"requests": requests, "prompt_len": 128, "output_len": 128, "seconds": seconds,
            "output_tok_s": tokens / seconds}


def kernel_bandwidth(arch_config: dict, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """One MoE layer's experts through fused_moe at each batch (the path the engine takes: `path`), and on a GPU
    through each path by name (decode_us, grouped_us: where they cross): GB/s of the expert weights touched."""
    from scaleinfer.kernels.moe import fused_moe, fused_moe_grouped
    from scaleinfer.kernels.moe_decode import fused_moe_decode, use_decode_path

    hidden, experts, top_k = arch_config["hidden_size"], _num_experts(arch_config), arch_config["num_experts_per_tok"]
    width = arch_config.get("moe_intermediate_size") or arch_config["intermediate_size"]
    layers = [_expert_stack(experts, hidden, width, device, dtype) for _ in range(_graph_layers(device))]
    per_expert = 3 * hidden * width * dtype.itemsize
    paths = {"us": fused_moe}
    if device.type == "cuda":
        paths |= {"decode_us": fused_moe_decode, "grouped_us": fused_moe_grouped}
    rows = []
    for batch in KERNEL_BATCHES:
        x = torch.randn(batch, hidden, device=device, dtype=dtype)
        weights, ids = torch.randn(batch, experts, device=device).softmax(-1).topk(top_k, dim=-1)
        touched = int(ids.unique().numel())
        path = ("decode" if use_decode_path(batch, top_k) else "grouped") if device.type == "cuda" else "reference"
        row = {"batch": batch, "pairs": batch * top_k, "path": path, "experts_touched": touched,
               "bytes": touched * per_expert}
        for key, fn in paths.items():
            row[key] = _layer_seconds(fn, x, weights, ids, layers, device) * 1e6
        row["gb_s"] = row["bytes"] / row["us"] / 1e3
        rows.append(row)
    return rows


def _expert_stack(experts: int, hidden: int, width: int, device: torch.device, dtype: torch.dtype):
    w13 = torch.randn(experts, 2 * width, hidden, device=device, dtype=dtype) / hidden**0.5
    return w13, torch.randn(experts, hidden, width, device=device, dtype=dtype) / width**0.5


def _graph_layers(device: torch.device) -> int:
    return GRAPH_LAYERS if device.type == "cuda" else 1


def _layer_seconds(fn, x, weights, ids, layers, device: torch.device) -> float:
    """Seconds per layer of fn over `layers` expert stacks in turn, replayed as one CUDA graph on a GPU."""
    def step():
        for w13, w2 in layers:
            fn(x, w13, w2, weights, ids)

    return timed(_graphed(step, device), repeats=20, device=device) / len(layers)


def _graphed(fn, device: torch.device):
    """fn replayed from a CUDA graph on a GPU (as a decode step runs it: no launch overhead), else fn."""
    if device.type != "cuda":
        return fn
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        fn()  # compile and warm up outside the capture
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _num_experts(arch_config: dict) -> int:
    return arch_config.get("num_experts") or arch_config["num_local_experts"]


def all_to_all(arch_config: dict, world: int, ep_size: int, device: str, dtype: torch.dtype) -> dict:
    """{mode: [{batch, us, bytes per op}]} on rank 0 of `world` ranks."""
    with mp.Manager() as manager, tempfile.TemporaryDirectory() as tmp:
        out = manager.dict()
        for mode in ("plain", "coordinated"):
            mp.spawn(_a2a_rank, args=(world, f"file://{tmp}/{mode}", ep_size, mode, arch_config, device, dtype, out),
                     nprocs=world)
        return dict(out)


def _a2a_rank(rank: int, world: int, init: str, ep_size: int, mode: str, arch_config: dict, device: str,
              dtype: torch.dtype, out) -> None:
    import torch.distributed as dist

    from scaleinfer.parallel.all_to_all import comm_bytes, moe_all_to_all, reset_comm_bytes
    from scaleinfer.parallel.expert import get_expert_state
    from scaleinfer.parallel.groups import RankSpec, backend_for, join_tensor_parallel, leave_tensor_parallel
    from scaleinfer.parallel.state import get_parallel_state

    dev = torch.device(f"cuda:{rank}" if device == "cuda" else "cpu")
    join_tensor_parallel(RankSpec(rank, world, init, backend_for(dev), 120.0, expert_parallel_size=ep_size,
                                  moe_all_to_all=mode), dev, dtype)
    ep, group = get_expert_state(), get_parallel_state().tp_group
    hidden, experts, top_k = arch_config["hidden_size"], _num_experts(arch_config), arch_config["num_experts_per_tok"]
    rows = []
    for batch in BATCHES:
        g = torch.Generator(device=dev).manual_seed(batch)  # the same tokens and routes on every rank
        x = torch.randn(batch, hidden, device=dev, generator=g).to(dtype)
        weights, ids = torch.rand(batch, experts, device=dev, generator=g).topk(top_k, dim=-1)

        def step(x=x, weights=weights, ids=ids):
            return moe_all_to_all(x, weights, ids, experts // ep_size, ep, group, lambda r, i: r)

        reset_comm_bytes()
        step()
        counted = {op: {"sent": t.sent, "received": t.received} for op, t in comm_bytes().items()}
        seconds = timed(step, repeats=10, device=dev if dev.type == "cuda" else None, before=dist.barrier)
        rows.append({"batch": batch, "us": seconds * 1e6, "bytes": counted})
    if rank == 0:
        out[mode] = rows
    leave_tensor_parallel()


def main() -> None:
    args = _parse()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    prompt = [random.Random(0).randrange(1, SHAPES[args.shape]["vocab_size"]) for _ in range(args.prompt_len)]
    result = {"shape": args.shape, "config": SHAPES[args.shape], "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "batch": 1, "ceilings": ceilings(device, dtype)}
    copy = result["ceilings"]["copy_gb_s"]
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(args.shape, Path(tmp))
        if not args.skip_hf and device.type == "cuda":
            result["hf_eager"] = hf_latency(config, prompt, args.new_tokens, static=False)
        ours = decode(Path(tmp), args.device, str(dtype).removeprefix("torch."), prompt, args.new_tokens,
                      args.requests)
    ours["floor_ms_per_token"] = ours["active_bytes_per_token"] / copy / 1e6
    ours["fraction_of_floor"] = ours["floor_ms_per_token"] / ours["ms_per_token"]
    result["scaleinfer"] = ours
    if "hf_eager" in result:
        result["ratios"] = {"tok_s_vs_hf_eager": ours["tok_s"] / result["hf_eager"]["tok_s"]}
    result["kernel"] = kernel_bandwidth(SHAPES[args.shape], device, dtype)
    for row in result["kernel"]:
        row["fraction_of_copy_bandwidth"] = row["gb_s"] / copy
    if args.ep_world > 1:
        result["all_to_all"] = {"world": args.ep_world, "expert_parallel_size": args.ep_size,
                                **all_to_all(SHAPES[args.shape], args.ep_world, args.ep_size, args.device, dtype)}
    path = write_result(f"moe-{args.shape}", device, result)
    print({k: v for k, v in result.items() if k != "config"})
    print(f"wrote {path}")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mixtral-8x7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=0, help="also the offline output tok/s of N requests")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--ep-world", type=int, default=1, help="ranks for the all-to-all part (0/1: skip it)")
    parser.add_argument("--ep-size", type=int, default=2, help="expert groups among --ep-world ranks")
    return parser.parse_args()


if __name__ == "__main__":
    main()
