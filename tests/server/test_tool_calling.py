"""Tool calling through the official openai client: a scripted engine whose output is a call (Hermes,
Llama 3.1 JSON and Mistral formats; non-streamed and streamed, then the round trip back with the call and
its result in the history), and the embedded model under the Hermes-style template the tests ship."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
from cli_helpers import started_by
from fake_engine import ByteTokenizer, FakeEngine
from server_utils import ThreadedServer

from scaleinfer.engine.async_engine import AsyncLLMEngine
from scaleinfer.errors import InvalidRequestError
from scaleinfer.server.app import build_app

TEMPLATES = Path(__file__).parent / "templates"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                   "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
ARGS = {"city": "Paris", "unit": "c"}
USER = [{"role": "user", "content": "Weather in Paris, and the time?"}]
SCRIPTS = {  # (the model's text, the content around its calls)
    "hermes": (f'Checking.\n<tool_call>\n{{"name": "get_weather", "arguments": {json.dumps(ARGS)}}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', "Checking."),
    "llama3_json": (f'<|python_tag|>{{"name": "get_weather", "parameters": {json.dumps(ARGS)}}}; '
                    '{"name": "get_time", "parameters": {}}', None),
    "mistral": (f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {json.dumps(ARGS)}}}, '
                '{"name": "get_time", "arguments": {}}]', None),
}


class RecordingTokenizer(ByteTokenizer):
    def __init__(self) -> None:
        super().__init__()
        self.rendered: list[tuple[list[dict], list[dict] | None]] = []  # (messages, tools) per chat prompt

    def apply_chat_template(self, messages: list[dict], **kwargs: object) -> list[int]:
        self.rendered.append((messages, kwargs.get("tools")))
        return super().apply_chat_template(messages, **kwargs)


@dataclass
class ScriptedEngine(FakeEngine):
    """Writes `script`, a few characters per step, then stops."""

    script: str = ""
    chars_per_step: int = 4
    params: list = field(default_factory=list)

    def add_request(self, request) -> None:
        super().add_request(request)
        self.params.append(request.sampling_params)

    def _advance(self, request_id: str):
        """The script's bytes as token ids (the front's ByteTokenizer decodes them back), chars_per_step a step,
        then an EOS (byte 0: finish_reason "stop" drops its text, as a real EOS's)."""
        _, tokens = self.requests[request_id]
        script = self.script.encode()
        new = list(script[len(tokens):len(tokens) + self.chars_per_step])
        tokens.extend(new)
        finished = len(tokens) == len(script)
        return self.output(request_id, new + [0] * finished, finished, "stop")


@dataclass
class Scripted:
    engine: ScriptedEngine
    tokenizer: RecordingTokenizer
    client: openai.OpenAI
    url: str


def _scripted_server(tool_call_parser: str | None):
    tokenizer = RecordingTokenizer()
    fake = ScriptedEngine(tokenizer=tokenizer)
    engine = AsyncLLMEngine(fake)  # type: ignore[arg-type]
    threaded = ThreadedServer(build_app(engine, tool_call_parser=tool_call_parser))
    client = openai.OpenAI(base_url=f"{threaded.url}/v1", api_key="none", max_retries=0, timeout=30)
    return Scripted(fake, tokenizer, client, threaded.url), threaded, engine


@pytest.fixture(scope="module", params=sorted(SCRIPTS))
def scripted(request):
    served, threaded, engine = _scripted_server(request.param)
    served.engine.script = SCRIPTS[request.param][0]
    yield request.param, served
    threaded.stop()
    engine.shutdown()


@pytest.fixture(scope="module")
def no_parser():
    served, threaded, engine = _scripted_server(None)
    yield served
    threaded.stop()
    engine.shutdown()


def _calls(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]


def test_non_streamed_calls_then_the_round_trip(scripted):
    name, served = scripted
    response = served.client.chat.completions.create(model="fake", messages=USER, tools=TOOLS, max_tokens=500)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == SCRIPTS[name][1]
    assert _calls(choice.message) == [("get_weather", ARGS), ("get_time", {})]
    assert all(c.id.startswith("call_") and c.type == "function" for c in choice.message.tool_calls)
    assert served.tokenizer.rendered[-1][1] == TOOLS  # the template got the tools as OpenAI's dicts
    if name == "llama3_json":  # <|python_tag|> is a special token: the text must keep it
        assert served.engine.params[-1].skip_special_tokens is False

    call = choice.message.tool_calls[0]
    history = [*USER, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    served.engine.script = "It is 21 degrees."
    try:
        again = served.client.chat.completions.create(model="fake", messages=history, tools=TOOLS, max_tokens=500)
    finally:
        served.engine.script = SCRIPTS[name][0]
    assert again.choices[0].message.content == "It is 21 degrees." and again.choices[0].message.tool_calls is None
    assert again.choices[0].finish_reason == "stop"
    messages, _ = served.tokenizer.rendered[-1]
    assert messages[1]["tool_calls"][0] == {"id": call.id, "type": "function",
                                            "function": {"name": "get_weather", "arguments": ARGS}}
    assert messages[2] == {"role": "tool", "content": '{"temperature": 21}', "tool_call_id": call.id}


def test_streamed_calls_as_openai_sends_them(scripted):
    name, served = scripted
    stream = served.client.chat.completions.create(model="fake", messages=USER, tools=TOOLS, max_tokens=500,
                                                   stream=True)
    content, calls, finish = "", {}, None
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or []:
            if d.index not in calls:  # the first delta of a call: id, type and name
                assert d.id.startswith("call_") and d.type == "function" and d.function.name
                calls[d.index] = [d.function.name, ""]
            else:
                assert d.id is None and d.function.name is None
            calls[d.index][1] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert content.strip() == (SCRIPTS[name][1] or "")
    assert [(n, json.loads(a)) for n, a in calls.values()] == [("get_weather", ARGS), ("get_time", {})]


def test_one_call_without_parallel_tool_calls_and_none_reads_content(scripted):
    name, served = scripted
    one = served.client.chat.completions.create(model="fake", messages=USER, tools=TOOLS, max_tokens=500,
                                                parallel_tool_calls=False)
    assert _calls(one.choices[0].message) == [("get_weather", ARGS)]
    none = served.client.chat.completions.create(model="fake", messages=USER, tools=TOOLS, max_tokens=500,
                                                 tool_choice="none")
    assert none.choices[0].message.content == SCRIPTS[name][0] and none.choices[0].message.tool_calls is None
    assert none.choices[0].finish_reason == "stop"
    assert served.tokenizer.rendered[-1][1] == TOOLS  # rendered still, as vLLM does


def test_tool_errors_are_400_naming_the_field(no_parser):
    client = no_parser.client
    cases = [
        ("tool_choice", dict(tools=TOOLS)),  # auto, and the template names no format
        ("tool_choice", dict(tool_choice="auto")),  # no tools
        ("messages", dict(messages=[*USER, {"role": "assistant", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{bad"}}]}])),
        ("messages", dict(messages=[*USER, {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}}])),
        ("functions", dict(functions=[{"name": "f"}])),
    ]
    for param, fields in cases:
        body = {"model": "fake", "messages": USER, "max_tokens": 4, **fields}
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(**body)
        assert info.value.body["param"] == param, (fields, info.value.body)
    ok = client.chat.completions.create(model="fake", messages=USER, max_tokens=4, tools=TOOLS, tool_choice="none")
    assert ok.choices[0].message.tool_calls is None


def test_required_and_named_constrain_the_output(no_parser):
    served = no_parser
    named = {"type": "function", "function": {"name": "get_weather"}}
    served.engine.script = json.dumps(ARGS)
    try:
        response = served.client.chat.completions.create(model="fake", messages=USER, tools=TOOLS, tool_choice=named)
        params = served.engine.params[-1]
        assert params.structured_outputs.json == WEATHER_TOOL["function"]["parameters"]
        assert _calls(response.choices[0].message) == [("get_weather", ARGS)]
        assert response.choices[0].message.content is None and response.choices[0].finish_reason == "tool_calls"
        served.engine.script = json.dumps([{"name": "get_time", "parameters": {}}, {"name": "get_weather",
                                                                                  "parameters": ARGS}])
        stream = served.client.chat.completions.create(model="fake", messages=USER, tools=TOOLS,
                                                       tool_choice="required", stream=True)
        names = [d.function.name for chunk in stream for d in chunk.choices[0].delta.tool_calls or [] if d.id]
        assert names == ["get_time", "get_weather"]
        schema = served.engine.params[-1].structured_outputs.json
        assert schema["type"] == "array" and len(schema["items"]["anyOf"]) == 2
    finally:
        served.engine.script = ""
    for fields in ({"tool_choice": {"type": "function", "function": {"name": "nope"}}},
                   {"tool_choice": "required", "response_format": {"type": "json_object"}}):
        with pytest.raises(openai.BadRequestError) as info:
            served.client.chat.completions.create(model="fake", messages=USER, tools=TOOLS, **fields)
        assert info.value.body["param"] == "tool_choice", info.value.body


def test_a_bad_parser_name_or_no_format_with_auto_tool_choice_fails_at_start():
    for kwargs, message in ((dict(tool_call_parser="qwen9"), "'qwen9'"),
                            (dict(enable_auto_tool_choice=True), "--enable-auto-tool-choice")):
        engine = AsyncLLMEngine(FakeEngine(tokenizer=ByteTokenizer()))  # type: ignore[arg-type]
        try:
            with pytest.raises(InvalidRequestError, match=message):
                build_app(engine, **kwargs)
        finally:
            engine.shutdown()


def test_serve_tool_flags_reach_run_server(monkeypatch):
    _, kwargs = started_by(["serve", "--tool-call-parser", "mistral", "--enable-auto-tool-choice"], monkeypatch)
    assert (kwargs["tool_call_parser"], kwargs["enable_auto_tool_choice"]) == ("mistral", True)


# ---- the embedded model, through the Hermes-style template ------------------------------------------


@pytest.fixture(scope="module")
def hermes_model():
    from scaleinfer.llm import LLM

    llm = LLM(max_model_len=1024, num_blocks=128, progress=False, chat_template=str(TEMPLATES / "hermes_tools.jinja"))
    tokenizer = llm.engine.tokenizer
    engine = AsyncLLMEngine(llm.engine)
    threaded = ThreadedServer(build_app(engine))  # the format comes from the template: hermes
    yield openai.OpenAI(base_url=f"{threaded.url}/v1", api_key="none", max_retries=0, timeout=120), tokenizer, threaded
    threaded.stop()
    engine.shutdown()


def test_embedded_model_renders_tools_and_tool_messages(hermes_model):
    client, tokenizer, threaded = hermes_model
    history = [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(ARGS)}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]
    response = client.chat.completions.create(model="smollm2-135m", messages=history, tools=TOOLS, max_tokens=8,
                                              temperature=0)
    conversation = [{"role": "user", "content": USER[0]["content"]},
                    {"role": "assistant", "content": "", "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ARGS}}]},
                    {"role": "tool", "content": '{"temperature": 21}', "tool_call_id": "call_1"}]
    expected = tokenizer.apply_chat_template(conversation, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert '"name": "get_weather"' in expected and "<tool_response>" in expected and "<tools>" in expected
    assert response.usage.prompt_tokens == len(tokenizer.encode(expected, add_special_tokens=False))
    choice = response.choices[0]
    assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)
    tokenized = httpx.post(f"{threaded.url}/tokenize", json={"messages": USER}, timeout=30).json()
    assert tokenized["count"] < response.usage.prompt_tokens


# Bounded arguments: a small model under a free-form string schema may write until max_tokens.
CITY_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "London"]}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}


def test_embedded_model_named_and_required_calls(hermes_model):
    client, _, _ = hermes_model
    tools = [CITY_TOOL, CLOCK_TOOL]
    named = client.chat.completions.create(model="smollm2-135m", messages=USER, tools=tools, max_tokens=60,
                                           temperature=0, tool_choice={"type": "function",
                                                                       "function": {"name": "get_weather"}})
    (name, args), = _calls(named.choices[0].message)
    assert name == "get_weather" and args["city"] in ("Paris", "London") and args["unit"] in ("c", "f")
    assert named.choices[0].finish_reason == "tool_calls"
    stream = client.chat.completions.create(model="smollm2-135m", messages=USER, tools=tools, max_tokens=120,
                                            temperature=0, tool_choice="required", parallel_tool_calls=False,
                                            stream=True)
    calls, finish = {}, None
    for chunk in stream:
        for d in chunk.choices[0].delta.tool_calls or []:
            calls.setdefault(d.index, [d.function.name, ""])[1] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and len(calls) == 1
    (name, arguments), = calls.values()
    assert name in ("get_weather", "get_time") and isinstance(json.loads(arguments), dict)


@pytest.mark.parametrize(("template", "parser"), [("hermes_tools.jinja", "hermes"),
                                                  ("llama31_tools.jinja", "llama3_json")])
def test_shipped_templates_name_their_format_and_render_the_history(hermes_model, template, parser):
    from scaleinfer.server.tool_parsers import detect_parser

    _, tokenizer, _ = hermes_model
    text = (TEMPLATES / template).read_text()
    assert detect_parser(text) == parser
    history = [*USER, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": {"zone": "UTC"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]
    rendered = tokenizer.apply_chat_template(history, tools=TOOLS, chat_template=text, tokenize=False,
                                             add_generation_prompt=True)
    assert '"name": "get_weather"' in rendered and '"zone": "UTC"' in rendered and "12:00" in rendered
