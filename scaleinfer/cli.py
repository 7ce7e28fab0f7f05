"""The `scaleinfer` command: generate | chat | serve."""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from scaleinfer.config import (
    DTYPES,
    EMBEDDED_MODEL_ALIAS,
    KV_CACHE_DTYPES,
    KV_OFFLOAD_TARGETS,
    MOE_ALL_TO_ALL,
    OFFLOAD_TARGETS,
    PIPELINE_SCHEDULES,
    QUANTIZATIONS,
    EngineConfig,
    env_str,
)
from scaleinfer.errors import InvalidRequestError, ScaleInferError
from scaleinfer.sampling_params import SamplingParams
from scaleinfer.tokenizer import apply_chat_template
from scaleinfer.version import __version__


@dataclass(slots=True)
class StreamSummary:
    num_tokens: int
    ttft: float  # seconds to the first token
    seconds: float
    finish_reason: str | None
    text: str

    def line(self) -> str:
        decode = self.num_tokens - 1
        rate = decode / (self.seconds - self.ttft) if decode > 0 and self.seconds > self.ttft else 0.0
        return (f"[{self.num_tokens} tokens, time to first token {self.ttft:.2f} s, {rate:.1f} tok/s, "
                f"finish: {self.finish_reason}]")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except ScaleInferError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scaleinfer", description="Inference for transformer models.")
    parser.add_argument("--version", action="version", version=f"scaleinfer {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="complete one prompt, streaming tokens to the terminal")
    generate.add_argument("prompt")
    generate.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    _add_engine_args(generate)
    _add_sampling_args(generate)
    generate.set_defaults(run=_run_generate)
    chat = commands.add_parser("chat", help="interactive chat with the model's chat template")
    chat.add_argument("--system", default=None, help="a system message")
    _add_engine_args(chat)
    _add_sampling_args(chat)
    chat.set_defaults(run=_run_chat)
    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server")
    _add_engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="required bearer token (or SCALEINFER_API_KEY)")
    serve.add_argument("--task", default="generate", choices=("generate", "embed"),
                       help="generate: a decoder, /v1/completions and /v1/chat/completions; embed: an encoder "
                            "(e.g. --model all-minilm-l6-v2), /v1/embeddings")
    serve.add_argument("--served-model-name", default=None,
                       help="the model name /v1/models lists and requests must name (default: --model)")
    serve.add_argument("--max-waiting", type=int, default=None,
                       help="bound on queued sequences (n per prompt, at least 1); past it, 503 with Retry-After "
                       "(default: from the KV capacity, at least 4 x --max-num-seqs)")
    serve.add_argument("--shutdown-timeout", type=_non_negative_float, default=10.0,
                       help="seconds in-flight requests get to finish after SIGTERM or SIGINT; then they are aborted")
    serve.add_argument("--tool-call-parser", default=None, choices=("hermes", "llama3_json", "mistral"),
                       help="how tool calls are read from the output (tool_choice auto); default: the format the "
                            "chat template writes, if it names one")
    serve.add_argument("--enable-auto-tool-choice", action="store_true",
                       help="refuse to start unless a tool-call format is given or found in the chat template "
                            "(vLLM's flag; tool_choice auto works whenever a format is known)")
    serve.set_defaults(run=_run_serve)
    return parser


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=EMBEDDED_MODEL_ALIAS,
                        help="HF-style folder, .gguf file, or the alias smollm2-135m (the default)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per process (default: on a CPU, the physical cores other processes leave "
                             "free, shared among the tensor-parallel ranks)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--quantization", default="auto", choices=["auto", "none", *(q for q in QUANTIZATIONS if q)],
                        help="quantize the linear layers' weights as they load (int8: per-output-channel, int4: "
                             "groups of 128, weight-only; embeddings, LM head and MoE experts stay in --dtype); gguf: "
                             "keep a .gguf file's Q4_0/Q4_1/Q4_K linears as int4 (Q8_0 as int8 on a GPU; other types "
                             "dequantized, per linear) and its embedding / LM head as int8; "
                             "auto (default): gguf for a .gguf model on the CPU in one process, else none (as stored)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="split every layer over T processes (one per GPU; on a CPU, T processes over gloo)")
    parser.add_argument("--pipeline-parallel-size", type=int, default=1,
                        help="split the layers into P stages of T processes each (T x P in all); micro-batches "
                             "keep every stage busy")
    parser.add_argument("--pipeline-schedule", default="hybrid", choices=PIPELINE_SCHEDULES,
                        help="with P > 1: hybrid (P micro-batches of decodes, 2P smaller ones while prompts "
                             "prefill) or fixed (--pipeline-micro-batches, default P, always)")
    parser.add_argument("--pipeline-micro-batches", type=int, default=None,
                        help="with --pipeline-schedule fixed: micro-batches in flight (default P)")
    parser.add_argument("--expert-parallel-size", type=int, default=1,
                        help="MoE models: split the experts over E groups of the T ranks, each expert sliced over "
                             "T / E of them (E must divide T and the number of experts)")
    parser.add_argument("--moe-all-to-all", default="coordinated", choices=MOE_ALL_TO_ALL,
                        help="with E > 1: coordinated (each rank sends its 1/T share of the tokens, an all-gather "
                             "inside its slice group restores the rest) or plain (each expert group's tokens sent "
                             "by all its ranks)")
    parser.add_argument("--offload", default="none", choices=OFFLOAD_TARGETS,
                        help="keep layer weights in CPU memory or NVMe files and stream them (ZeRO-Inference)")
    parser.add_argument("--offload-path", default=None, help="with --offload nvme: the folder for the layer files")
    parser.add_argument("--offload-gpu-budget", type=_bytes, default=None,
                        help="device memory for streamed layers, e.g. 8GiB (default: two layers)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="token budget of one step (default 2048, with --offload 32768): running decodes "
                             "first, then prompts chunked to fit; smaller keeps decodes moving while long prompts "
                             "prefill")
    parser.add_argument("--max-mixed-prefill-tokens", type=int, default=None,
                        help="prompt tokens a step may carry while any sequence decodes (default 1024, with "
                             "--offload the whole budget; at most --max-num-batched-tokens): bounds the time "
                             "between a stream's tokens while prompts prefill; with none decoding, prompts get the "
                             "whole budget")
    parser.add_argument("--max-num-seqs", type=int, default=None,
                        help="sequences in one step (default 256, with --offload 1024)")
    _add_vllm_engine_args(parser)


