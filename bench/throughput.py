"""Offline throughput: scaleinfer's LLM.generate against HF transformers `generate` on the same requests.

HF runs in left-padded batches and generates to the longest request of each batch; both count only the
tokens each request asked for (eos ignored), so the figures compare useful work per second.

    python bench/throughput.py                      # the embedded model on the best device present
    python bench/throughput.py --shape llama3-8b --num-requests 512 --hf-batch-size 64 \
        --min-prompt 128 --max-prompt 1024 --min-output 128 --max-output 512   # random bf16 weights, GPU
    python bench/throughput.py --shape llama3-8b ... --runs bf16,fp8,fp8:fp8,bf16:auto:8192   # HF once, then
        ours per weight scheme[:KV-cache dtype[:max_num_batched_tokens]], each against HF and the first run
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ceilings, write_result  # noqa: E402
from roofline import ModelShape, recorded_steps, roofline_seconds  # noqa: E402

from scaleinfer import LLM, SamplingParams  # noqa: E402
from scaleinfer.config import KV_CACHE_DTYPES, QUANTIZATIONS  # noqa: E402
from scaleinfer.worker.kv_cache import kv_cache_dtype  # noqa: E402


@dataclass(slots=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


@dataclass(slots=True)
class Figures:
    seconds: float
    output_tok_s: float
    total_tok_s: float
    latency_ms: dict[str, float] | None = None  # TTFT and time per output token, p50 and p99
    roofline: dict[str, float] | None = None  # the steps as run, at the card's ceilings (bench/roofline.py)


def make_workload(n: int, prompt_range: tuple[int, int], output_range: tuple[int, int], vocab: int, seed: int):
    rng = random.Random(seed)
    prompts = [[rng.randrange(100, vocab) for _ in range(rng.randint(*prompt_range))] for _ in range(n)]
    return Workload(prompts, [rng.randint(*output_range) for _ in range(n)])


def figures(work: Workload, seconds: float) -> Figures:
    total = work.num_output_tokens + sum(map(len, work.prompts))
    return Figures(seconds, work.num_output_tokens / seconds, total / seconds)


def run_scaleinfer(llm: LLM, work: Workload, limits: dict[str, float]) -> Figures:
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in work.output_lens]
    with recorded_steps(llm) as steps:
        start = time.perf_counter()
        outputs = llm.generate(work.prompts, params)
        seconds = time.perf_counter() - start
    assert [len(o.outputs[0].token_ids) for o in outputs] == work.output_lens
    result = figures(work, seconds)
    result.latency_ms = latency_percentiles(outputs)
    result.roofline = roofline(llm, steps, limits, seconds)
    return result


def roofline(llm: LLM, steps: list, limits: dict[str, float], seconds: float) -> dict[str, float]:
    runner = llm.engine.runner
    kv_bytes = kv_cache_dtype(llm.engine.config.cache, runner.dtype).itemsize
    shape = ModelShape.from_model(llm.engine.arch, runner.model, kv_bytes)
    matmul = next(v for k, v in limits.items() if k.startswith("matmul_")) * 1e12
    out = roofline_seconds(shape, steps, matmul, limits["copy_gb_s"] * 1e9)
    out["fraction_of_roofline"] = out["roofline_s"] / seconds
    return out


def latency_percentiles(outputs) -> dict[str, float]:
    ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outputs]
    tpot = [(o.metrics.finished_time - o.metrics.first_token_time) / max(1, len(o.outputs[0].token_ids) - 1)
            for o in outputs]
    return {f"{name}_p{q}": 1e3 * _percentile(values, q) for name, values in (("ttft", ttft), ("tpot", tpot))
            for q in (50, 99)}


def _percentile(values: list[float], q: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run_hf(model, work: Workload, batch_size: int, pad_id: int) -> Figures:
    start = time.perf_counter()
    for first in range(0, len(work.prompts), batch_size):
        prompts = work.prompts[first : first + batch_size]
        new_tokens = max(work.output_lens[first : first + batch_size])
        _hf_generate(model, prompts, new_tokens, pad_id)
    return figures(work, time.perf_counter() - start)


def _hf_generate(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> None:
    width = max(map(len, prompts))
    device = model.device
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, pad_token_id=pad_id)


def load_hf(gguf: Path, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    return model.to(device).eval()


def main() -> None:
    args = _parse()
    result = run_shape(args) if args.shape else run_embedded(args)
    path = write_result("throughput" + (f"-{args.shape}" if args.shape else ""), torch.device(result["device"]),
                        result)
    for key in result["scaleinfer"]:
        ours = result["scaleinfer"][key]["output_tok_s"]
        peer = _peer(result["hf_transformers"], key)["output_tok_s"]
        print(f"{key}: scaleinfer {ours:.1f} tok/s, HF {peer:.1f} tok/s, ratio {ours / peer:.2f}")
    print(f"wrote {path}")


def run_embedded(args: argparse.Namespace) -> dict:
    """The embedded SmolLM2: a batch of mixed requests and a batch of one, ours then HF, same weights."""
    llm = LLM(device=args.device, progress=False, quantization=args.quantization)
    device, dtype = llm.engine.runner.device, llm.engine.runner.dtype
    vocab = llm.engine.arch.vocab_size
    hf = load_hf(Path(llm.engine.model_path), device, dtype)
    pad_id = llm.get_tokenizer().pad_token_id or 0
    batch = _workload(args, vocab)
    single = make_workload(1, (128, 128), (64, 64), vocab, args.seed + 1)
    limits = ceilings(device, dtype)
    ours = {"batch": run_scaleinfer(llm, batch, limits), "batch_1": run_scaleinfer(llm, single, limits)}
    peer = {"batch": run_hf(hf, batch, args.hf_batch_size, pad_id), "batch_1": run_hf(hf, single, 1, pad_id)}
    kept = f"kept {args.quantization}" if args.quantization else "dequantized"
    return _record(f"SmolLM2-135M-Instruct (embedded GGUF, {kept}; HF dequantized)", device, dtype, args, ours, peer,
                   limits)


def run_shape(args: argparse.Namespace) -> dict:
    """A real architecture's shape with random bf16 weights on the GPU: HF first (then freed), then ours."""
    import gc
    import tempfile

    from shapes import write_config
    from transformers import AutoModelForCausalLM

    device, dtype = torch.device("cuda"), torch.bfloat16
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(args.shape, Path(tmp))
        work = _workload(args, config.vocab_size)
        with torch.device(device):
            hf = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        peer = {"batch": run_hf(hf, work, args.hf_batch_size, pad_id=0)}
        del hf
        gc.collect()
        torch.cuda.empty_cache()
        limits = ceilings(device, dtype)
        ours = {}
        for key, (scheme, kv, budget) in _runs(args).items():
            budget_arg = {"max_num_batched_tokens": budget} if budget else {}
            llm = LLM(model=tmp, dtype="bfloat16", load_format="dummy", skip_tokenizer_init=True, progress=False,
                      quantization=scheme, kv_cache_dtype=kv, **budget_arg)
            ours[key] = run_scaleinfer(llm, work, limits)
            del llm
            gc.collect()
            torch.cuda.empty_cache()
    schemes = sorted({scheme or "bf16" for scheme, _, _ in _runs(args).values()})
    return _record(f"{args.shape} shape, random weights: scaleinfer {'/'.join(schemes)}, HF bf16", device, dtype,
                   args, ours, peer, limits)


