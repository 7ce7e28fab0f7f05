"""Tool-call parsers on model text: whole, and streamed in every split (fragments join to the whole)."""

from __future__ import annotations

import json

import pytest

from scaleinfer.errors import InvalidRequestError
from scaleinfer.server.tool_parsers import ToolCallStream, detect_parser, parser_named
from scaleinfer.server.tool_parsers.forced import NamedFormat, RequiredFormat, required_schema

WEATHER = {"city": "Paris", "unit": "celsius", "days": [1, 2], "note": "say \"hi\" {ok}"}
TIME = {"zone": "UTC"}

CASES = {
    "hermes": (f'Let me check.\n<tool_call>\n{{"name": "get_weather", "arguments": {json.dumps(WEATHER)}}}\n'
               f'</tool_call>\n<tool_call>\n{{"arguments": {json.dumps(TIME)}, "name": "get_time"}}\n</tool_call>',
               "Let me check."),
    "llama3_json": (f'<|python_tag|>{{"name": "get_weather", "parameters": {json.dumps(WEATHER)}}}; '
                    f'{{"name": "get_time", "parameters": {json.dumps(TIME)}}}', None),
    "mistral": (f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {json.dumps(WEATHER)}}}, '
                f'{{"name": "get_time", "arguments": {json.dumps(TIME)}}}]', None),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_whole_text_gives_content_and_calls(name):
    text, content = CASES[name]
    message = parser_named(name).extract(text)
    assert message.content == content
    assert [(c.name, json.loads(c.arguments)) for c in message.tool_calls] == [("get_weather", WEATHER),
                                                                              ("get_time", TIME)]
    assert all(c.id.startswith("call_") for c in message.tool_calls)
    assert len({c.id for c in message.tool_calls}) == 2
    assert [c.name for c in parser_named(name).extract(text, parallel_tool_calls=False).tool_calls] == ["get_weather"]


def _streamed(fmt, text: str, step: int, parallel: bool = True):
    stream = ToolCallStream(fmt, parallel)
    content, calls = "", {}
    for start in range(0, len(text), step):
        delta = stream.feed(text[start:start + step], finished=start + step >= len(text))
        content += delta.content
        for d in delta.tool_calls:
            if d.id is not None:
                assert d.index == len(calls) and d.name, "a call's header comes first, in index order"
                calls[d.index] = [d.id, d.name, ""]
            calls[d.index][2] += d.arguments
    return content, calls, stream.called


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
@pytest.mark.parametrize("name", sorted(CASES))
def test_streamed_deltas_join_to_the_whole(name, step):
    text, content = CASES[name]
    got_content, calls, called = _streamed(parser_named(name), text, step)
    whole = parser_named(name).extract(text)
    assert called and got_content.strip() == (content or "")
    assert [(n, a) for _, n, a in calls.values()] == [(c.name, c.arguments) for c in whole.tool_calls]
    assert "<tool_call" not in got_content and "[TOOL" not in got_content


@pytest.mark.parametrize("name", sorted(CASES))
def test_plain_text_is_content(name):
    text = "The weather in Paris is mild {not a call}; <tool or [TOOL or <|py"
    assert parser_named(name).extract(text).content == text
    assert parser_named(name).extract(text).tool_calls == []
    for step in (1, 5):
        content, calls, called = _streamed(parser_named(name), text, step)
        assert (content, calls, called) == (text, {}, False)


def test_a_call_that_does_not_parse_is_content():
    fmt = parser_named("hermes")
    broken = 'Sure <tool_call>{"name": "f", "arguments": {"a": </tool_call>'
    assert fmt.extract(broken).tool_calls == [] and fmt.extract(broken).content == broken
    # Streamed, a call is sent once its name is complete (it cannot be taken back); before that, it is
    # held, and given as content when the text ends first.
    cut = 'Sure <tool_call>{"nam'
    assert _streamed(fmt, cut, 4) == (cut, {}, False)
    not_object = '<tool_call>{"name": "f", "arguments": [1]}</tool_call>'
    assert fmt.extract(not_object).tool_calls == []


def test_llama3_json_calls_only_at_the_start():
    fmt = parser_named("llama3_json")
    assert fmt.extract('  {"name": "f", "parameters": {}}').content is None
    assert fmt.extract('Call {"name": "f", "parameters": {}}').tool_calls == []
    assert fmt.extract('{"name": "f"}').tool_calls[0].arguments == "{}"


def test_forced_formats():
    named = NamedFormat("get_weather")
    message = named.extract(f" {json.dumps(WEATHER)}")
    assert [(c.name, json.loads(c.arguments)) for c in message.tool_calls] == [("get_weather", WEATHER)]
    _, calls, _ = _streamed(named, json.dumps(WEATHER), 2)
    assert [(n, json.loads(a)) for _, n, a in calls.values()] == [("get_weather", WEATHER)]
    text = json.dumps([{"name": "a", "parameters": TIME}, {"name": "b", "parameters": {}}])
    assert [c.name for c in RequiredFormat().extract(text).tool_calls] == ["a", "b"]
    assert [c[1] for c in _streamed(RequiredFormat(), text, 3, parallel=False)[1].values()] == ["a"]
    tools = [{"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}}]
    assert required_schema(tools, False)["maxItems"] == 1


def test_parser_names_and_detection():
    with pytest.raises(InvalidRequestError, match="'qwen9'"):
        parser_named("qwen9")
    assert detect_parser("{% for t in tools %}<tool_call>{% endfor %}") == "hermes"
    assert detect_parser("[TOOL_CALLS]") == "mistral"
    assert detect_parser("<|start_header_id|>ipython<|end_header_id|>") == "llama3_json"
    assert detect_parser("{{ messages }}") is None and detect_parser(None) is None
