"""Serving under load: N concurrent openai clients streaming from an OpenAI-compatible server, and, as the
baseline of the same run, LLM.generate on the same requests offline (after the server stopped, so both
have the device to themselves).

Requests are seeded prompts with fixed output lengths (eos ignored), so every run and both paths do the
same work: random-word sentences for a real checkpoint, random token ids for a --shape (random weights,
no tokenizer, no checkpoint). Reported: requests/s, output tok/s, time to first token and inter-token
latency at p50/p99, end-to-end latency, errors; the CPU use of the server's front process (HTTP, tokenizer,
detokenization), of its engine-core process and of the clients themselves while serving; the server's
/metrics sampled over the run (serve_metrics.py: batch size, steps/s, tokens per step, the core's idle time
between steps, the front's delivery lag); with --profile, py-spy's top functions of front and core
(serve_profile.py); on a GPU the card's ceilings. A chunk may carry several tokens (a stream's outputs
coalesce while its reader is away), so tokens are counted from the chunks' text via usage, and inter-token
latency is per chunk.

Two offline baselines, and what the ratios to them mean:
  - offline_llm_generate: LLM.generate with every request queued at once and the server's max_num_seqs.
    It runs batches online can never reach when --concurrency is below max_num_seqs (at most `concurrency`
    requests are in flight), so online/offline there mixes the serving overhead with a batch-size effect.
  - offline_at_concurrency: the same with max_num_seqs = concurrency, the batch online has at best; each
    finished request's slot is refilled at the very next step. online/this is the serving overhead alone
    (HTTP, tokenization, IPC, the front, the arrival of the next request after a client's last finished).
The ITL ratio compares online's inter-chunk p50 with offline's time per output token (each request's first
token to last, over its later tokens); offline's TTFT is its queueing (every request arrives at the start).

    python bench/serve_load.py                                   # starts run_server on the embedded model
    python bench/serve_load.py --shape llama3-8b --concurrency 64    # a GPU: random bf16 weights, token ids
    python bench/serve_load.py --url http://127.0.0.1:8000 --model smollm2-135m --concurrency 64
    python bench/serve_load.py --shape llama3-8b --concurrency 128 --client-procs 4 --profile /tmp/prof
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ceilings, write_result  # noqa: E402
from serve_fake_core import STEP_MS_ENV  # noqa: E402
from serve_metrics import MetricsSampler, summarize_samples  # noqa: E402
from serve_profile import Profiler  # noqa: E402

WARMUP_TOKENS = 4  # output tokens of each warm-up request: its prefill, then batched decode steps
SERVER = """
import sys
sys.path.insert(0, {bench!r})
from scaleinfer.config import EngineConfig, ModelConfig, SchedulerConfig
from scaleinfer.server.app import run_server
from serve_fake_core import SleepCore
config = EngineConfig(model=ModelConfig(**{model_kwargs!r}), scheduler=SchedulerConfig(**{scheduler_kwargs!r}))
run_server(config, "127.0.0.1", {port}, None, log_level="warning", core_class={core_class})
"""


# One event loop of openai clients parses about 2,000 chunks/s on a 2-core CPU (81% busy at 1,780 in the fake-step
# run): a process per 32 streams keeps a GPU server's 30+ steps/s x 32 chunks each below that.
CLIENTS_PER_PROC, MAX_CLIENT_PROCS = 32, 8

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


async def warm_up(args: argparse.Namespace, url: str, model: str, work: Workload) -> None:
    """The first --warmup-requests prompts at once, WARMUP_TOKENS each: the server's first batched prefills and
    decodes (its Triton kernels compiled at first use) happen before the clock starts, as offline's do."""
    async with _client(args, url) as client:
        await asyncio.gather(*(one_request(client, model, prompt, WARMUP_TOKENS)
                               for prompt in work.prompts[:max(1, args.warmup_requests)]))


@dataclass(slots=True)
class ClientRun:
    records: list[RequestRecord]
    start: float  # time.perf_counter(): CLOCK_MONOTONIC, one clock for every process of the host
    end: float
    cpu_s: float  # CPU seconds of the process that ran these clients, while they ran


async def run_online(args: argparse.Namespace, url: str, model: str, prompts: list, output_lens: list[int],
                     concurrency: int) -> ClientRun:
    """These requests through `concurrency` clients at a time, on one event loop."""
    limit = asyncio.Semaphore(concurrency)
    async with _client(args, url) as client:

        async def limited(prompt: str | list[int], max_tokens: int) -> RequestRecord:
            async with limit:
                return await one_request(client, model, prompt, max_tokens)

        start, cpu_start = time.perf_counter(), time.process_time()
        records = await asyncio.gather(*(limited(p, n) for p, n in zip(prompts, output_lens)))
        return ClientRun(list(records), start, time.perf_counter(), time.process_time() - cpu_start)


