"""ZeRO-Inference: a random-weight model whose layers live in pinned CPU memory (or NVMe files) and stream to
the GPU through a budget of two layers; batch-1 and batch-32 decode, the FlexGen workload (prompt 512, 32 new
tokens) at the largest batch the KV cache holds, the achieved host-to-device GB/s against the pinned copy
bandwidth measured in the same run, and HF accelerate's offload on the same shape in the same run; with
--deepspeed, DeepSpeed ZeRO-Inference on the same shape and requests too (its ratios only then). With
--quantization bf16,int4 (any of LLM's schemes) each of ours is run, quantized on load, so the streamed layers
carry the scheme's bytes (results "scaleinfer" for bf16, "scaleinfer_<scheme>" for the others); DeepSpeed and
HF stay bf16.

    python bench/offload.py --shape llama3-8b [--offload cpu|nvme --offload-path DIR] [--skip-hf] [--deepspeed]
    python bench/offload.py --shape llama3-8b --quantization bf16,int4 --deepspeed --skip-flexgen --batches 1
    python bench/offload.py --shape llama3-70b --ranks 2   # N GPUs, each fetching 1/N and all-gathering

With --ranks N, N processes (one per GPU, NCCL) each serve their own batch and stream the layers together;
each GPU receives every layer, so the figure to compare with N times one GPU's pinned copy rate is the whole
model's bytes over the step time.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ceilings, quantization_schemes, timed, write_result  # noqa: E402
from prefill import prefill_flops  # noqa: E402
from shapes import SHAPES, write_config  # noqa: E402

from scaleinfer import LLM, SamplingParams  # noqa: E402

ACTIVATION_RESERVE = 12 << 30  # a 32k-token prefill step's activations


def prompts(batch: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 30000) for _ in range(length)] for _ in range(batch)]


def add_requests(llm: LLM, tag: str, batch_prompts: list[list[int]], new_tokens: int) -> None:
    """Greedy requests of exactly new_tokens each, ids tag-0, tag-1, ..."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for i, prompt in enumerate(batch_prompts):
        llm.engine.add_request(f"{tag}-{i}", prompt, params)


def decode_rate(llm: LLM, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """Seconds per decode step once every sequence has its first token; tok/s = batch / step time."""
    engine, stamps = llm.engine, []
    add_requests(llm, f"d{batch}", prompts(batch, prompt_len, seed=batch), new_tokens)
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        outputs = engine.step()
        if outputs and all(len(o.outputs[0].token_ids) >= 1 for o in outputs) and len(outputs) == batch:
            stamps.append(time.perf_counter())
    step = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    return {"batch": batch, "new_tokens": new_tokens, "ttft_s": stamps[0] - start, "s_per_step": step,
            "decode_tok_s": batch / step}


def flexgen(llm: LLM, batch: int, prompt_len: int, new_tokens: int, shape: dict) -> dict:
    """Generated tokens over the whole call (FlexGen's figure) and the prefill phase's achieved TFLOP/s."""
    engine = llm.engine
    add_requests(llm, "f", prompts(batch, prompt_len, seed=7), new_tokens)
    start, first_tokens, prefill_end = time.perf_counter(), set(), None
    while engine.has_unfinished_requests():
        for output in engine.step():
            first_tokens.add(output.request_id)
        if prefill_end is None and len(first_tokens) == batch:
            prefill_end = time.perf_counter()
    total = time.perf_counter() - start
    prefill_s = prefill_end - start
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "seconds": total,
            "tok_s": batch * new_tokens / total, "prefill_s": prefill_s,
            "prefill_tflop_s": batch * prefill_flops(shape, prompt_len) / prefill_s / 1e12}


def largest_batch(shape: dict, kv_bytes: int, tokens_per_seq: int) -> int:
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    per_token = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * head_dim * 2  # K and V, bf16
    return kv_bytes // (per_token * (tokens_per_seq + 16))  # a block of slack per sequence


def flexgen_batch(shape: dict, args: argparse.Namespace) -> int:
    return args.flexgen_batch or largest_batch(shape, _kv_budget(shape), args.flexgen_prompt + args.flexgen_new_tokens)


