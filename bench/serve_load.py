"""Serving under load: N concurrent openai clients streaming from an OpenAI-compatible server, and, as the
baseline of the same run, LLM.generate on the same requests offline (after the server stopped, so both
have the device to themselves).

Requests are seeded prompts with fixed output lengths (eos ignored), so every run and both paths do the
same work: random-word sentences for a real checkpoint, random token ids for a --shape (random weights,
no tokenizer, no checkpoint). Reported: requests/s, output tok/s, time to first token and inter-token
latency at p50/p99, end-to-end latency, errors; the online/offline output tok/s ratio; the CPU use of the
server's front process (HTTP, tokenizer, detokenization) and of its engine-core process while serving; on a
GPU the card's ceilings. A chunk may carry several tokens (a stream's outputs coalesce while its reader is
away), so tokens are counted from the chunks' text via usage, and inter-token latency is per chunk.

    python bench/serve_load.py                                   # starts run_server on the embedded model
    python bench/serve_load.py --shape llama3-8b --concurrency 64    # a GPU: random bf16 weights, token ids
    python bench/serve_load.py --url http://127.0.0.1:8000 --model smollm2-135m --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import openai
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ceilings, write_result  # noqa: E402

SERVER = """
from scaleinfer.config import EngineConfig, ModelConfig, SchedulerConfig
from scaleinfer.server.app import run_server
config = EngineConfig(model=ModelConfig(**{model_kwargs!r}), scheduler=SchedulerConfig(max_num_seqs={max_num_seqs}))
run_server(config, "127.0.0.1", {port}, None, log_level="warning")
"""


# Seeded prompts are sentences of these words: the same text for every model and both paths.
_WORD_TEXT = ("the of and to in is was for on are with as his they be at one have this from or had by hot word but "
         "what some we can out other were all there when up use your how said an each she which do their time if "
         "will way about many then them write would like so these her long make thing see him two has look more "
         "day could go come did number sound no most people my over know water than call first who may down side "
         "been now find river city music garden winter letter engine market story")
WORDS = _WORD_TEXT.split()


@dataclass(slots=True)
class Workload:
    prompts: list[str] | list[list[int]]
    output_lens: list[int]


@dataclass(slots=True)
class ServedModel:
    """What the server loads (ModelConfig fields), the name requests use, and the token-id vocabulary of
    prompts (None: word prompts through the tokenizer)."""

    kwargs: dict[str, object]
    name: str
    prompt_vocab: int | None = None


@dataclass(slots=True)
class RequestRecord:
    start: float
    token_times: list[float] = field(default_factory=list)  # arrival of each streamed chunk with text
    num_tokens: int = 0  # from the final usage
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


def make_workload(args: argparse.Namespace, prompt_vocab: int | None) -> Workload:
    """Prompt lengths in words (text) or tokens (token ids); the same seed gives the same requests."""
    rng = random.Random(args.seed)
    lengths = [rng.randint(args.min_prompt, args.max_prompt) for _ in range(args.num_requests)]
    if prompt_vocab is None:
        prompts = [" ".join(rng.choices(WORDS, k=n)) for n in lengths]
    else:
        prompts = [[rng.randrange(prompt_vocab) for _ in range(n)] for n in lengths]
    return Workload(prompts, [rng.randint(args.min_output, args.max_output) for _ in lengths])


def served_model(args: argparse.Namespace, folder: Path) -> ServedModel:
    """The embedded model or a checkpoint by name; or a shape's config.json in folder with random weights."""
    base: dict[str, object] = {"device": args.device, "max_model_len": args.max_model_len}
    if args.shape is None:
        return ServedModel({"model": args.model, **base}, args.model)
    from shapes import write_config

    config = write_config(args.shape, folder)
    kwargs = {"model": str(folder), "dtype": "bfloat16", "load_format": "dummy", "skip_tokenizer_init": True}
    name = args.model if args.url else str(folder)  # a server started here names the model by its folder
    return ServedModel({**kwargs, **base}, name, min(config.vocab_size, 32000))


# ---- online ------------------------------------------------------------------------------------------


async def one_request(client: openai.AsyncOpenAI, model: str, prompt: str | list[int],
                      max_tokens: int) -> RequestRecord:
    record = RequestRecord(time.perf_counter())
    try:
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, stream=True,
                                                 temperature=0.0, extra_body={"ignore_eos": True},
                                                 stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices:
                record.token_times.append(time.perf_counter())
            if chunk.usage is not None:
                record.num_tokens = chunk.usage.completion_tokens
    except openai.APIError as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    return record


async def run_online(args: argparse.Namespace, url: str, model: str,
                     work: Workload) -> tuple[list[RequestRecord], float]:
    """All requests through `concurrency` clients at a time; returns the records and the wall time."""
    limit = asyncio.Semaphore(args.concurrency)
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=args.api_key or "none", max_retries=0,
                                  timeout=600) as client:
        await one_request(client, model, work.prompts[0], 2)  # warm-up, untimed

        async def limited(prompt: str | list[int], max_tokens: int) -> RequestRecord:
            async with limit:
                return await one_request(client, model, prompt, max_tokens)

        start = time.perf_counter()
        records = await asyncio.gather(*(limited(p, n) for p, n in zip(work.prompts, work.output_lens)))
        return list(records), time.perf_counter() - start


def summarize(records: list[RequestRecord], seconds: float) -> dict[str, float | int | list[str]]:
    done = [r for r in records if r.error is None and r.token_times]
    ttfts = [r.ttft for r in done]
    itls = [gap for r in done for gap in r.itls]
    e2e = [r.token_times[-1] - r.start for r in done]
    num_tokens = sum(r.num_tokens or len(r.token_times) for r in done)
    return {
        "seconds": seconds, "num_ok": len(done), "num_errors": len(records) - len(done),
        "requests_s": len(done) / seconds, "output_tok_s": num_tokens / seconds,
        **_percentiles("ttft_s", ttfts), **_percentiles("itl_s", itls), **_percentiles("e2e_s", e2e),
        "errors": sorted({r.error for r in records if r.error})[:5],
    }


