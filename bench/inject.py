"""init_inference on an HF model: decode tok/s at batch 1 and batch 32 against the same HF model, eager and
with a static cache + torch.compile, all in one process on one card.

The HF model is built with random bf16 weights of a real shape directly on the GPU and measured first;
init_inference then moves its weights into ours (the two never hold a full copy each) and ours is
measured on the same prompts. Every row of a batch has the same prompt length (no padding) and generates
exactly --new-tokens tokens (min_new_tokens), so both sides do the same work.

    python bench/inject.py --shape gpt2-xl|pythia-2.8b|llama3-8b [--batch-sizes 1 32 --prompt-len 128 --new-tokens 128]
    python bench/inject.py --tiny      # CPU smoke run: tiny configs of every family, float32, a few tokens

Decode time per step is (time of new_tokens tokens - time of 1 token) / (new_tokens - 1): the prefill
cancels out. HF compiles only its decode steps (the prefill runs eager), so the 1-token call compiles
nothing; on the CPU it does not compile at all ("compiled": false in the result).
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ceilings, decode_bytes_read, sync, write_result  # noqa: E402
from shapes import SHAPES  # noqa: E402

from scaleinfer import init_inference  # noqa: E402

# shape -> (transformers config class, its arguments): the real models' shapes, random weights
INJECT_SHAPES: dict[str, tuple[str, dict]] = {
    "gpt2-xl": ("GPT2Config", dict(n_embd=1600, n_layer=48, n_head=25, n_positions=1024, vocab_size=50257)),
    "pythia-2.8b": ("GPTNeoXConfig", dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                                          num_attention_heads=32, vocab_size=50304, max_position_embeddings=2048,
                                          rotary_pct=0.25, use_parallel_residual=True)),
    "llama3-8b": ("LlamaConfig", dict(SHAPES["llama3-8b"], rms_norm_eps=1e-5)),
}
TINY_TOKENS = dict(vocab_size=384, bos_token_id=1, eos_token_id=2, pad_token_id=0)
TINY_COMMON = dict(TINY_TOKENS, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=256)
TINY_SHAPES: dict[str, tuple[str, dict]] = {
    "gpt2-tiny": ("GPT2Config", dict(TINY_TOKENS, n_embd=64, n_layer=2, n_head=4, n_positions=256)),
    "pythia-tiny": ("GPTNeoXConfig", dict(TINY_COMMON, rotary_pct=0.25, use_parallel_residual=True)),
    "llama-tiny": ("LlamaConfig", dict(TINY_COMMON, num_key_value_heads=2)),
    "opt-tiny": ("OPTConfig", dict(TINY_TOKENS, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=256)),
    "phi3-tiny": ("Phi3Config", dict(TINY_COMMON, num_key_value_heads=2)),
}

Generate = Callable[[torch.Tensor, int], object]  # (input_ids, new_tokens) -> anything


def hf_model(shape: tuple[str, dict], device: torch.device, dtype: torch.dtype):
    """A random-weight HF model of the shape, built on the device in dtype."""
    import transformers

    config_name, kwargs = shape
    config = getattr(transformers, config_name)(**kwargs)
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def decode_rate(generate: Generate, ids: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    """Decode tok/s over the whole batch, after two warm-up calls (which compile where HF compiles)."""
    for _ in range(2):
        generate(ids, new_tokens)
    first = min(_seconds(lambda: generate(ids, 1), ids.device) for _ in range(repeats))
    full = min(_seconds(lambda: generate(ids, new_tokens), ids.device) for _ in range(repeats))
    step = (full - first) / (new_tokens - 1)
    if step <= 0:  # a loaded machine: the difference drowned in noise
        raise RuntimeError(f"timing noise: {new_tokens} tokens took {full:.4f} s, 1 token {first:.4f} s")
    return {"first_token_ms": first * 1e3, "ms_per_step": step * 1e3, "tok_s": ids.shape[0] / step}


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def hf_generate(model, static: bool) -> Generate:
    extra = {"cache_implementation": "static"} if static else {}

    @torch.no_grad()
    def generate(ids: torch.Tensor, n: int) -> object:
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0, **extra)

    return generate


def ours_generate(model) -> Generate:
    def generate(ids: torch.Tensor, n: int) -> object:
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)

    return generate


def batch_rates(generate: Generate, prompts: dict[int, torch.Tensor], args: argparse.Namespace) -> dict:
    """batch size -> decode_rate; a failure (say, compilation on an old card) is recorded as its error and
    printed, not the end of the run."""
    out = {}
    for batch, ids in prompts.items():
        try:
            out[batch] = decode_rate(generate, ids, args.new_tokens, args.repeats)
        except Exception as exc:  # noqa: BLE001 - the message goes into the result
            out[batch] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            print(f"batch {batch}: {out[batch]['error']}", file=sys.stderr)
            _free()
    return out


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def batch_prompts(batch_sizes: list[int], prompt_len: int, vocab: int, device: torch.device) -> dict[int, torch.Tensor]:
    rng = random.Random(0)
    return {b: torch.tensor([[rng.randrange(100, vocab) for _ in range(prompt_len)] for _ in range(b)], device=device)
            for b in batch_sizes}


def run_shape(name: str, shape: tuple[str, dict], args: argparse.Namespace, device: torch.device,
              dtype: torch.dtype) -> dict:
    model = hf_model(shape, device, dtype)
    prompts = batch_prompts(args.batch_sizes, args.prompt_len, model.config.vocab_size, device)
    rates = {"hf_eager": batch_rates(hf_generate(model, False), prompts, args), "hf_static_compile": {}}
    if not args.skip_static:
        rates["hf_static_compile"] = batch_rates(hf_generate(model, True), prompts, args)
    _drop_compiled(model)
    ours, startup = _inject(model, args.kv_cache_gib)
    rates["scaleinfer"] = batch_rates(ours_generate(ours), prompts, args)
    weight_bytes = decode_bytes_read(ours.engine.runner.model)
    return {"shape": name, "config": shape[1], "inject_s": startup, "weight_bytes": weight_bytes,
            "compiled": device.type == "cuda", **rates}


def _drop_compiled(model) -> None:
    """Release HF's static caches and compiled graphs (their CUDA-graph memory pools) before ours is built."""
    for attr in ("_cache", "_compiled_call"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    torch._dynamo.reset()
    _free()


def _inject(model, kv_cache_gib: float) -> tuple[object, float]:
    start = time.perf_counter()
    # Prefix caching off: every timed call repeats its prompts, which HF cannot reuse either.
    ours = init_inference(model, kv_cache_memory=int(kv_cache_gib * (1 << 30)), enable_prefix_caching=False)
    return ours, time.perf_counter() - start


def ratios(result: dict, copy_gb_s: float) -> dict:
    out = {}
    ours = result["scaleinfer"]
    for b, figures in ours.items():
        for peer in ("hf_eager", "hf_static_compile"):
            if "tok_s" in figures and "tok_s" in result[peer].get(b, {}):
                out[f"batch{b}_tok_s_vs_{peer}"] = figures["tok_s"] / result[peer][b]["tok_s"]
    if "ms_per_step" in ours.get(1, {}):  # a batch-1 step reads every weight once
        weight_gb_s = result["weight_bytes"] / ours[1]["ms_per_step"] / 1e6
        out["batch1_weight_gb_s"], out["batch1_fraction_of_copy_bandwidth"] = weight_gb_s, weight_gb_s / copy_gb_s
    return out


def main() -> None:
    args = _parse()
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    shapes = TINY_SHAPES if args.tiny else {args.shape: INJECT_SHAPES[args.shape]}
    limits = ceilings(device, dtype)
    for name, shape in shapes.items():
        result = run_shape(name, shape, args, device, dtype)
        result.update(prompt_len=args.prompt_len, new_tokens=args.new_tokens, dtype=str(dtype), ceilings=limits)
        result["ratios"] = ratios(result, limits["copy_gb_s"])
        path = write_result(f"inject-{name}", device, result)
        print({k: v for k, v in result.items() if k != "config"})
        print(f"wrote {path}")
        _free()


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(INJECT_SHAPES), default="llama3-8b")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run over tiny configs of every family")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 1 32 (tiny: 1 4)")
    parser.add_argument("--prompt-len", type=int, default=None, help="default: 128 (tiny: 16)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default: 128 (tiny: 16)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per figure, the best kept; 2 (tiny: 3)")
    parser.add_argument("--kv-cache-gib", type=float, default=None, help="ours; default: 6 (tiny: 0.0625)")
    parser.add_argument("--skip-static", action="store_true", help="no HF static cache + compile peer")
    args = parser.parse_args()
    defaults = dict(batch_sizes=[1, 4], prompt_len=16, new_tokens=16, repeats=3, kv_cache_gib=1 / 16) if args.tiny \
        else dict(batch_sizes=[1, 32], prompt_len=128, new_tokens=128, repeats=2, kv_cache_gib=6)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.new_tokens < 2:
        parser.error(f"--new-tokens must be at least 2, got {args.new_tokens}")
    return args


if __name__ == "__main__":
    main()