def deepspeed_peer(args: argparse.Namespace, batch: int) -> dict:
    """bench/deepspeed_peer.py in a child process (its GPU memory is gone before ours loads), same requests."""
    command = [sys.executable, str(Path(__file__).with_name("deepspeed_peer.py")), "--shape", args.shape,
               "--batches", ",".join(map(str, args.batches)), "--new-tokens", str(args.new_tokens),
               "--flexgen-prompt", str(args.flexgen_prompt), "--flexgen-new-tokens", str(args.flexgen_new_tokens)]
    command += [] if args.skip_flexgen else ["--flexgen-batch", str(batch)]
    run = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def run_scaleinfer(folder: Path, args: argparse.Namespace, shape: dict, quantization: str | None = None) -> dict:
    kv_bytes = _kv_budget(shape)
    batch = flexgen_batch(shape, args)
    options = {"offload_path": args.offload_path} if args.offload == "nvme" else {}
    start = time.perf_counter()
    llm = LLM(str(folder), dtype="bfloat16", load_format="dummy", skip_tokenizer_init=True, progress=False,
              offload=args.offload, kv_cache_memory=kv_bytes, max_num_seqs=max(batch, 32),
              enable_prefix_caching=False, quantization=quantization, **options)
    out = {"startup_s": time.perf_counter() - start, "runner": llm.engine.runner.describe()}
    streamed = llm.engine.runner.streamer.store.nbytes
    decode_rate(llm, 1, 128, 3)  # warm-up
    for b in args.batches:
        figures = decode_rate(llm, b, 128, args.new_tokens)
        figures["h2d_gb_s"] = streamed / figures["s_per_step"] / 1e9
        out[f"batch{b}"] = figures
    if not args.skip_flexgen:
        out["flexgen"] = flexgen(llm, batch, args.flexgen_prompt, args.flexgen_new_tokens, shape)
    del llm
    _free()
    return out


def _kv_budget(shape: dict) -> int:
    free, _ = torch.cuda.mem_get_info()
    resident = 2 * shape["vocab_size"] * shape["hidden_size"] * 2  # embeddings and LM head stay on the GPU
    return free - resident - 2 * layer_bytes(shape) - ACTIVATION_RESERVE


def layer_bytes(shape: dict) -> int:
    """One decoder layer in bf16 (every expert's MLP for a mixture of experts)."""
    hidden, experts = shape["hidden_size"], shape.get("num_local_experts", 1)
    attention = hidden * (hidden * 2 + 2 * shape["num_key_value_heads"] * 128)
    return 2 * (attention + experts * 3 * hidden * shape["intermediate_size"])


