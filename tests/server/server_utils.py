"""Helpers for the server tests: a uvicorn server in a thread, Prometheus parsing, bounded polling."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from scaleinfer.engine.async_engine import AsyncLLMEngine

MODEL = "smollm2-135m"
API_KEY = "test-key"
MAX_MODEL_LEN = 512
MAX_BODY_BYTES = 64 * 1024
GREEDY = dict(temperature=0.0, max_tokens=8)
PENALTIES = dict(presence_penalty=0.5, frequency_penalty=1.5, repetition_penalty=1.3)
COMPLETION_PROMPTS = ["The capital of France is", "Once upon a time,", "def fibonacci(n):", "The sun is"]
CHAT_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:PORT
    engine: AsyncLLMEngine | None = None  # None when the server runs in another process
    api_key: str | None = None
    references: Any = None  # conftest.References: LLM.generate answers to compare with

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(f"{self.url}/metrics", timeout=10).text)


class ThreadedServer:
    """uvicorn serving `app` on 127.0.0.1 (a free port) from a daemon thread."""

    def __init__(self, app) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, timeout_s=30, what="uvicorn start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout_s} s")
        time.sleep(0.02)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {sample name with labels: value}, e.g. 'scaleinfer_requests_total{finish_reason="abort"}'."""
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def engine_is_idle(engine: AsyncLLMEngine) -> bool:
    stats = engine.stats()
    return stats.num_running == 0 and stats.num_waiting == 0 and stats.num_used_blocks == 0


def process_healthy(proc: subprocess.Popen, url: str, log_path: Path) -> bool:
    """Whether a `scaleinfer serve` process answers /health with 200; raises with its log if it exited."""
    if proc.poll() is not None:
        raise RuntimeError(f"scaleinfer serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def spawned_children(pid: int) -> list[int]:
    """pid's processes started by multiprocessing spawn (not its resource tracker): a server's engine-core
    process, a core's tensor-parallel ranks."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()
            and b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()]
