"""DeepSpeed ZeRO-Inference as the offload peer, on one GPU: ZeRO stage 3 with every parameter in pinned CPU
memory (`offload_param: cpu`), HF transformers' generate on random bf16 weights of a shape. bench/offload.py
runs it in a child process in the same run; alone:

    python bench/deepspeed_peer.py --shape llama3-8b --batches 1,32 --new-tokens 8 [--flexgen-batch 256]

DeepSpeed 0.19.8 comes from ../shared/peers/wheels (a pure-Python build; its ops are not needed here). Prints
one JSON object on the last line of stdout. Decode tok/s is measured as ours is: batch over the time of one
decode step, from generate(n) minus generate(1); the FlexGen figure is batch * new tokens over the whole call.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import write_config  # noqa: E402


def ds_config(batch: int) -> dict:
    return {"train_micro_batch_size_per_gpu": batch, "bf16": {"enabled": True},
            "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": True},
                                  "stage3_param_persistence_threshold": 0}}


def build(shape: str, tmp: Path):
    import deepspeed
    from transformers import AutoModelForCausalLM

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517", "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    deepspeed.init_distributed()
    config = write_config(shape, tmp)
    with deepspeed.zero.Init(config_dict_or_path=ds_config(1), remote_device="cpu", pin_memory=True,
                             dtype=torch.bfloat16):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    engine = deepspeed.initialize(model=model, config=ds_config(1))[0]
    engine.module.eval()
    return engine.module


def prompts(batch: int, length: int, seed: int) -> torch.Tensor:
    rng = random.Random(seed)
    return torch.tensor([[rng.randrange(1000, 30000) for _ in range(length)] for _ in range(batch)], device="cuda")


@torch.no_grad()
def seconds(model, ids: torch.Tensor, new_tokens: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def decode_rate(model, batch: int, prompt_len: int, new_tokens: int) -> dict:
    ids = prompts(batch, prompt_len, seed=batch)
    first, full = seconds(model, ids, 1), seconds(model, ids, new_tokens)
    step = (full - first) / (new_tokens - 1)
    return {"batch": batch, "new_tokens": new_tokens, "ttft_s": first, "s_per_step": step, "decode_tok_s": batch / step}


def flexgen(model, batch: int, prompt_len: int, new_tokens: int) -> dict:
    total = seconds(model, prompts(batch, prompt_len, seed=7), new_tokens)
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "seconds": total,
            "tok_s": batch * new_tokens / total}


def main() -> None:
    args = _parse()
    import deepspeed

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        model = build(args.shape, Path(tmp))
        out = {"system": f"DeepSpeed {deepspeed.__version__} ZeRO-3 offload_param cpu (ZeRO-Inference)",
               "startup_s": time.perf_counter() - start}
        seconds(model, prompts(1, 16, seed=0), 2)  # warm-up
        for batch in args.batches:
            out[f"batch{batch}"] = decode_rate(model, batch, 128, args.new_tokens)
        if args.flexgen_batch:
            out["flexgen"] = flexgen(model, args.flexgen_batch, args.flexgen_prompt, args.flexgen_new_tokens)
    print(json.dumps(out), flush=True)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--flexgen-batch", type=int, default=0, help="0: no FlexGen run")
    parser.add_argument("--flexgen-prompt", type=int, default=512)
    parser.add_argument("--flexgen-new-tokens", type=int, default=32)
    return parser.parse_args()


if __name__ == "__main__":
    main()
