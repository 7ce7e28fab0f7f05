"""The engine core in its own process, under `run_server`: faults that surface (the core process killed, a device
fault in a step: streams end with an error event, /health 503, the server exits non-zero within 10 s), a
request whose row fails alone, a slow reader that costs the server no memory, and stop strings across the
process boundary equal to LLM.generate's, token for token.

Two servers (a tiny Llama with a 4096-token context, tests/server/faulty_core.py's core) start at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from faulty_core import BAD_ROW_SEED, DEVICE_FAULT_SEED, SLOW_SEED
from server_utils import COMPLETION_PROMPTS, free_port, parse_metrics, process_healthy, spawned_children, wait_until

from scaleinfer.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

EXIT_BOUND_S = 10.0
SERVE = """
import sys
sys.path.insert(0, {here!r})
from faulty_core import FaultyCore
from scaleinfer.config import EngineConfig
from scaleinfer.server.app import run_server
config = EngineConfig.from_kwargs(model={model!r}, device="cpu", max_model_len=4096, num_blocks=1024)
run_server(config, "127.0.0.1", {port}, None, log_level="warning", core_class=FaultyCore)
"""
LONG_TOKENS = 800


class Served:
    def __init__(self, model: Path, log_path: Path) -> None:
        self.port, self.log_path = free_port(), log_path
        self.url = f"http://127.0.0.1:{self.port}"
        script = SERVE.format(here=str(Path(__file__).parent), model=str(model), port=self.port)
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", script], stdout=log, stderr=subprocess.STDOUT)

    def wait_healthy(self) -> Served:
        wait_until(lambda: process_healthy(self.proc, self.url, self.log_path), timeout_s=240, what="serve health")
        return self

    def log(self) -> str:
        return self.log_path.read_text()[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def long_llama(tiny_models, tmp_path_factory) -> Path:
    """The tiny Llama 3.1 with a 4096-token context (random weights do not care)."""
    folder = tmp_path_factory.mktemp("long_llama")
    shutil.copytree(tiny_models["llama3.1"][0], folder, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    return folder


@pytest.fixture(scope="module")
def servers(long_llama, tmp_path_factory):
    """(faults, kill): started together; each test that kills one goes last on it."""
    logs = tmp_path_factory.mktemp("core_process")
    both = [Served(long_llama, logs / "faults.log"), Served(long_llama, logs / "kill.log")]
    try:
        yield [served.wait_healthy() for served in both]
    finally:
        for served in both:
            served.stop()


def body(**fields) -> dict:
    return {"model": "x", "prompt": "The capital of France", "temperature": 0.0, "ignore_eos": True, **fields}


def model_name(served: Served) -> str:
    return httpx.get(f"{served.url}/v1/models", timeout=10).json()["data"][0]["id"]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def generation_tokens(served: Served) -> float:
    return parse_metrics(httpx.get(f"{served.url}/metrics", timeout=10).text)["scaleinfer_generation_tokens_total"]


def sse_events(raw: bytes) -> list[str]:
    """The data payloads of an HTTP/1.1 chunked SSE response, in order."""
    _, _, payload = raw.partition(b"\r\n\r\n")
    text = _unchunk(payload).decode()
    return [line[6:] for line in text.split("\n") if line.startswith("data: ")]


def _unchunk(payload: bytes) -> bytes:
    out, rest = bytearray(), payload
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += rest[:size]
        rest = rest[size + 2:]
    return bytes(out)


def test_a_port_in_use_fails_at_once_before_loading(long_llama, tmp_path):
    """The model's folder has no weights: loading it would fail with its own error, so the port's error proves
    the port was tried first (no clock: a busy machine's start-up time says nothing about the order)."""
    unloadable = tmp_path / "no_weights"
    shutil.copytree(long_llama, unloadable, ignore=shutil.ignore_patterns("*.safetensors"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "scaleinfer.cli", "serve", "--port", str(port), "--device", "cpu",
                               "--model", str(unloadable)], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and f"cannot listen on 127.0.0.1:{port}" in done.stderr + done.stdout, done.stderr
    assert "safetensors" not in done.stderr + done.stdout, "the model was loaded before the port was tried"


def test_the_start_up_line_names_the_model_url_and_key(servers):
    faults, _ = servers
    assert f"at http://127.0.0.1:{faults.port}/v1 (no API key required)" in faults.log()
    assert f"serving {model_name(faults)!r}" in faults.log()


def test_a_slow_reader_costs_the_server_no_memory_and_gets_the_whole_stream(servers):
    faults, _ = servers
    request = body(model=model_name(faults), max_tokens=LONG_TOKENS, logprobs=20)  # ~2.5 kB a token as SSE
    reference = httpx.post(f"{faults.url}/v1/completions", json=request, timeout=300).json()["choices"][0]["text"]
    before_rss, before_tokens = rss_bytes(faults.proc.pid), generation_tokens(faults)
    raw = json.dumps({**request, "stream": True}).encode()
    with socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a reader that takes almost nothing
        client.connect(("127.0.0.1", faults.port))
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
        # The core makes every token while nothing is read: outputs the reader has not taken coalesce.
        wait_until(lambda: generation_tokens(faults) >= before_tokens + LONG_TOKENS, timeout_s=300,
                   what="the core generated the whole stream")
        grown = rss_bytes(faults.proc.pid) - before_rss
        chunks = []
        while chunk := client.recv(1 << 16):
            chunks.append(chunk)
            if b"data: [DONE]" in chunk:
                break
    events = sse_events(b"".join(chunks))
    assert events[-1] == "[DONE]"
    streamed = [json.loads(event)["choices"][0] for event in events[:-1]]
    assert "".join(choice["text"] for choice in streamed) == reference and streamed[-1]["finish_reason"] == "length"
    assert len(streamed) < LONG_TOKENS, "what came while the reader stalled was coalesced into fewer chunks"
    assert grown < 16 << 20, f"the front grew by {grown / 2**20:.1f} MiB while its reader stalled"


def test_a_request_whose_row_fails_fails_alone(servers):
    faults, _ = servers
    name = model_name(faults)
    # The bystander streams before the bad request is sent, and lasts (20 ms a step: 2.5 s), so the bad row's step
    # has it in its batch; sent together, it could have been admitted after the bad request was over.
    first, events = threading.Event(), []
    bystander = body(model=name, max_tokens=128, stream=True, seed=SLOW_SEED)
    reader = threading.Thread(target=_stream_until_closed, args=(faults.url, bystander, first, events))
    reader.start()
    assert first.wait(60) and events and "choices" in json.loads(events[0]), events
    failed = httpx.post(f"{faults.url}/v1/completions", json=body(model=name, max_tokens=64, seed=BAD_ROW_SEED),
                        timeout=60)
    reader.join(timeout=60)
    assert failed.status_code == 500 and "injected" in failed.json()["error"]["message"], failed.text
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length", events[-2:]
    assert httpx.get(f"{faults.url}/health", timeout=10).status_code == 200


def _stream_until_closed(url: str, request: dict, first: threading.Event, events: list[str]) -> None:
    with httpx.stream("POST", f"{url}/v1/completions", json=request, timeout=60) as response:
        try:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    first.set()
        except httpx.HTTPError:
            pass
    first.set()


def _health_503_then_exit(served: Served, since: float) -> None:
    statuses: list[int] = []

    def unhealthy() -> bool:
        with contextlib.suppress(httpx.TransportError):  # closed once the server exits
            statuses.append(httpx.get(f"{served.url}/health", timeout=2).status_code)
        return served.proc.poll() is not None or 503 in statuses

    wait_until(unhealthy, timeout_s=EXIT_BOUND_S, what="/health 503")
    assert 503 in statuses, f"/health answered {statuses} before the exit"
    code = served.proc.wait(timeout=max(0.1, EXIT_BOUND_S - (time.monotonic() - since)))
    assert code != 0, served.log()
    assert time.monotonic() - since < EXIT_BOUND_S


def test_a_device_fault_in_a_step_ends_every_stream_and_the_server(servers):
    faults, _ = servers
    name = model_name(faults)
    # The bystander streams before the faulting request is sent, and lasts (20 ms a step: a minute), so the step
    # that faults has it in its batch. Sent together, the fault (the third step) could come before the bystander
    # was admitted, which then got a 503 and no stream at all.
    bystander = body(model=name, max_tokens=3000, stream=True, seed=SLOW_SEED)
    faulting = body(model=name, max_tokens=3000, stream=True, seed=DEVICE_FAULT_SEED)
    streams, readers = [], []
    for request in (bystander, faulting):
        first, events = threading.Event(), []
        readers.append(threading.Thread(target=_stream_until_closed, args=(faults.url, request, first, events)))
        readers[-1].start()
        assert first.wait(60)
        streams.append(events)
    since = time.monotonic()
    assert streams[0] and "choices" in json.loads(streams[0][0]), f"the bystander streamed first: {streams[0][:2]}"
    for reader in readers:
        reader.join(timeout=EXIT_BOUND_S)
    for events in streams:
        assert events[-1] == "[DONE]" and "illegal memory access" in json.loads(events[-2])["error"]["message"]
    _health_503_then_exit(faults, since)
    assert "illegal memory access" in faults.log()


def test_the_core_process_killed_mid_stream(servers):
    _, kill = servers
    (core,) = spawned_children(kill.proc.pid)
    first, events = threading.Event(), []
    request = body(model=model_name(kill), max_tokens=3000, stream=True, seed=SLOW_SEED)  # 20 ms a step: a minute
    reader = threading.Thread(target=_stream_until_closed, args=(kill.url, request, first, events))
    reader.start()
    assert first.wait(60)
    kill_time = time.monotonic()
    os.kill(core, signal.SIGKILL)
    reader.join(timeout=EXIT_BOUND_S)
    assert events[-1] == "[DONE]", events[-3:]
    error = json.loads(events[-2])["error"]
    assert error["code"] == "engine_dead" and "exited" in error["message"], error
    _health_503_then_exit(kill, kill_time)


def test_stop_strings_across_the_process_boundary_equal_llm_generate(server):
    """The `server` fixture's core runs in its own process; references.stopped came from LLM.generate."""
    params = SamplingParams(**server.references.stop_params)

    async def run() -> list:
        outputs = []
        for i, prompt in enumerate(COMPLETION_PROMPTS):
            outputs.append([out async for out in server.engine.generate(f"stop-{i}", prompt, params)][-1])
        return outputs

    for ours, reference in zip(asyncio.run(run()), server.references.stopped):
        ours, reference = ours.outputs[0], reference.outputs[0]
        assert (ours.token_ids, ours.text, ours.finish_reason, ours.stop_reason) == (
            reference.token_ids, reference.text, reference.finish_reason, reference.stop_reason)
    assert any(r.outputs[0].stop_reason is not None for r in server.references.stopped), "a stop string hit"