def layers_for_disk(shape: dict, path: str, fraction: float) -> int:
    """The most decoder layers of `shape` whose files fit in `fraction` of the free space at path."""
    import shutil

    return min(shape["num_hidden_layers"], int(shutil.disk_usage(path).free * fraction // layer_bytes(shape)))


def hf_accelerate(config, batches: list[int], new_tokens: int, gpu_budget: str) -> dict:
    """transformers + accelerate's dispatch_model: layers beyond the GPU budget stay in CPU memory and are
    moved to the GPU by hooks for each forward (accelerate's offload)."""
    from accelerate import dispatch_model, infer_auto_device_map
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu").eval()  # fresh pages read as zeros: timing needs no real values
    device_map = infer_auto_device_map(model, max_memory={0: gpu_budget, "cpu": "400GiB"},
                                       no_split_module_classes=["LlamaDecoderLayer"])
    model = dispatch_model(model, device_map=device_map, main_device=0)
    out = {"gpu_budget": gpu_budget, "layers_on_gpu": sum(1 for v in device_map.values() if v == 0)}
    for batch in batches:
        ids = torch.tensor(prompts(batch, 128, seed=batch), device="cuda")
        _hf_generate(model, ids, 1)  # warm-up
        one, full = (_hf_generate(model, ids, n) for n in (1, 1 + new_tokens))
        out[f"batch{batch}"] = {"s_per_step": (full - one) / new_tokens,
                                "decode_tok_s": batch * new_tokens / (full - one)}
    del model
    _free()
    return out


@torch.no_grad()
def _hf_generate(model, ids: torch.Tensor, n: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                   pad_token_id=0)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def disk_read_gb_s(folder: str, nbytes: int = 4 << 30) -> dict:
    """The disk's own rate: one thread reading a fresh file sequentially in 16 MB O_DIRECT blocks (DESIGN.md's
    method), and the same blocks with 8 threads in flight (how the store reads)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from scaleinfer.offload.buffers import aligned_empty
    from scaleinfer.offload.nvme_store import _direct_io_works

    block = 16 << 20
    path = Path(folder) / "scaleinfer-disk-probe.bin"
    chunk = torch.randint(0, 255, (block,), dtype=torch.uint8).numpy().tobytes()
    with open(path, "wb") as f:
        for _ in range(nbytes // block):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if _direct_io_works(path) else 0))
    buffers = [aligned_empty(block) for _ in range(8)]

    def read(i: int) -> int:
        import ctypes

        target = (ctypes.c_char * block).from_address(buffers[i % 8].data_ptr())
        return os.preadv(fd, [memoryview(target)], i * block)

    start = time.perf_counter()
    for i in range(nbytes // block):
        read(i)
    single = nbytes / (time.perf_counter() - start) / 1e9
    with ThreadPoolExecutor(8) as pool:
        start = time.perf_counter()
        list(pool.map(read, range(nbytes // block)))
        parallel = nbytes / (time.perf_counter() - start) / 1e9
    os.close(fd)
    path.unlink()
    return {"disk_read_1_thread_gb_s": single, "disk_read_8_threads_gb_s": parallel}


def run_ranks(folder: Path, args: argparse.Namespace) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_rank_worker, args=(args.ranks, port, str(folder), args.batches, args.new_tokens, queue,
                                 args.profile_first),
             nprocs=args.ranks, join=True)
    per_rank = dict(sorted(queue.get() for _ in range(args.ranks)))
    out = {"ranks": args.ranks, "per_rank": per_rank}
    for key in per_rank[0]:
        if key.startswith("batch"):
            step = max(rank[key]["s_per_step"] for rank in per_rank.values())
            streamed = per_rank[0]["store_bytes"]
            out[key] = {"s_per_step": step, "decode_tok_s_all_ranks": args.ranks * per_rank[0][key]["batch"] / step,
                        "effective_gb_s_per_gpu": streamed / step / 1e9}
    return out


def _rank_worker(rank: int, world: int, port: int, folder: str, batches: list[int], new_tokens: int, queue,
                 profile_first: bool = False) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device(f"cuda:{rank}"))
    h2d = concurrent_h2d_gb_s(torch.device(f"cuda:{rank}"))
    llm = LLM(folder, device=f"cuda:{rank}", dtype="bfloat16", load_format="dummy", skip_tokenizer_init=True,
              progress=False, offload="cpu", kv_cache_memory=8 << 30, max_num_seqs=max(batches),
              enable_prefix_caching=False)
    out = {"runner": llm.engine.runner.describe(), "store_bytes": llm.engine.runner.streamer.store.nbytes,
           "pinned_h2d_gb_s_all_ranks_at_once": h2d}
    decode_rate(llm, 1, 128, 3)  # warm-up
    for batch in batches:  # a batch listed twice is measured twice ("batchN_again": after a first run at N)
        key = f"batch{batch}" if f"batch{batch}" not in out else f"batch{batch}_again"
        if profile_first and rank == 0 and batch > 1 and key == f"batch{batch}":
            out[key], out[f"profile_{key}"] = profiled(lambda b=batch: decode_rate(llm, b, 128, new_tokens))
            print(out[f"profile_{key}"], flush=True)
        else:
            out[key] = decode_rate(llm, batch, 128, new_tokens)
    for batch in (batches[0], batches[-1]):
        out[f"trace_batch{batch}"] = traced_decode(llm, batch, new_tokens)
    queue.put((rank, out))
    dist.destroy_process_group()


def traced_decode(llm: LLM, batch: int, new_tokens: int) -> dict:
    """Mean milliseconds per layer over the decode steps of a run (the prefill is not traced), from CUDA
    events: the host-to-device copy of this process's share, the all-gather (from the copy's end: it includes
    waiting for the other ranks), the layer's compute, and the compute stream's idle time before each layer."""
    engine, streamer = llm.engine, llm.engine.runner.streamer
    add_requests(llm, f"t{batch}", prompts(batch, 128, seed=batch + 1), new_tokens)
    engine.step()  # the prefill
    streamer.trace()
    while engine.has_unfinished_requests():
        engine.step()
    torch.cuda.synchronize()
    fetcher, compute = streamer.fetcher, streamer.compute_events
    copies, gathers = fetcher.copy_events, fetcher.gather_events  # the same fetches, in the same order
    h2d = ([start.elapsed_time(copied) for (_, start, _), (_, copied, _) in zip(copies, gathers)] if gathers
           else [start.elapsed_time(end) for _, start, end in copies])
    gather = [copied.elapsed_time(end) for _, copied, end in gathers]
    idle = [prev.elapsed_time(start) for (_, _, prev), (_, start, _) in zip(compute, compute[1:])]
    streamer.compute_events = fetcher.copy_events = fetcher.gather_events = None
    return {"layers": len(compute), "h2d_ms": _mean(h2d), "gather_ms": _mean(gather),
            "compute_ms": _mean([s.elapsed_time(e) for _, s, e in compute]), "idle_before_layer_ms": _mean(idle),
            "max_idle_ms": max(idle, default=None)}


def profiled(fn):
    """(fn(), the torch profiler's table of its host and device operations by host self time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        result = fn()
    return result, prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50)


def concurrent_h2d_gb_s(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Pinned host-to-device GB/s of this process while every rank copies at the same time."""
    import torch.distributed as dist

    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return nbytes / timed(lambda: dst.copy_(src, non_blocking=True), 3, device, before=dist.barrier) / 1e9


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    args = _parse()
    device, shape = torch.device("cuda"), dict(SHAPES[args.shape])
    if args.fill_disk:  # the largest model of this shape's layers that the disk at offload_path holds
        shape["num_hidden_layers"] = layers_for_disk(shape, args.offload_path, args.fill_disk)
    result = {"shape": args.shape, "config": shape, "offload": args.offload, "gpu_budget_layers": 2,
              "ceilings": ceilings(device, torch.bfloat16)}
    if args.offload == "nvme":
        result["ceilings"].update(disk_read_gb_s(args.offload_path))
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(args.shape, Path(tmp))
        if shape["num_hidden_layers"] != config.num_hidden_layers:
            config.num_hidden_layers = shape["num_hidden_layers"]
            config.save_pretrained(tmp)
        if args.ranks > 1:
            result["ranks"] = run_ranks(Path(tmp), args)
        else:
            if args.deepspeed:
                result["deepspeed"] = deepspeed_peer(args, flexgen_batch(shape, args))
            for scheme in args.quantization:
                key = "scaleinfer" if scheme is None else f"scaleinfer_{scheme}"
                result[key] = run_scaleinfer(Path(tmp), args, shape, scheme)
            if not args.skip_hf:
                result["hf_accelerate"] = hf_accelerate(config, args.hf_batches, args.hf_new_tokens,
                                                        args.hf_gpu_budget)
    if args.ranks > 1:
        _ratios_ranks(result, args.ranks)
        name = f"offload-{args.ranks}gpu-{args.shape}"
    elif args.fill_disk:
        _ratios(result)
        name = f"offload-{args.offload}-{args.shape}-{shape['num_hidden_layers']}layers"
    else:
        _ratios(result)
        name = f"offload-{args.offload}-{args.shape}"
    path = write_result(name, device, result)
    print({k: v for k, v in result.items() if k != "config"})
    print(f"wrote {path}")


def _ratios_ranks(result: dict, ranks: int) -> None:
    """Against N times one GPU's pinned rate (the issue's figure) and against the sum of what the N GPUs
    measured copying at the same time (what the host gives them together)."""
    pinned = result["ceilings"]["pinned_h2d_gb_s"]
    together = sum(rank["pinned_h2d_gb_s_all_ranks_at_once"] for rank in result["ranks"]["per_rank"].values())
    result["ceilings"]["pinned_h2d_gb_s_all_ranks_at_once_total"] = together
    result["ratios"] = {}
    for key, figures in result["ranks"].items():
        if key.startswith("batch"):
            effective = figures["effective_gb_s_per_gpu"]
            result["ratios"][f"{key}_effective_vs_{ranks}x_pinned"] = effective / (ranks * pinned)
            result["ratios"][f"{key}_effective_vs_all_ranks_at_once"] = effective / together


def _ratios(result: dict) -> None:
    result["ratios"] = {}
    for name in (k for k in list(result) if k.startswith("scaleinfer")):
        prefix = "" if name == "scaleinfer" else name.removeprefix("scaleinfer_") + "_"
        result["ratios"].update({prefix + key: value for key, value in _scheme_ratios(result, result[name]).items()})


def _scheme_ratios(result: dict, ours: dict) -> dict:
    ratios = {}
    pinned = result["ceilings"]["pinned_h2d_gb_s"]
    disk = result["ceilings"].get("disk_read_8_threads_gb_s")
    for key in (k for k in ours if k.startswith("batch")):
        ratios[f"{key}_h2d_fraction_of_pinned"] = ours[key]["h2d_gb_s"] / pinned
        if disk:
            ratios[f"{key}_read_fraction_of_disk"] = ours[key]["h2d_gb_s"] / disk
        if key in result.get("hf_accelerate", {}):
            ratios[f"{key}_vs_hf_accelerate"] = ours[key]["decode_tok_s"] / result["hf_accelerate"][key]["decode_tok_s"]
        if key in result.get("deepspeed", {}):
            ratios[f"{key}_vs_deepspeed"] = ours[key]["decode_tok_s"] / result["deepspeed"][key]["decode_tok_s"]
    if "flexgen" in ours:
        if "flexgen" in result.get("deepspeed", {}):
            ratios["flexgen_vs_deepspeed"] = ours["flexgen"]["tok_s"] / result["deepspeed"]["flexgen"]["tok_s"]
        ratios["flexgen_prefill_fraction_of_matmul"] = (ours["flexgen"]["prefill_tflop_s"]
                                                        / result["ceilings"]["matmul_bfloat16_tflop_s"])
    return ratios


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--offload", choices=["cpu", "nvme"], default="cpu")
    parser.add_argument("--offload-path", default="/tmp")
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--flexgen-batch", type=int, default=0, help="0: the largest the KV cache holds")
    parser.add_argument("--flexgen-prompt", type=int, default=512)
    parser.add_argument("--flexgen-new-tokens", type=int, default=32)
    parser.add_argument("--skip-flexgen", action="store_true")
    parser.add_argument("--ranks", type=int, default=1, help="GPUs streaming together (one process each)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--quantization", type=quantization_schemes, default=[None],
                        help="bf16 or schemes to quantize ours to on load, comma-separated; one run of ours each")
    parser.add_argument("--deepspeed", action="store_true",
                        help="DeepSpeed ZeRO-Inference on the same shape and requests, first (bench/deepspeed_peer.py)")
    parser.add_argument("--profile-first", action="store_true",
                        help="with --ranks: profile rank 0's first run at each batch size above 1")
    parser.add_argument("--fill-disk", type=float, default=0.0,
                        help="with --offload nvme: as many of the shape's layers as fill this fraction of free disk")
    parser.add_argument("--hf-batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    parser.add_argument("--hf-new-tokens", type=int, default=2)
    parser.add_argument("--hf-gpu-budget", default="6GiB")
    return parser.parse_args()


if __name__ == "__main__":
    main()
