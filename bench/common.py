"""What every benchmark records: the card, its measured ceilings, the commit, and one JSON result file."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from scaleinfer.layers.embedding import ParallelLMHead, VocabParallelEmbedding

RESULTS = Path(__file__).parent / "results"


def quantization_schemes(text: str) -> list[str | None]:
    """--quantization's comma-separated list: bf16 (None, the weights as stored) or LLM(quantization=...)'s."""
    from scaleinfer.config import QUANTIZATIONS

    schemes = [None if name == "bf16" else name for name in text.split(",")]
    unknown = [name for name in schemes if name not in QUANTIZATIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown scheme(s) {unknown}; choose from bf16, "
                                         f"{', '.join(q for q in QUANTIZATIONS if q)}")
    return schemes


def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"CPU: {line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return f"CPU: {platform.processor()}"


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()

    # The GPU machine's copy of the tree has no .git of its own (or a stale one): whoever launches a run there
    # names the commit, and that name wins.
    launched = os.environ.get("SCALEINFER_COMMIT")
    if launched:
        return launched
    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    return sha + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def decode_bytes_read(model: torch.nn.Module) -> int:
    """Bytes one decode step of one sequence reads: every weight (and quantization scale) once, except that
    an input embedding not shared with the LM head gives one row (a tied one is read whole by the head)."""
    total = sum(p.nbytes for p in model.parameters())
    total += sum(b.nbytes for name, b in model.named_buffers() if name.endswith(("weight_scale", "weight_zero")))
    head = getattr(model, "lm_head", None)
    tied = {id(head.weight)} if head is not None else set()
    for module in model.modules():
        if isinstance(module, VocabParallelEmbedding) and not isinstance(module, ParallelLMHead):
            weight = module.weight  # [vocab (this rank's share), dim]
            if id(weight) not in tied:
                total -= weight.nbytes - weight[0].nbytes
    return total


def clean_commit() -> str:
    """The commit a result was made by; a tree with uncommitted changes makes no result unless
    SCALEINFER_ALLOW_DIRTY=1 says so (the commit is then recorded with -dirty)."""
    sha = commit()
    if sha.endswith("-dirty") and os.environ.get("SCALEINFER_ALLOW_DIRTY") != "1":
        raise SystemExit(f"refusing to write a result from a dirty tree ({sha}): commit first, "
                         "or set SCALEINFER_ALLOW_DIRTY=1 to record it as dirty")
    return sha


def timed(fn, repeats: int = 5, device: torch.device | None = None, before=None) -> float:
    """Best wall time of fn() in seconds, after one warm-up call; before(), untimed, ahead of each timed call
    (e.g. a barrier, so that several processes time the same moment)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if before is not None:
            before()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def ceilings(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """The card's own limits, measured now: copy bandwidth (read + write), matmul rate, pinned H2D.
    Every benchmark measures these first, so a run that could not be recorded stops here, not at the end."""
    clean_commit()
    out = {"copy_gb_s": _copy_gb_s(device), f"matmul_{_short(dtype)}_tflop_s": _matmul_tflop_s(device, dtype)}
    if device.type == "cuda":
        out["pinned_h2d_gb_s"] = _h2d_gb_s(device)
    return out


def _copy_gb_s(device: torch.device) -> float:
    nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), device=device) / 1e9


def _matmul_tflop_s(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    return 2 * n**3 / timed(lambda: a @ b, device=device) / 1e12


def _h2d_gb_s(device: torch.device) -> float:
    nbytes = 1 << 30
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return nbytes / timed(lambda: dst.copy_(src, non_blocking=True), device=device) / 1e9


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write_result(name: str, device: torch.device, payload: dict[str, Any]) -> Path:
    """bench/results/<name>-<card>-<date>.json with the card, date and commit first."""
    now = datetime.datetime.now(datetime.timezone.utc)
    card = card_name(device)
    sha = clean_commit()
    record = {"benchmark": name, "card": card, "date": now.isoformat(timespec="seconds"), "commit": sha,
              "torch": torch.__version__, **payload}
    slug = "cpu" if device.type == "cpu" else card.lower().replace(" ", "-").replace("nvidia-", "")
    path = RESULTS / f"{name}-{slug}-{now:%Y%m%d-%H%M%S}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
