"""`scaleinfer serve --tensor-parallel-size 2` (CPU processes over gloo) whose worker is killed mid-stream: the
stream ends, the server stops and the process exits 1 within 60 s, its log naming the rank; no worker is left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from server_utils import free_port, process_healthy, spawned_children, wait_until

pytestmark = pytest.mark.slow

BOUND_S = 60


def worker_pids(pid: int) -> list[int]:
    """The rank processes the server's engine-core process spawned."""
    (core,) = spawned_children(pid)
    return spawned_children(core)


def test_a_killed_worker_stops_the_server_with_status_1(tiny_models, tmp_path):
    folder, _ = tiny_models["llama3.1"]
    port, log_path = free_port(), tmp_path / "serve.log"
    command = [sys.executable, "-m", "scaleinfer.cli", "serve", "--model", str(folder), "--port", str(port),
               "--device", "cpu", "--tensor-parallel-size", "2", "--max-model-len", "256"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: process_healthy(proc, url, log_path), timeout_s=240, what="serve health")
        (worker,) = worker_pids(proc.pid)
        body = {"model": str(folder), "prompt": "The capital", "max_tokens": 200, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            killed = time.monotonic()
            os.kill(worker, signal.SIGKILL)
            rest = [line for line in _until_closed(lines) if line]
        assert rest[-1] == "data: [DONE]" and "rank 1" in rest[-2], (rest[-3:], log_path.read_text()[-3000:])
        assert proc.wait(timeout=BOUND_S) == 1
        assert time.monotonic() - killed < BOUND_S
        log = log_path.read_text()
        assert "tensor-parallel rank 1" in log and "SIGKILL" in log
        assert not Path(f"/proc/{worker}").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def _until_closed(lines):
    try:
        yield from lines
    except httpx.HTTPError:
        return