def run_clients(args: argparse.Namespace, url: str, model: str, work: Workload,
                on_start: Callable[[], None]) -> list[ClientRun]:
    """The load from --client-procs processes: request i from process i % P, the concurrency split among them.
    One event loop parsing every stream of a fast server saturates its core (openai's SSE parsing and pydantic
    per chunk): then the load generator, not the server, sets the pace, and chunks queue in its sockets.
    on_start: called as the clients start (after the processes came up)."""
    num_procs = min(args.client_procs or _default_client_procs(args.concurrency), args.concurrency)
    if num_procs == 1:
        on_start()
        return [asyncio.run(run_online(args, url, model, work.prompts, work.output_lens, args.concurrency))]
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(num_procs + 1), context.Queue()
    shares = [args.concurrency // num_procs + (k < args.concurrency % num_procs) for k in range(num_procs)]
    procs = [context.Process(target=_client_process, args=(
        args, url, model, work.prompts[k::num_procs], work.output_lens[k::num_procs], share, barrier, results))
        for k, share in enumerate(shares)]
    for proc in procs:
        proc.start()
    barrier.wait(timeout=300)  # every process is up: they start together
    on_start()
    runs = [results.get(timeout=3600) for _ in procs]
    for proc in procs:
        proc.join(30)
    return runs


def _default_client_procs(concurrency: int) -> int:
    return max(1, min(MAX_CLIENT_PROCS, concurrency // CLIENTS_PER_PROC))


def _client_process(args: argparse.Namespace, url: str, model: str, prompts: list, output_lens: list[int],
                    concurrency: int, barrier: Any, results: Any) -> None:
    asyncio.run(_first_request(args, url, model, prompts[0]))  # this process's openai and httpx set up off the clock
    barrier.wait(timeout=300)
    results.put(asyncio.run(run_online(args, url, model, prompts, output_lens, concurrency)))


async def _first_request(args: argparse.Namespace, url: str, model: str, prompt: str | list[int]) -> None:
    async with _client(args, url) as client:
        await one_request(client, model, prompt, WARMUP_TOKENS)


def _client(args: argparse.Namespace, url: str) -> openai.AsyncOpenAI:
    # A kept-alive connection per concurrent stream: past openai's default 100, each new request would connect.
    limits_type = type(openai._constants.DEFAULT_CONNECTION_LIMITS)  # httpx's or httpx2's, as openai uses
    size = args.concurrency + 8
    limits = limits_type(max_connections=size, max_keepalive_connections=size)
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=args.api_key or "none", max_retries=0, timeout=600,
                              http_client=openai.DefaultAsyncHttpxClient(limits=limits))


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


def scheduler_kwargs(args: argparse.Namespace, max_num_seqs: int) -> dict[str, int]:
    """The scheduler's options for the server and the offline baseline alike."""
    kwargs = {"max_num_seqs": max_num_seqs}
    if args.max_mixed_prefill_tokens is not None:
        kwargs["max_mixed_prefill_tokens"] = args.max_mixed_prefill_tokens
    return kwargs


def run_offline(args: argparse.Namespace, model: ServedModel, work: Workload,
                max_num_seqs: int) -> tuple[dict[str, float], torch.device]:
    """LLM.generate on every request at once, at most max_num_seqs running. Besides throughput: its time per
    output token (each request's first token to its last, over its tokens after the first) and its TTFT,
    which here is queueing: every request arrives at the start."""
    from scaleinfer import LLM, SamplingParams

    llm = LLM(**model.kwargs, **scheduler_kwargs(args, max_num_seqs), progress=False)
    warm = SamplingParams(temperature=0, max_tokens=WARMUP_TOKENS, ignore_eos=True)
    llm.generate(work.prompts[:max(1, args.warmup_requests)], warm, use_tqdm=False)  # as the server's warm_up
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in work.output_lens]
    start = time.perf_counter()
    outputs = llm.generate(work.prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    metrics = [(o.metrics, len(o.outputs[0].token_ids)) for o in outputs if o.metrics and o.metrics.first_token_time]
    tpots = [(m.finished_time - m.first_token_time) / (n - 1) for m, n in metrics if n > 1 and m.finished_time]
    ttfts = [m.first_token_time - m.arrival_time for m, _ in metrics]
    device = llm.engine.runner.device
    del llm, outputs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the ceilings measured next need the memory
    result = {"max_num_seqs": max_num_seqs, "seconds": seconds, "requests_s": len(work.prompts) / seconds,
              "output_tok_s": num_tokens / seconds, **_percentiles("tpot_s", tpots), **_percentiles("ttft_s", ttfts)}
    return result, device


def start_server(args: argparse.Namespace, model: ServedModel) -> tuple[subprocess.Popen, str]:
    port = free_port()
    code = SERVER.format(bench=str(Path(__file__).resolve().parent), model_kwargs=model.kwargs,
                         scheduler_kwargs=scheduler_kwargs(args, args.max_num_seqs), port=port,
                         core_class="SleepCore" if args.fake_step_ms else "None")
    env = {**os.environ, STEP_MS_ENV: str(args.fake_step_ms)} if args.fake_step_ms else None
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
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
        # After the server stopped: the baselines and the ceilings get the device to themselves.
        run_baseline = args.offline and not args.fake_step_ms
        offline, device = _offline(args, model, work) if run_baseline else ({}, _device(args.device))
    described = f"{args.shape} shape, random bf16 weights" if args.shape else args.model
    result = {"model": described,
              "server": args.url or "self-started run_server", "device": str(device),
              "workload": vars(args), "online": online, **offline,
              "ceilings": ceilings(device, torch.bfloat16) if device.type == "cuda" else {},
              # a shared host's other work skews every figure; this says how busy it was
              "host_load_avg_1m": {"before": load_before, "after": os.getloadavg()[0], "cpus": os.cpu_count()},
              **_ratios(online, offline), **_fake_ceiling(args, online)}
    path = write_result("serve_load" + (f"-{args.shape}" if args.shape else ""), device, result)
    _report(result, path)


def _offline(args: argparse.Namespace, model: ServedModel,
             work: Workload) -> tuple[dict[str, dict[str, float]], torch.device]:
    """offline_llm_generate: at the server's max_num_seqs, every request queued at once (a batch the online
    clients may never reach: at most `concurrency` of their requests are in flight). offline_at_concurrency:
    at max_num_seqs = concurrency, what online could reach at best (a finished request's slot refilled in the
    next step, with no HTTP, tokenizer or IPC between); run only when it differs."""
    offline, device = run_offline(args, model, work, args.max_num_seqs)
    result = {"offline_llm_generate": offline}
    if args.concurrency < args.max_num_seqs:
        result["offline_at_concurrency"], _ = run_offline(args, model, work, args.concurrency)
    return result, device


def _ratios(online: dict, offline: dict[str, dict[str, float]]) -> dict[str, float]:
    """Online over the offline baselines: output tok/s, and its ITL p50 over the offline time per output token."""
    ratios = {}
    for key, suffix in (("offline_llm_generate", ""), ("offline_at_concurrency", "_at_concurrency")):
        base = offline.get(key)
        if base is None:
            continue
        ratios[f"ratio_online_to_offline{suffix}_output_tok_s"] = online["output_tok_s"] / base["output_tok_s"]
        if base.get("tpot_s_p50") and "itl_s_p50" in online:
            ratios[f"ratio_online_itl_p50_to_offline{suffix}_tpot_p50"] = online["itl_s_p50"] / base["tpot_s_p50"]
    return ratios


def _fake_ceiling(args: argparse.Namespace, online: dict) -> dict[str, float]:
    """With a sleeping model: the output tok/s of the mean batch the server ran, had every step lasted exactly
    --fake-step-ms (no loop, IPC or front cost), and online's share of it."""
    metrics = online.get("server_metrics", {})
    if not args.fake_step_ms or "generation_tokens_per_step" not in metrics:
        return {}
    ceiling = metrics["generation_tokens_per_step"] * 1000 / args.fake_step_ms
    return {"fake_step_ceiling_output_tok_s": ceiling,
            "ratio_online_to_fake_step_ceiling": online["output_tok_s"] / ceiling}


def _online(args: argparse.Namespace, model: ServedModel, work: Workload) -> dict:
    proc, url = (None, args.url) if args.url else start_server(args, model)
    pids = {} if proc is None else {"front": proc.pid, "engine_core": _core_pid(proc.pid)}
    try:
        asyncio.run(warm_up(args, url, model.name, work))
        sampler, profiler = MetricsSampler(url, args.metrics_interval), Profiler(args.profile, pids)
        cpu_before: dict[str, float] = {}

        def on_start() -> None:
            sampler.start()
            profiler.start()
            cpu_before.update({name: cpu_seconds(pid) for name, pid in pids.items()})

        runs = run_clients(args, url, model.name, work, on_start)
        server_metrics = summarize_samples(sampler.stop())
        seconds = max(run.end for run in runs) - min(run.start for run in runs)
        cpu = {f"{name}_cpu_percent": 100 * (cpu_seconds(pid) - cpu_before[name]) / seconds
               for name, pid in pids.items()}
        profile = profiler.stop()
    finally:
        if proc is not None:
            stop_server(proc)
    # The clients' own CPU: one event loop parsing every stream; near 100% the load generator is the bottleneck.
    records = [record for run in runs for record in run.records]
    return {**summarize(records, seconds), **cpu, "client_procs": len(runs),
            "client_cpu_percent": 100 * sum(run.cpu_s for run in runs) / seconds,
            "client_cpu_percent_max_proc": 100 * max(run.cpu_s / (run.end - run.start) for run in runs),
            "server_metrics": server_metrics, **({"profile": profile} if profile else {})}


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


def _report(result: dict, path: Path) -> None:
    online, metrics = result["online"], result["online"].get("server_metrics", {})
    print(f"online: {online['requests_s']:.2f} req/s, {online['output_tok_s']:.1f} output tok/s, "
          f"TTFT p50 {online.get('ttft_s_p50', 0) * 1e3:.0f} ms p99 {online.get('ttft_s_p99', 0) * 1e3:.0f} ms, "
          f"ITL p50 {online.get('itl_s_p50', 0) * 1e3:.1f} ms p99 {online.get('itl_s_p99', 0) * 1e3:.1f} ms, "
          f"errors {online['num_errors']}; CPU: front {online.get('front_cpu_percent', 0):.0f}%, "
          f"engine core {online.get('engine_core_cpu_percent', 0):.0f}%, clients {online['client_cpu_percent']:.0f}% "
          f"(busiest of {online['client_procs']} processes {online['client_cpu_percent_max_proc']:.0f}%)")
    if "steps_per_s" in metrics:
        print(f"server: {metrics['steps_per_s']:.1f} steps/s, {metrics['tokens_per_step']:.1f} tokens/step, "
              f"running {metrics['running_mean']:.1f} (max {metrics['running_max']:.0f}), waiting "
              f"{metrics['waiting_mean']:.1f}, core busy {100 * metrics['core_busy_fraction']:.0f}%, idle "
              f"{metrics['core_idle_s_per_step'] * 1e3:.1f} ms/step")
    for key in ("offline_llm_generate", "offline_at_concurrency"):
        if key in result:
            base = result[key]
            print(f"{key} (max_num_seqs {base['max_num_seqs']}): {base['requests_s']:.2f} req/s, "
                  f"{base['output_tok_s']:.1f} output tok/s, TPOT p50 {base.get('tpot_s_p50', 0) * 1e3:.1f} ms, "
                  f"TTFT p50 {base.get('ttft_s_p50', 0) * 1e3:.0f} ms p99 {base.get('ttft_s_p99', 0) * 1e3:.0f} ms")
    for key, value in result.items():
        if key.startswith("ratio_"):
            print(f"{key}: {value:.3f}")
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
    parser.add_argument("--max-mixed-prefill-tokens", type=int, default=None,
                        help="prompt tokens a step beside decodes may carry (default: the engine's)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--min-prompt", type=int, default=16, help="words (tokens with --shape)")
    parser.add_argument("--max-prompt", type=int, default=96, help="words (tokens with --shape)")
    parser.add_argument("--min-output", type=int, default=16)
    parser.add_argument("--max-output", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-requests", type=int, default=None,
                        help="requests (the workload's first prompts, a few tokens each) run at once before either "
                             "clock starts, online and offline alike; default: the concurrency")
    parser.add_argument("--no-offline", dest="offline", action="store_false", help="skip the LLM.generate baseline")
    parser.add_argument("--server-timeout", type=float, default=600.0, help="seconds to wait for the server")
    parser.add_argument("--client-procs", type=int, default=None,
                        help="processes the clients run in, each its own event loop (default: one per "
                             f"{CLIENTS_PER_PROC} concurrent clients, at most {MAX_CLIENT_PROCS}); see "
                             "client_cpu_percent")
    parser.add_argument("--fake-step-ms", type=float, default=None,
                        help="the server's model is a sleep of this many ms per step (serve_fake_core.py): the "
                             "serving path alone under a GPU's step rate; no offline baseline")
    parser.add_argument("--metrics-interval", type=float, default=0.5, help="seconds between /metrics scrapes")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="sample the front and the engine core with py-spy while the load runs; raw stacks "
                             "go to DIR, their top functions into the result")
    args = parser.parse_args()
    if args.warmup_requests is None:
        args.warmup_requests = args.concurrency
    return args


if __name__ == "__main__":
    main()
