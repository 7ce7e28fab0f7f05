"""Live servers on 127.0.0.1 over the embedded model (SmolLM2-135M, CPU, float32).

`server`: uvicorn in a thread of this process, its engine core in a process of its own, API key required;
the same model's LLM.generate answers (in-process) were recorded first as references. `admission_server`: a
subprocess through run_server with max_num_seqs=1 and max_waiting=1. Both load at once (two cores), since a
load is most of the cost.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import dataclass, field

import httpx
import pytest
from server_utils import (
    API_KEY,
    CHAT_MESSAGES,
    COMPLETION_PROMPTS,
    GREEDY,
    MAX_BODY_BYTES,
    MAX_MODEL_LEN,
    PENALTIES,
    LiveServer,
    ThreadedServer,
    engine_is_idle,
    free_port,
    wait_until,
)

from scaleinfer.sampling_params import SamplingParams

ADMISSION_SERVER = """
from scaleinfer.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from scaleinfer.server.app import run_server
config = EngineConfig(model=ModelConfig(max_model_len=256), cache=CacheConfig(num_blocks=64),
                      scheduler=SchedulerConfig(max_num_seqs=1, max_waiting=1))
run_server(config, "127.0.0.1", {port}, None, log_level="warning")
"""


@dataclass
class References:
    """LLM.generate / LLM.chat answers (greedy, 8 tokens) from the engine the server then serves."""

    completions: dict[str, str] = field(default_factory=dict)
    chat: str = ""
    penalized: str = ""  # COMPLETION_PROMPTS[0] under PENALTIES
    stop_params: dict = field(default_factory=dict)  # SamplingParams fields with stop strings
    stopped: list = field(default_factory=list)  # RequestOutputs of COMPLETION_PROMPTS under stop_params


@dataclass
class Process:
    proc: subprocess.Popen
    url: str
    log_path: str
    ready: bool = False

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()[-3000:]


@pytest.fixture(scope="session")
def _admission_process(tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("admission") / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", ADMISSION_SERVER.format(port=port)],
                                stdout=log, stderr=subprocess.STDOUT)
    process = Process(proc, f"http://127.0.0.1:{port}", str(log_path))
    yield process
    if not process.ready:  # still loading: a SIGTERM then ends it uncleanly, as any program
        proc.kill()
        proc.wait(timeout=10)
        return
    proc.send_signal(signal.SIGINT)  # Ctrl-C: a graceful stop like SIGTERM's (test_shutdown.py), exit 0
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        raise AssertionError(f"run_server did not stop within 30 s of SIGINT:\n{process.log()}") from None
    assert proc.returncode == 0, process.log()


@pytest.fixture(scope="session")
def server(request) -> LiveServer:
    if any("admission_server" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("_admission_process")  # start it first: both models load at once
    from scaleinfer.config import EngineConfig
    from scaleinfer.engine.async_engine import AsyncLLMEngine
    from scaleinfer.llm import LLM
    from scaleinfer.server.app import build_app

    llm = LLM(max_model_len=MAX_MODEL_LEN, num_blocks=256, progress=False)
    references = _references(llm)
    del llm
    # The server's engine core runs in a process of its own, as under `scaleinfer serve`: every answer the
    # tests compare with the references crosses the process boundary.
    engine = AsyncLLMEngine.from_config(EngineConfig.from_kwargs(max_model_len=MAX_MODEL_LEN, num_blocks=256))
    threaded = ThreadedServer(build_app(engine, api_key=API_KEY, max_body_bytes=MAX_BODY_BYTES))
    yield LiveServer(threaded.url, engine, API_KEY, references)
    threaded.stop()
    engine.shutdown()


def _references(llm) -> References:
    params = SamplingParams(**GREEDY)
    outputs = llm.generate(COMPLETION_PROMPTS, params)
    chat = llm.chat(CHAT_MESSAGES, params)[0].outputs[0].text
    penalized = llm.generate(COMPLETION_PROMPTS[0], SamplingParams(**GREEDY, **PENALTIES))[0].outputs[0].text
    stop_params = dict(temperature=0.0, max_tokens=24, stop=[" the", ",", "."])
    stopped = llm.generate(COMPLETION_PROMPTS, SamplingParams(**stop_params))
    return References({p: o.outputs[0].text for p, o in zip(COMPLETION_PROMPTS, outputs)}, chat, penalized,
                      stop_params, stopped)


@pytest.fixture(scope="session")
def admission_server(_admission_process, server) -> LiveServer:  # server: both load at once
    process = _admission_process

    def ready() -> bool:
        if process.proc.poll() is not None:
            raise RuntimeError(f"admission server exited with {process.proc.returncode}:\n{process.log()}")
        try:
            return httpx.get(f"{process.url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(ready, timeout_s=240, what="admission server health")
    process.ready = True
    return LiveServer(process.url)


@pytest.fixture(autouse=True)
def _no_kv_blocks_held(request):
    """After every server test: no request running or waiting, no KV block held."""
    yield
    if "server" in request.fixturenames:
        engine = request.getfixturevalue("server").engine
        wait_until(lambda: engine_is_idle(engine), timeout_s=10, what="engine idle with 0 KV blocks")
    if "admission_server" in request.fixturenames:
        live = request.getfixturevalue("admission_server")
        wait_until(lambda: live.metrics()["scaleinfer_kv_cache_used_blocks"] == 0, timeout_s=10,
                   what="admission server with 0 KV blocks")