def _add_vllm_engine_args(parser: argparse.ArgumentParser) -> None:
    """The options vLLM users reach for, under vLLM's names."""
    parser.add_argument("--tokenizer", default=None, help="a folder (or .gguf file) to load the tokenizer from "
                                                          "instead of the model's")
    parser.add_argument("--chat-template", default=None,
                        help="a file holding a Jinja chat template, or the template itself; replaces the tokenizer's")
    parser.add_argument("--enforce-eager", action="store_true", help="GPU: run decode steps without CUDA graphs")
    parser.add_argument("--kv-cache-memory", type=_bytes, default=None,
                        help="bytes for the KV cache, e.g. 20GiB (default: --gpu-memory-utilization of free memory)")
    parser.add_argument("--kv-offload", default="none", choices=KV_OFFLOAD_TARGETS,
                        help="cpu: a second tier of KV blocks in host memory (--kv-offload-memory): preempted "
                             "sequences swap out and back instead of recomputing, where that is cheaper, and blocks "
                             "the prefix cache evicts wait there for a hit")
    parser.add_argument("--kv-offload-memory", type=_bytes, default=None,
                        help="with --kv-offload cpu: bytes of host memory for KV blocks per process, e.g. 16GiB "
                             "(page-locked on a GPU)")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                        help="auto: the KV cache in --dtype; fp8 (= fp8_e4m3): e4m3 pages with a scale per layer "
                             "(the checkpoint's k_scale / v_scale, else 1.0), twice the tokens of bf16")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="fraction in (0, 1] (default 0.9) of the device memory still free once the weights are "
                             "loaded that the KV cache takes, less a 2 GiB activation reserve (on a CPU: of the "
                             "available RAM, at most 1 GiB). Unlike vLLM's, which bounds all the memory the instance "
                             "uses on the whole GPU, weights included: the same value gives a larger cache here")


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)


def _quantization(args: argparse.Namespace) -> str | None:
    """auto: a .gguf model (the embedded one included) run on the CPU by one process keeps its Q4 weights (the
    fast CPU path: ~65 vs ~20 tok/s for SmolLM2 on 2 cores); elsewhere the GPU kernels and the streamed and
    sharded layouts of kept weights are not yet measured, so it loads as stored."""
    if args.quantization != "auto":
        return None if args.quantization == "none" else args.quantization
    gguf = args.model == EMBEDDED_MODEL_ALIAS or args.model.endswith(".gguf")
    alone = args.tensor_parallel_size == 1 and args.pipeline_parallel_size == 1 and args.offload == "none"
    return "gguf" if gguf and alone and _on_cpu(args.device) else None


def _on_cpu(device: str) -> bool:
    if device != "auto":
        return device == "cpu"
    import torch

    return not torch.cuda.is_available()


