"""What LLM.generate / chat / embed take (prompts.py), the chat history's trimming, the start-up line, the version,
the CPU thread default, and errors that name what is wrong: all without a model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from cli_helpers import config_of

import scaleinfer
from scaleinfer.chat_session import ChatHistory, fit_history
from scaleinfer.config import EngineConfig, ModelConfig
from scaleinfer.errors import InvalidRequestError, ModelLoadError, UnsupportedArchitectureError
from scaleinfer.executor import cpu_threads
from scaleinfer.executor.cpu_threads import CpuCores, default_num_threads
from scaleinfer.executor.rank import with_num_threads
from scaleinfer.prompts import as_conversations, as_prompt_list
from scaleinfer.startup import StartupSummary
from scaleinfer.weights.source import resolve_model


def test_prompt_forms_mix_in_one_list():
    prompts = ["a b", [1, 2], {"prompt": "c"}, {"prompt_token_ids": (3, 4)}]
    assert as_prompt_list(prompts) == ["a b", [1, 2], "c", [3, 4]]
    assert as_prompt_list("one") == ["one"]
    assert as_prompt_list([5, 6]) == [[5, 6]]  # one prompt as token ids
    assert as_prompt_list({"prompt_token_ids": [7]}) == [[7]]


@pytest.mark.parametrize(("prompts", "fragment"), [
    ([], "prompts is empty"),
    ([{"prompt": 1}], "prompt 0: 'prompt' must be a string, got int 1"),
    (["ok", {}], "prompt 1 must hold one of 'prompt' or 'prompt_token_ids', got neither"),
    ([{"prompt": "a", "prompt_token_ids": [1]}], "must hold one of 'prompt' or 'prompt_token_ids'"),
    ([{"promt": "a"}], "prompt 0 has unknown keys ['promt']"),
    ([{"prompt": "a", "multi_modal_data": {}}], "prompt 0: multi_modal_data is not supported"),
    ([{"prompt_token_ids": []}], "'prompt_token_ids' must be a non-empty list of integers"),
    (["ok", 3.5], "prompt 1 must be a string, a list of token ids"),
    ([[1, True]], "prompt 0 must be a string"),
    (7, "prompts must be a prompt or a list of prompts, got int"),
])
def test_bad_prompts_are_named(prompts, fragment):
    with pytest.raises(InvalidRequestError) as info:
        as_prompt_list(prompts)
    assert fragment in str(info.value)


def test_content_parts_are_joined_as_the_server_joins_them():
    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "France's capital?"}]
    message = {"role": "user", "content": parts, "name": "x"}
    (conversation,) = as_conversations([message])
    assert conversation == [{"role": "user", "content": "What is France's capital?", "name": "x"}]
    assert message["content"] is parts  # the caller's message is not changed
    two = as_conversations([[{"role": "user", "content": "a"}], [{"role": "user", "content": None}]])
    assert [c[0]["content"] for c in two] == ["a", ""]


@pytest.mark.parametrize(("messages", "fragment"), [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "conversation 0 message 0 part 0: only text content parts are supported, got type 'image_url'"),
    ([{"role": "user", "content": [{"type": "text"}]}], "a text part needs a 'text' string"),
    ([{"content": "no role"}], "conversation 0 message 0 must be a dict with a 'role' string"),
    ([{"role": "user", "content": 5}], "content must be a string or a list of content parts, got int 5"),
    ([], "messages must be a non-empty list"),
])
def test_bad_messages_are_named(messages, fragment):
    with pytest.raises(InvalidRequestError) as info:
        as_conversations(messages)
    assert fragment in str(info.value)


def words(messages):
    """A stand-in chat template: one token per word, plus one per message."""
    return [0 for m in messages for _ in [None, *m["content"].split()]]


def test_history_past_the_budget_loses_its_oldest_turns_and_keeps_the_system_message():
    history = ChatHistory(system=[{"role": "system", "content": "be brief"}])
    for i in range(3):
        history.turns += [{"role": "user", "content": f"question {i} " * 3}, {"role": "assistant", "content": "ok"}]
    history.turns.append({"role": "user", "content": "last one"})
    prompt, num_dropped = fit_history(history, words, budget=18)
    assert num_dropped == 4 and len(prompt) <= 18
    assert history.messages[0]["role"] == "system" and history.turns[0]["content"].startswith("question 2")
    assert fit_history(history, words, budget=100)[1] == 0


def test_a_message_too_long_alone_is_refused():
    history = ChatHistory(turns=[{"role": "user", "content": "word " * 50}])
    with pytest.raises(InvalidRequestError, match="prompt of 51 tokens, more than the 10"):
        fit_history(history, words, budget=10)


def test_startup_line_names_model_architecture_device_dtype_kv_and_context():
    summary = StartupSummary(model="smollm2-135m", architecture="LlamaForCausalLM", device="cpu", dtype="float32",
                             max_model_len=8192, num_kv_tokens=23296, num_threads=1)
    assert summary.line() == (f"scaleinfer {scaleinfer.__version__}: smollm2-135m (LlamaForCausalLM) on cpu, float32, "
                              "KV cache 23,296 tokens, max_model_len 8,192, 1 CPU thread")
    sharded = StartupSummary(model="m", architecture="A", device="cuda:0", dtype="bfloat16", max_model_len=4096,
                             num_kv_tokens=None, tensor_parallel_size=2, pipeline_parallel_size=2, quantization="int8")
    assert sharded.line().endswith("cuda:0, bfloat16, no KV cache, max_model_len 4,096, tensor parallel 2, pipeline "
                                   "parallel 2, int8 weights")


def test_version_is_the_installed_metadata():
    import importlib.metadata

    assert scaleinfer.__version__ == importlib.metadata.version("scaleinfer")
    for command in (["-m", "scaleinfer", "--version"], ["-m", "scaleinfer.cli", "--version"]):
        result = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and result.stdout.strip() == f"scaleinfer {scaleinfer.__version__}"


def test_python_dash_m_scaleinfer_is_the_command():
    result = subprocess.run([sys.executable, "-m", "scaleinfer", "generate", "hi", "--temperature", "-1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "error: temperature must be >= 0" in result.stderr


@pytest.mark.parametrize(("cores", "world_size", "expected"), [
    (CpuCores(2, 0.0), 1, 2), (CpuCores(2, 1.0), 1, 1), (CpuCores(2, 2.6), 1, 1), (CpuCores(16, 3.4), 1, 13),
    (CpuCores(16, 0.2), 4, 4), (CpuCores(2, 0.0), 4, 1),
])
def test_default_threads_are_the_free_physical_cores_shared_by_the_ranks(cores, world_size, expected):
    assert default_num_threads(cores, world_size) == expected


def test_measured_cores_are_within_this_process_affinity():
    import os

    cores = cpu_threads.measure_cpu_cores()
    assert 1 <= cores.num_cores <= len(os.sched_getaffinity(0)) and cores.num_busy >= 0


def test_threads_given_stay_and_gpu_ranks_keep_torch_default(monkeypatch):
    monkeypatch.setattr(cpu_threads, "measure_cpu_cores", lambda: CpuCores(8, 2.0))
    monkeypatch.setattr("scaleinfer.executor.rank.measure_cpu_cores", lambda: CpuCores(8, 2.0))
    assert with_num_threads(ModelConfig(device="cpu", num_threads=3), 2).num_threads == 3
    assert with_num_threads(ModelConfig(device="cpu"), 2).num_threads == 3  # (8 - 2) // 2
    assert with_num_threads(ModelConfig(device="cuda"), 2).num_threads is None
    with pytest.raises(InvalidRequestError, match="num_threads must be an integer >= 1, got 0"):
        ModelConfig(num_threads=0)


def test_cgroup_quota_in_whole_cores(tmp_path, monkeypatch):
    for text, expected in (("max 100000", None), ("250000 100000", 2), ("50000 100000", 1)):
        (tmp_path / "cpu.max").write_text(text)
        monkeypatch.setattr(cpu_threads, "CGROUP_CPU_MAX", tmp_path / "cpu.max")
        assert cpu_threads._cgroup_quota() == expected


def test_offload_gpu_budget_without_offload_is_refused():
    with pytest.raises(InvalidRequestError, match="offload_gpu_budget=1024 is the device memory of streamed layers; "
                                                  "it needs offload='cpu' or 'nvme'"):
        EngineConfig.from_kwargs(offload_gpu_budget=1024)
    assert EngineConfig.from_kwargs(offload="cpu", offload_gpu_budget=1024).offload.offload_gpu_budget == 1024


def test_an_unsupported_architecture_is_named_with_the_supported_ones(tmp_path):
    bloom = {"architectures": ["BloomForCausalLM"], "model_type": "bloom", "n_embed": 64, "n_layer": 2,
             "num_attention_heads": 4, "vocab_size": 100}
    (tmp_path / "config.json").write_text(json.dumps(bloom))
    with pytest.raises(UnsupportedArchitectureError) as info:
        resolve_model(str(tmp_path), load_format="dummy")
    message = str(info.value)
    assert "architecture 'BloomForCausalLM' is not supported; supported: " in message
    assert "LlamaForCausalLM" in message and "BertModel" in message and "intermediate_size" not in message


@pytest.mark.parametrize(("model", "fragments"), [
    ("meta-llama/Llama-3.1-8B-Instruct", ["does not download from the Hugging Face hub",
                                          "huggingface-cli download meta-llama/Llama-3.1-8B-Instruct",
                                          "'smollm2-135m', 'all-minilm-l6-v2'"]),
    ("smollm2-135", ["model 'smollm2-135' is not an alias (did you mean 'smollm2-135m'?)", "'all-minilm-l6-v2'"]),
    ("tinyllama", ["model 'tinyllama' is not an alias", "the aliases are 'smollm2-135m', 'all-minilm-l6-v2'"]),
    ("/no/such/model.gguf", ["model path /no/such/model.gguf does not exist"]),
])
def test_a_missing_model_says_what_the_name_was_taken_for(model, fragments):
    with pytest.raises(ModelLoadError) as info:
        resolve_model(model)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"], ["serve"]])
def test_threads_flag_reaches_the_model_config(command, monkeypatch):
    assert config_of([*command, "--threads", "3"], monkeypatch).model.num_threads == 3