Run = tuple[str | None, str, int | None]  # quantization, kv_cache_dtype, max_num_batched_tokens (None: default)


def _runs(args: argparse.Namespace) -> dict[str, Run]:
    """Our runs by result key: --runs, or the one of --quantization and --kv-cache-dtype (key 'batch', HF's)."""
    if not args.runs:
        return {"batch": (args.quantization, args.kv_cache_dtype, None)}
    return {f"{scheme or 'bf16'}-kv-{kv}" + (f"-budget-{budget}" if budget else ""): (scheme, kv, budget)
            for scheme, kv, budget in args.runs}


def parse_runs(text: str) -> list[Run]:
    """--runs: comma-separated scheme[:kv_cache_dtype[:max_num_batched_tokens]] (bf16: the weights as stored;
    kv default auto; the engine's default token budget)."""
    from common import quantization_schemes

    runs = []
    for item in text.split(","):
        scheme, kv, budget = (item.split(":") + ["", ""])[:3]
        if (kv or "auto") not in KV_CACHE_DTYPES:
            raise argparse.ArgumentTypeError(f"--runs {item!r}: kv_cache_dtype {kv!r} is not one of {KV_CACHE_DTYPES}")
        if budget and not (budget.isdigit() and int(budget) > 0):
            raise argparse.ArgumentTypeError(f"--runs {item!r}: max_num_batched_tokens {budget!r} is not a positive "
                                             "integer")
        runs.append((quantization_schemes(scheme)[0], kv or "auto", int(budget) if budget else None))
    return runs


def _workload(args: argparse.Namespace, vocab: int) -> Workload:
    return make_workload(args.num_requests, (args.min_prompt, args.max_prompt), (args.min_output, args.max_output),
                         min(vocab, 32000), args.seed)


def _record(model: str, device: torch.device, dtype: torch.dtype, args: argparse.Namespace, ours: dict,
            peer: dict, limits: dict[str, float]) -> dict:
    return {
        "model": model, "device": str(device), "dtype": str(dtype), "workload": vars(args), "ceilings": limits,
        "scaleinfer": {k: asdict(v) for k, v in ours.items()},
        "hf_transformers": {k: asdict(v) for k, v in peer.items()},
        "ratio_output_tok_s": {k: ours[k].output_tok_s / _peer(peer, k).output_tok_s for k in ours},
        "ratio_vs_first_run": {k: v.output_tok_s / next(iter(ours.values())).output_tok_s for k, v in ours.items()},
    }


def _peer(peer: dict, key: str):
    """HF's figures for our run `key`: its own of the same key, else its one batch run (--runs)."""
    return peer.get(key, peer.get("batch"))


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--shape", default=None, help="a bench/shapes.py name: random weights on the GPU")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--hf-batch-size", type=int, default=32)
    parser.add_argument("--min-prompt", type=int, default=32)
    parser.add_argument("--max-prompt", type=int, default=256)
    parser.add_argument("--min-output", type=int, default=16)
    parser.add_argument("--max-output", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quantization", choices=[q for q in QUANTIZATIONS if q], default=None,
                        help="our weights quantized on load (gguf: the embedded file's as stored); HF unquantized")
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                        help="with --shape: scaleinfer's KV cache dtype (fp8: twice bf16's tokens)")
    parser.add_argument("--runs", type=parse_runs, default=None,
                        help="with --shape: several of our runs after one HF run, e.g. bf16,fp8,fp8:fp8,"
                             "bf16:auto:8192 (scheme[:kv_cache_dtype[:max_num_batched_tokens]]); replaces "
                             "--quantization and --kv-cache-dtype")
    return parser.parse_args()


if __name__ == "__main__":
    main()