def _engine_config(args: argparse.Namespace, **scheduler: int | None) -> EngineConfig:
    # Unset budget flags leave the config's defaults, which depend on --offload.
    budget = {name: getattr(args, name) for name in ("max_num_batched_tokens", "max_mixed_prefill_tokens",
                                                     "max_num_seqs")
              if getattr(args, name) is not None}
    return EngineConfig.from_kwargs(
        model=args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
        num_threads=args.threads,
        quantization=_quantization(args), offload=args.offload, offload_path=args.offload_path,
        offload_gpu_budget=args.offload_gpu_budget,
        pipeline_parallel_size=args.pipeline_parallel_size, pipeline_schedule=args.pipeline_schedule,
        pipeline_micro_batches=args.pipeline_micro_batches,
        tensor_parallel_size=args.tensor_parallel_size, expert_parallel_size=args.expert_parallel_size,
        moe_all_to_all=args.moe_all_to_all, tokenizer=args.tokenizer, chat_template=args.chat_template,
        enforce_eager=args.enforce_eager, kv_cache_memory=args.kv_cache_memory, **_memory_fraction(args), **budget,
        kv_cache_dtype=args.kv_cache_dtype, kv_offload=args.kv_offload, kv_offload_memory=args.kv_offload_memory,
        **scheduler,
    )


def _memory_fraction(args: argparse.Namespace) -> dict[str, float]:
    """--gpu-memory-utilization as CacheConfig.memory_fraction; unset, the config's default."""
    return {} if args.gpu_memory_utilization is None else {"memory_fraction": args.gpu_memory_utilization}


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed)


def _load_engine(args: argparse.Namespace):
    from scaleinfer.engine.llm_engine import LLMEngine
    from scaleinfer.startup import engine_summary, print_startup

    engine = LLMEngine(_engine_config(args))
    print_startup(engine_summary(engine))
    return engine


def _run_generate(args: argparse.Namespace) -> int:
    params = _sampling_params(args)  # validated before the model loads
    if not args.prompt:
        raise InvalidRequestError("prompt is empty")
    engine = _load_engine(args)
    prompt = args.prompt
    if args.chat:
        prompt = apply_chat_template(engine.tokenizer, [{"role": "user", "content": args.prompt}])
    else:
        sys.stdout.write(args.prompt)
    summary = stream(engine, prompt, params, sys.stdout)
    print(f"\n{summary.line()}", file=sys.stderr)
    return 0


def _run_chat(args: argparse.Namespace) -> int:
    from scaleinfer.chat_session import run_chat

    params = _sampling_params(args)
    run_chat(_load_engine(args), params, args.system)
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from scaleinfer.server.app import run_server

    api_key = args.api_key or env_str("SCALEINFER_API_KEY")
    run_server(_engine_config(args, max_waiting=args.max_waiting), args.host, args.port, api_key,
               shutdown_timeout_s=args.shutdown_timeout, served_model_name=args.served_model_name, task=args.task,
               tool_call_parser=args.tool_call_parser, enable_auto_tool_choice=args.enable_auto_tool_choice)
    return 0


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmg]i?)?b?", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def _bytes(text: str) -> int:
    """A byte count: 123, 500MB, 8GiB (decimal K/M/G, binary KiB/MiB/GiB)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"must be a byte count such as 8GiB or 500MB, got {text!r}")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "").lower()])


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def stream(engine, prompt: str | list[int], params: SamplingParams, out: TextIO,
           should_stop: Callable[[], bool] = lambda: False) -> StreamSummary:
    """Run one request alone on the engine, writing text to `out` as it is generated; should_stop() true between
    two steps aborts it (finish reason "abort")."""
    start = time.perf_counter()
    engine.add_request("cli", prompt, params)
    printed, ttft, output = 0, None, None
    while engine.has_unfinished_requests():
        if should_stop():
            engine.abort_request(["cli"])
            return _summary(output, ttft, time.perf_counter() - start, "abort")
        for request_output in engine.step():
            output = request_output.outputs[0]
            ttft = ttft if ttft is not None else time.perf_counter() - start
            out.write(output.text[printed:])
            out.flush()
            printed = len(output.text)
    return _summary(output, ttft, time.perf_counter() - start, output.finish_reason)


def _summary(output, ttft: float | None, seconds: float, finish_reason: str | None) -> StreamSummary:
    if output is None:  # stopped before the first token
        return StreamSummary(0, 0.0, seconds, finish_reason, "")
    return StreamSummary(len(output.token_ids), ttft or 0.0, seconds, finish_reason, output.text)


if __name__ == "__main__":
    sys.exit(main())
