"""Batch-1 latency on random bf16 weights of a real shape: scaleinfer against HF transformers eager and
HF with a static cache (which compiles itself), all in one process on one card.

    python bench/latency.py --shape llama3-8b|llama3-1b|llama2-7b [--prompt-len 128 --new-tokens 128] [--skip-hf]
        [--quantization bf16,int8,int4,fp8] [--gpt-fast PEERS_DIR]

--quantization takes one scheme or several (comma-separated; `bf16` is none): scaleinfer runs once per scheme,
quantizing its random weights on load (the HF runs stay bf16), each against its own floor, the bytes a decode
step reads (the quantized levels and their scales; one row of the input embedding).
With --gpt-fast, gpt-fast's compiled decoder runs first in a child process (`PEERS_DIR/gptfast_peer.py`, as
../shared/peers holds it): bf16, and int8 too when int8 is among the schemes; its tok/s counts its 128-token
prefill too.
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
from common import ceilings, decode_bytes_read, quantization_schemes, write_result  # noqa: E402
from shapes import SHAPES, write_config  # noqa: E402

from scaleinfer import LLM, SamplingParams  # noqa: E402


def scaleinfer_latency(folder: Path, prompt: list[int], new_tokens: int, kv_bytes: int,
                       quantization: str | None = None) -> dict:
    start = time.perf_counter()
    llm = LLM(model=str(folder), dtype="bfloat16", load_format="dummy", skip_tokenizer_init=True,
              kv_cache_memory=kv_bytes, progress=False, quantization=quantization)
    startup = time.perf_counter() - start
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))  # warm-up
    stamps = timed_steps(llm, prompt, params)
    model = llm.engine.runner.model
    out = {"startup_s": startup, "bytes_read_per_token": decode_bytes_read(model), **_latency_figures(stamps)}
    out["runner"] = llm.engine.runner.describe() if hasattr(llm.engine.runner, "describe") else {}
    del llm
    _free()
    return out


def timed_steps(llm: LLM, prompt: list[int], params: SamplingParams) -> list[float]:
    """The clock at the request's start and after each step that gave an output (one token per step)."""
    engine = llm.engine
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    engine.add_request("latency", prompt, params)
    stamps = [start]
    while engine.has_unfinished_requests():
        if engine.step():
            stamps.append(time.perf_counter())
    return stamps


def _latency_figures(stamps: list[float]) -> dict:
    ttft = stamps[1] - stamps[0]
    decode = (stamps[-1] - stamps[1]) / (len(stamps) - 2)
    return {"ttft_ms": ttft * 1e3, "ms_per_token": decode * 1e3, "tok_s": 1.0 / decode}


GPT_FAST_NAMES = {"llama3-8b": "llama-3-8b", "llama2-7b": "7B"}


def gpt_fast_latency(peers: Path, shape: str, quantization: str | None) -> dict:
    """gpt-fast's best timed run (it prints one JSON line per run), on random weights of the same shape."""
    args = [sys.executable, str(peers / "gptfast_peer.py"), GPT_FAST_NAMES[shape]]
    args += ["int8"] if quantization == "int8" else []
    run = subprocess.run(args, capture_output=True, text=True, check=True)
    runs = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    best = max(runs, key=lambda r: r["tok_s"])
    return {"system": best["system"], "tok_s_including_prefill": best["tok_s"], "weight_bytes": best["weight_bytes"],
            "runs": runs}


def hf_latency(config, prompt: list[int], new_tokens: int, static: bool) -> dict:
    from transformers import AutoModelForCausalLM

    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    ids = torch.tensor([prompt], device="cuda")
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    if static:
        kwargs["cache_implementation"] = "static"
    first, full = _time_generate(model, ids, new_tokens, kwargs)
    del model
    _free()
    decode = (full - first) / (new_tokens - 1)
    return {"ttft_ms": first * 1e3, "ms_per_token": decode * 1e3, "tok_s": 1.0 / decode}


@torch.no_grad()
def _time_generate(model, ids: torch.Tensor, new_tokens: int, kwargs: dict) -> tuple[float, float]:
    """Seconds for 1 and for new_tokens generated tokens, after warm-up (and compilation)."""

    def generate(n: int) -> None:
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)

    for _ in range(2):
        generate(new_tokens)
    return _time(lambda: generate(1)), _time(lambda: generate(new_tokens))


def _time(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    args = _parse()
    device = torch.device("cuda")
    prompt = [random.Random(0).randrange(1000, 30000) for _ in range(args.prompt_len)]
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(args.shape, Path(tmp))
        result = {"shape": args.shape, "config": SHAPES[args.shape], "prompt_len": args.prompt_len,
                  "new_tokens": args.new_tokens, "batch": 1, "ceilings": ceilings(device, torch.bfloat16)}
        if args.gpt_fast:
            result["gpt_fast"] = {q or "bf16": gpt_fast_latency(Path(args.gpt_fast), args.shape, q)
                                  for q in args.quantization if q in (None, "int8")}
        if not args.skip_hf:
            result["hf_eager"] = hf_latency(config, prompt, args.new_tokens, static=False)
            result["hf_static_compile"] = hf_latency(config, prompt, args.new_tokens, static=True)
        result["scaleinfer"] = {q or "bf16": scaleinfer_latency(Path(tmp), prompt, args.new_tokens,
                                                                args.kv_cache_gib << 30, q)
                                for q in args.quantization}
    for ours in result["scaleinfer"].values():
        _add_floor(ours, result["ceilings"]["copy_gb_s"])
    result["ratios"] = _ratios(result)
    path = write_result(f"latency-{args.shape}", device, result)
    print({k: v for k, v in result.items() if k != "config"})
    print(f"wrote {path}")


def _add_floor(ours: dict, copy_gb_s: float) -> None:
    """A decode step reads every weight once: bytes / step time, against the copy bandwidth."""
    ours["weight_gb_s"] = ours["bytes_read_per_token"] / ours["ms_per_token"] / 1e6
    ours["fraction_of_copy_bandwidth"] = ours["weight_gb_s"] / copy_gb_s
    ours["floor_tok_s"] = copy_gb_s * 1e9 / ours["bytes_read_per_token"]


def _ratios(result: dict) -> dict:
    """Each scheme's tok/s against HF (bf16) and against gpt-fast bf16 and int8, where they ran."""
    ratios = {}
    for scheme, ours in result["scaleinfer"].items():
        for peer in ("hf_eager", "hf_static_compile"):
            if peer in result:
                ratios[f"{scheme}_vs_{peer}"] = ours["tok_s"] / result[peer]["tok_s"]
        for peer_scheme, peer in result.get("gpt_fast", {}).items():
            ratios[f"{scheme}_vs_gpt_fast_{peer_scheme}"] = ours["tok_s"] / peer["tok_s_including_prefill"]
    return ratios


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--kv-cache-gib", type=int, default=8)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--gpt-fast", metavar="PEERS_DIR", default=None,
                        help="run gpt-fast from this folder (gptfast_peer.py and gpt-fast/) in the same run")
    parser.add_argument("--quantization", type=quantization_schemes, default=[None],
                        help="bf16 or schemes to quantize scaleinfer's weights to on load, comma-separated "
                             "(LLM(quantization=...)); HF stays bf16")
    return parser.parse_args()


if __name__ == "__main__":
    main()
