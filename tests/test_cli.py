"""The `scaleinfer` command end to end on the embedded model, in a subprocess as a user runs it."""

import subprocess
import sys

import pytest
from cli_helpers import config_of, started_by


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scaleinfer.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=600)


def test_generate_names_paris():
    result = run_cli("generate", "The capital of France is", "--temperature", "0", "--max-tokens", "12",
                     "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The capital of France is")
    assert "Paris" in result.stdout
    assert "tokens, time to first token" in result.stderr and "tok/s" in result.stderr


def test_chat_session_answers_skips_an_empty_line_and_ends_at_eof():
    result = run_cli("chat", "--temperature", "0", "--max-tokens", "16", "--device", "cpu",
                     stdin="What is the capital of France?\n\n")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_generate_with_layers_streamed_from_nvme(tmp_path):
    result = run_cli("generate", "The capital of France is", "--max-tokens", "12", "--device", "cpu",
                     "--offload", "nvme", "--offload-path", str(tmp_path), "--offload-gpu-budget", "64MiB")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert list(tmp_path.iterdir()) == []  # the layer files went away with the process


@pytest.mark.parametrize("args,fragment", [
    (["generate", "hi", "--offload", "nvme"], "offload='nvme' needs offload_path"),
    (["generate", "hi", "--device", "cpu", "--offload", "cpu", "--offload-gpu-budget", "1KiB"],
     "offload_gpu_budget=1024 bytes holds no layer"),
    (["generate", "hi", "--model", "/no/such/model"], "/no/such/model"),
    (["generate", "hi", "--temperature", "-1"], "temperature must be >= 0, got -1.0"),
    (["generate", "hi", "--top-p", "0"], "top_p must be in (0, 1], got 0.0"),
    (["generate", "hi", "--max-tokens", "0"], "max_tokens must be an integer >= 1, got 0"),
    (["generate", "", "--device", "cpu"], "prompt is empty"),
    (["generate", "hi", "--max-num-batched-tokens", "0"], "max_num_batched_tokens must be positive, got 0"),
    (["generate", "hi", "--max-mixed-prefill-tokens", "0"], "max_mixed_prefill_tokens must be an integer >= 1, got 0"),
])
def test_bad_input_is_one_line_and_nonzero(args, fragment):
    result = run_cli(*args)
    assert result.returncode == 1
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and sum(line.startswith("error") for line in lines) == 1


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"], ["serve"]])
def test_step_budget_flags_reach_the_scheduler_config(command, monkeypatch):
    config = config_of([*command, "--max-num-batched-tokens", "64", "--max-num-seqs", "8",
                        "--max-mixed-prefill-tokens", "16"], monkeypatch)
    scheduler = config.scheduler
    assert (scheduler.max_num_batched_tokens, scheduler.max_num_seqs, scheduler.max_mixed_prefill_tokens) == (64, 8, 16)
    assert config_of([*command], monkeypatch).scheduler.max_mixed_prefill_tokens == 512


@pytest.mark.parametrize("command", [["generate", "hi"], ["serve"]])
def test_vllm_named_flags_reach_the_config(command, monkeypatch, tmp_path):
    extra = ["--served-model-name", "my-model"] if command == ["serve"] else []
    config, kwargs = started_by([*command, "--tokenizer", str(tmp_path), "--chat-template", "{{ messages }}",
                                 "--enforce-eager", "--kv-cache-memory", "3GiB", "--gpu-memory-utilization", "0.5",
                                 *extra], monkeypatch)
    assert (config.model.tokenizer, config.model.chat_template, config.model.enforce_eager) == (
        str(tmp_path), "{{ messages }}", True)
    assert (config.cache.kv_cache_memory, config.cache.memory_fraction) == (3 * 2**30, 0.5)
    if command == ["serve"]:
        assert kwargs["served_model_name"] == "my-model"


@pytest.mark.parametrize(("flags", "task"), [([], "generate"), (["--task", "embed"], "embed")])
def test_serve_task_reaches_run_server(flags, task, monkeypatch):
    config, kwargs = started_by(["serve", "--model", "all-minilm-l6-v2", *flags], monkeypatch)
    assert config.model.model == "all-minilm-l6-v2" and kwargs["task"] == task


def test_serve_task_is_generate_or_embed(capsys):
    from scaleinfer import cli

    with pytest.raises(SystemExit):
        cli.main(["serve", "--task", "classify"])
    assert "invalid choice: 'classify'" in capsys.readouterr().err


def test_gpu_memory_utilization_out_of_range_is_one_line():
    result = run_cli("generate", "hi", "--gpu-memory-utilization", "1.5")
    assert result.returncode == 1 and "memory_fraction must be in (0, 1], got 1.5" in result.stderr


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"], ["serve"]])
def test_quantization_flag_reaches_the_model_config(command, monkeypatch):
    from scaleinfer import cli

    for choice in ("int8", "int4", "gguf"):
        assert config_of([*command, "--quantization", choice], monkeypatch).model.quantization == choice
    with pytest.raises(SystemExit):  # argparse: "invalid choice: 'int3'"
        cli.main([*command, "--quantization", "int3"])
    # auto (the default): the embedded GGUF on the CPU in one process keeps its Q4 weights; none, TP or offload not
    for flags, expected in (([], "gguf"), (["--quantization", "none"], None), (["--tensor-parallel-size", "2"], None),
                            (["--offload", "cpu"], None), (["--model", "folder"], None)):
        assert config_of([*command, "--device", "cpu", *flags], monkeypatch).model.quantization == expected, flags
