"""What every benchmark records: the card, its measured ceilings, the commit, and one JSON result file."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


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
    """The card's own limits, measured now: copy bandwidth (read + write), matmul rate, pinned H2D."""
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
    record = {"benchmark": name, "card": card, "date": now.isoformat(timespec="seconds"), "commit": commit(),
              "torch": torch.__version__, **payload}
    slug = "cpu" if device.type == "cpu" else card.lower().replace(" ", "-").replace("nvidia-", "")
    path = RESULTS / f"{name}-{slug}-{now:%Y%m%d-%H%M%S}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
