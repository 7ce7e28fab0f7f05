"""Graceful shutdown of a real `scaleinfer serve` process (the embedded model on 127.0.0.1): SIGTERM while a
stream runs stops new connections at once, ends the stream in-band after the grace period, exits 0 - whether
the signal reaches the front alone or its whole process group (systemd, docker stop), engine core included."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from server_utils import MODEL, free_port, process_healthy, wait_until

pytestmark = pytest.mark.slow

GRACE_S = 1.0


@pytest.fixture()
def serve_process(tmp_path):
    port = free_port()
    log_path = tmp_path / "serve.log"
    command = [sys.executable, "-m", "scaleinfer.cli", "serve", "--port", str(port), "--max-model-len", "256",
               "--device", "cpu", "--shutdown-timeout", str(GRACE_S)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: process_healthy(proc, url, log_path), timeout_s=240, what="scaleinfer serve health")
        yield proc, url, log_path
    finally:
        # the session's every process, the engine core included (it ignores SIGTERM, and a failed test may leave
        # it between its front's death and its own parent check)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _refuses_connections(url: str) -> bool:
    """True once nothing answers: a closed listener refuses the connection or resets it, or closes it unanswered
    (a connection taken into the backlog just before the close); a timeout is not an answer either way."""
    try:
        httpx.get(f"{url}/health", timeout=2)
    except (httpx.NetworkError, httpx.RemoteProtocolError):  # ConnectError, ReadError (reset), WriteError, ...
        return True
    except httpx.TimeoutException:
        return False
    return False


@pytest.mark.parametrize("to_group", [False, True], ids=["front", "process-group"])
def test_sigterm_mid_stream_ends_the_stream_and_exits_0(serve_process, to_group):
    proc, url, log_path = serve_process
    body = {"model": MODEL, "prompt": "Once upon a time,", "max_tokens": 200, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["text"], "a token was streamed before the signal"
        signalled = time.monotonic()
        if to_group:  # the front and its engine core (the serve runs in a session of its own)
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        wait_until(lambda: _refuses_connections(url), timeout_s=5, what="listening socket closed")
        events = [line[6:] for line in lines if line.startswith("data: ")]
    # 200 tokens take far longer than the grace period on CPU: the stream is ended in-band, not cut.
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "shutting down" in error["message"] and error["code"] == "engine_dead"
    assert time.monotonic() - signalled < GRACE_S + 10
    proc.wait(timeout=30)
    log = log_path.read_text()
    assert proc.returncode == 0, log[-3000:]
    assert "leaked" not in log and "Traceback" not in log, log[-3000:]  # the core ended as asked, not killed
    assert time.monotonic() - signalled < GRACE_S + 20, "the process exits promptly after the stream ended"