def _percentiles(name: str, values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    p50, p99 = np.percentile(values, [50, 99])
    return {f"{name}_p50": float(p50), f"{name}_p99": float(p99), f"{name}_mean": float(np.mean(values))}


# ---- offline baseline and the server -----------------------------------------------------------------


def run_offline(args: argparse.Namespace, model: ServedModel, work: Workload) -> tuple[dict[str, float], torch.device]:
    from scaleinfer import LLM, SamplingParams

    llm = LLM(**model.kwargs, max_num_seqs=args.max_num_seqs, progress=False)
    llm.generate(work.prompts[:2], SamplingParams(temperature=0, max_tokens=2))  # warm-up
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in work.output_lens]
    start = time.perf_counter()
    outputs = llm.generate(work.prompts, params)
    seconds = time.perf_counter() - start
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    device = llm.engine.runner.device
    del llm, outputs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the ceilings measured next need the memory
    return {"seconds": seconds, "requests_s": len(work.prompts) / seconds, "output_tok_s": num_tokens / seconds}, device


def start_server(args: argparse.Namespace, model: ServedModel) -> tuple[subprocess.Popen, str]:
    port = free_port()
    code = SERVER.format(model_kwargs=model.kwargs, max_num_seqs=args.max_num_seqs, port=port)
    proc = subprocess.Popen([sys.executable, "-c", code])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.server_timeout
    while not _healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"server did not come up at {url} (exit code {proc.poll()})")
        time.sleep(0.5)
    return proc, url


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> None:
    args = _parse()
    with tempfile.TemporaryDirectory() as folder:
        model = served_model(args, Path(folder))
        work = make_workload(args, model.prompt_vocab)
        load_before = os.getloadavg()[0]
        online = _online(args, model, work)
        # After the server stopped: the baseline and the ceilings get the device to themselves.
        offline, device = run_offline(args, model, work) if args.offline else ({}, _device(args.device))
    described = f"{args.shape} shape, random bf16 weights" if args.shape else args.model
    result = {"model": described,
              "server": args.url or "self-started run_server", "device": str(device),
              "workload": vars(args), "online": online, "offline_llm_generate": offline,
              "ceilings": ceilings(device, torch.bfloat16) if device.type == "cuda" else {},
              # a shared host's other work skews every figure; this says how busy it was
              "host_load_avg_1m": {"before": load_before, "after": os.getloadavg()[0], "cpus": os.cpu_count()}}
    if offline:
        result["ratio_online_to_offline_output_tok_s"] = online["output_tok_s"] / offline["output_tok_s"]
    path = write_result("serve_load" + (f"-{args.shape}" if args.shape else ""), device, result)
    _report(online, offline, path)


def _online(args: argparse.Namespace, model: ServedModel, work: Workload) -> dict:
    proc, url = (None, args.url) if args.url else start_server(args, model)
    pids = {} if proc is None else {"front": proc.pid, "engine_core": _core_pid(proc.pid)}
    try:
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        records, seconds = asyncio.run(run_online(args, url, model.name, work))
        cpu = {f"{name}_cpu_percent": 100 * (cpu_seconds(pid) - cpu_before[name]) / seconds
               for name, pid in pids.items()}
    finally:
        if proc is not None:
            stop_server(proc)
    return {**summarize(records, seconds), **cpu}


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of one process, all its threads (Linux /proc); 0 where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _core_pid(front_pid: int) -> int | None:
    """The server's engine-core process: its child started by multiprocessing spawn."""
    try:
        children = Path(f"/proc/{front_pid}/task/{front_pid}/children").read_text().split()
    except OSError:
        return None
    spawned = [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()
               and b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()]
    return int(spawned[0]) if spawned else None


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _report(online: dict, offline: dict, path: Path) -> None:
    print(f"online: {online['requests_s']:.2f} req/s, {online['output_tok_s']:.1f} output tok/s, "
          f"TTFT p50 {online.get('ttft_s_p50', 0) * 1e3:.0f} ms p99 {online.get('ttft_s_p99', 0) * 1e3:.0f} ms, "
          f"ITL p50 {online.get('itl_s_p50', 0) * 1e3:.1f} ms p99 {online.get('itl_s_p99', 0) * 1e3:.1f} ms, "
          f"errors {online['num_errors']}; CPU: front {online.get('front_cpu_percent', 0):.0f}%, "
          f"engine core {online.get('engine_core_cpu_percent', 0):.0f}%")
    if offline:
        print(f"offline LLM.generate: {offline['requests_s']:.2f} req/s, {offline['output_tok_s']:.1f} output tok/s")
    print(f"wrote {path}")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running server; default: start one here")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--shape", default=None,
                        help="a bench/shapes.py name: random bf16 weights, token-id prompts, no checkpoint")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--device", default="auto", help="for the self-started server and the offline baseline")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--min-prompt", type=int, default=16, help="words (tokens with --shape)")
    parser.add_argument("--max-prompt", type=int, default=96, help="words (tokens with --shape)")
    parser.add_argument("--min-output", type=int, default=16)
    parser.add_argument("--max-output", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-offline", dest="offline", action="store_false", help="skip the LLM.generate baseline")
    parser.add_argument("--server-timeout", type=float, default=600.0, help="seconds to wait for the server")
    return parser.parse_args()


if __name__ == "__main__":
    main()
