"""Prefill rate: one long prompt, chunked, on random bf16 weights of a real shape; achieved TFLOP/s
against the bf16 matmul ceiling measured in the same run.

    python bench/prefill.py --shape llama3-8b [--prompt-len 8192 --chunk 2048]
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


def prefill_flops(config: dict, num_tokens: int) -> float:
    """Matmul FLOPs of a causal prefill: 2 per weight per token, plus QK^T and PV over the causal triangle."""
    hidden, layers, inter = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    per_layer = hidden * (hidden + 2 * kv) + hidden * hidden + 3 * hidden * inter
    weights = layers * per_layer + hidden * config["vocab_size"] / num_tokens  # logits for the last token only
    attention = layers * 2 * 2 * hidden * num_tokens * (num_tokens + 1) / 2
    return 2 * weights * num_tokens + attention


def hf_prefill_seconds(config, prompt: list[int]) -> float:
    """HF transformers eager (SDPA), the whole prompt in one forward, logits of the last token only."""
    from transformers import AutoModelForCausalLM

    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    ids = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        model(ids, logits_to_keep=1)
        torch.cuda.synchronize()
        start = time.perf_counter()
        model(ids, logits_to_keep=1)
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del model
    torch.cuda.empty_cache()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3.1-8b")
    parser.add_argument("--prompt-len", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=2048)
    args = parser.parse_args()
    device = torch.device("cuda")
    rng = random.Random(0)
    prompt = [rng.randrange(1000, 30000) for _ in range(args.prompt_len)]
    params = SamplingParams(temperature=0, max_tokens=1)
    with tempfile.TemporaryDirectory() as tmp:
        hf_seconds = hf_prefill_seconds(write_config(args.shape, Path(tmp)), prompt)
        llm = LLM(model=tmp, dtype="bfloat16", load_format="dummy", skip_tokenizer_init=True, progress=False,
                  max_num_batched_tokens=args.chunk, enable_prefix_caching=False, kv_cache_memory=8 << 30)
        llm.generate([prompt], params)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate([prompt], params)
        seconds = time.perf_counter() - start
    ceiling = ceilings(device, torch.bfloat16)
    tflop_s = prefill_flops(SHAPES[args.shape], args.prompt_len) / seconds / 1e12
    result = {"shape": args.shape, "prompt_len": args.prompt_len, "chunk": args.chunk, "seconds": seconds,
              "tflop_s": tflop_s, "ceilings": ceiling,
              "fraction_of_matmul_ceiling": tflop_s / ceiling["matmul_bfloat16_tflop_s"],
              "hf_eager_one_forward_seconds": hf_seconds, "speedup_vs_hf_eager": hf_seconds / seconds}
    path = write_result(f"prefill-{args.shape}", device, result)
    print(result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
