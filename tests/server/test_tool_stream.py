"""The incremental tool-call stream: each piece read once (a counter of the characters it examines stays
within a constant of the piece's length over 3,000 tokens of content and a long call), the same result
wherever the text is cut (a marker split at every point, every prefix of a call), and the same deltas'
join as the re-scanning stream it replaced (kept here as the oracle) and as the whole-text extract."""

from __future__ import annotations

import json

import pytest
from test_tool_parsers import CASES

from scaleinfer.server.tool_parsers import ToolCallStream, parser_named
from scaleinfer.server.tool_parsers.forced import NamedFormat, RequiredFormat
from scaleinfer.server.tool_parsers.format import ToolCallFormat

MARKERS = {"hermes": "<tool_call>", "llama3_json": "<|python_tag|>", "mistral": "[TOOL_CALLS]"}
TRICKY = [  # (format, text): escapes, brackets in strings, arguments before the name, broken objects
    ("hermes", 'x <tool_call>{"arguments": {"s": "a\\"}{[b\\\\", "n": [1, {"k": null}]}, "name": "f"}</tool_call>'),
    ("hermes", '<tool_call>{"name": "f", "arguments": 12}</tool_call><tool_call>{"name": "g"}</tool_call>'),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": 1}, 5}</tool_call><tool_call>{"name": "g"}'),
    ("hermes", '<tool_call>{"name" "f"}</tool_call> and {"name": "g", "arguments": {}}'),
    ("hermes", '<tool_call>{"na\\u006de": "f", "arguments": {"a": true}, "arguments": {"b": 2}}'),
    ("mistral", '[TOOL_CALLS] [{"name": "f", "arguments": {"x": "]}"}},{"name":"g","arguments":{}},]'),
    ("llama3_json", '  {"name": "f", "parameters": {"q": "\\\\"}};{"name": "g", "parameters": {}}'),
    ("llama3_json", '<|python_tag|>[{"name": "f", "parameters": {"a": [1, 2]}}]'),
]


# ---- the oracle: the stream before this one, which re-scanned the whole text on every piece -----------


def _rescanned(fmt: ToolCallFormat, pieces: list[str], parallel: bool = True):
    """(content, [(name, arguments)], called) as the re-scanning stream sent them."""
    text, start, content, sent = "", None, "", []  # sent: [name, arguments] per call
    for k, piece in enumerate(pieces):
        text += piece
        finished = k == len(pieces) - 1
        start = fmt.region_start(text) if start is None else start
        if start is None:
            end = len(text) if finished else len(text) - _old_held_tail(fmt, text)
            content += text[len(content):max(end, len(content))]
            continue
        content += text[len(content):start]
        calls = fmt.scan(text, start)[:None if parallel else 1]
        for index, call in enumerate(calls):
            if index == len(sent) and call.name is not None:
                sent.append([call.name, ""])
            if index >= len(sent):
                break
            sent[index][1] = call.arguments(text)  # it sent the part past what it had sent
        if finished and not sent:
            content = text
    return content, [tuple(c) for c in sent], bool(sent)


def _old_held_tail(fmt: ToolCallFormat, text: str) -> int:
    if fmt.name == "llama3_json":  # it held leading whitespace too
        stripped = text.lstrip()
        return len(text) if not stripped or "<|python_tag|>".startswith(stripped) else 0
    return fmt.held_tail(text)


# ---- the stream under test --------------------------------------------------------------------------


def _streamed(fmt: ToolCallFormat, pieces: list[str], parallel: bool = True):
    stream = ToolCallStream(fmt, parallel)
    content, calls = "", {}
    for k, piece in enumerate(pieces):
        delta = stream.feed(piece, finished=k == len(pieces) - 1)
        content += delta.content
        for d in delta.tool_calls:
            if d.id is not None:
                assert d.index == len(calls) and d.name and d.id.startswith("call_")
                calls[d.index] = [d.name, ""]
            else:
                assert d.name is None and d.index == len(calls) - 1, "fragments follow their call's header"
            calls[d.index][1] += d.arguments
    return content, [tuple(c) for c in calls.values()], stream.called


def _cuts(text: str, *points: int) -> list[str]:
    bounds = [0, *points, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def _extracted(fmt: ToolCallFormat, text: str):
    message = fmt.extract(text)
    return [(c.name, c.arguments) for c in message.tool_calls]


CORPUS = [(name, text) for name, (text, _) in sorted(CASES.items())] + TRICKY


@pytest.mark.parametrize(("name", "text"), CORPUS)
def test_every_two_piece_cut_joins_as_the_rescanning_stream(name, text):
    fmt = parser_named(name)
    whole = _rescanned(fmt, [text])
    for cut in range(len(text) + 1):
        pieces = _cuts(text, cut)
        assert _streamed(fmt, pieces) == _rescanned(fmt, pieces) == whole, pieces
    assert _streamed(fmt, list(text)) == whole


@pytest.mark.parametrize(("name", "text"), CORPUS)
def test_every_prefix_as_a_finished_text(name, text):
    """A text cut off anywhere (max_tokens): inside a key, a name, the arguments, an escape, a marker."""
    fmt = parser_named(name)
    for end in range(len(text) + 1):
        prefix = text[:end]
        assert _streamed(fmt, list(prefix)) == _streamed(fmt, [prefix]) == _rescanned(fmt, [prefix]), prefix


@pytest.mark.parametrize("name", sorted(MARKERS))
def test_a_marker_split_at_every_point_gives_the_whole_answer(name):
    text, content = CASES[name]
    fmt, marker = parser_named(name), MARKERS[name]
    begin = text.index(marker)
    expected = (text[:begin], _extracted(fmt, text), True)
    assert (expected[0].strip() or None) == content
    span = range(max(begin - 2, 0), begin + len(marker) + 3)
    for a in span:
        for b in span:
            pieces = _cuts(text, *sorted({a, b}))
            assert _streamed(fmt, pieces) == expected, pieces


def test_what_looked_like_a_marker_is_sent_as_content_once_it_is_not():
    fmt = parser_named("hermes")
    stream = ToolCallStream(fmt)
    assert stream.feed("Use <tool", False).content == "Use "  # held: it may be "<tool_call>"
    assert stream.feed("s> here <tool_c", False).content == "<tools> here "
    assert stream.feed("alls", True).content == "<tool_calls"
    assert not stream.called


def test_a_complete_object_without_a_name_is_not_a_call():
    fmt = parser_named("hermes")
    text = '<tool_call>{"arguments": {}}</tool_call><tool_call>{"name": "g", "arguments": {"a": 1}}</tool_call>'
    assert _extracted(fmt, text) == [("g", '{"a": 1}')]
    for step in (1, 5, len(text)):
        assert _streamed(fmt, [text[i:i + step] for i in range(0, len(text), step)]) == ("", [("g", '{"a": 1}')],
                                                                                         True)


def test_forced_formats_stream_as_they_extract():
    args = json.dumps({"city": "Paris", "tags": ["a]", "{b"]})
    named = NamedFormat("get_weather")
    text = f"  {args}  "
    for cut in range(len(text) + 1):
        assert _streamed(named, _cuts(text, cut)) == ("", _extracted(named, text), True)
    calls = json.dumps([{"name": "a", "parameters": {"x": "}"}}, {"name": "b", "parameters": {}}])
    required = RequiredFormat()
    assert _extracted(required, calls) == [("a", '{"x": "}"}'), ("b", "{}")]
    for cut in range(len(calls) + 1):
        assert _streamed(required, _cuts(calls, cut)) == ("", _extracted(required, calls), True)
        assert _streamed(required, _cuts(calls, cut), parallel=False) == ("", [("a", '{"x": "}"}')], True)


# ---- the cost per piece -----------------------------------------------------------------------------

LONG_ARGS = json.dumps({"code": "\n".join(f'print("line {i}", {{"k": [{i}]}})' for i in range(400)),
                        "n": 3, "ok": True})
LONG = {  # 3,000 words of content, then a call whose arguments are thousands of characters
    "hermes": ("word " * 3000 + f'<tool_call>\n{{"name": "run", "arguments": {LONG_ARGS}}}\n</tool_call>'),
    "mistral": ("word " * 3000 + f'[TOOL_CALLS] [{{"name": "run", "arguments": {LONG_ARGS}}}]'),
    "llama3_json": f'<|python_tag|>{{"name": "run", "parameters": {LONG_ARGS}}}',
}


def _tokens(text: str, size: int = 5) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("name", sorted(LONG))
def test_each_piece_costs_its_own_length(name):
    """Counts the characters the stream reads per piece (the re-scanning stream read all the text so far:
    about 30,000 on the last pieces here)."""
    text, fmt = LONG[name], parser_named(name)
    stream = ToolCallStream(fmt)
    pieces, num_examined, content, arguments = _tokens(text), [], "", ""
    for k, piece in enumerate(pieces):
        before = stream.examined
        delta = stream.feed(piece, finished=k == len(pieces) - 1)
        num_examined.append(stream.examined - before)
        content += delta.content
        arguments += "".join(d.arguments for d in delta.tool_calls)
    # A piece is read with the held tail before it (shorter than a marker); the marker is read again by
    # the scanner, once.
    longest_marker = max(map(len, fmt.markers))
    assert all(n <= 2 * (len(p) + longest_marker) for n, p in zip(num_examined, pieces)), max(num_examined)
    assert sum(num_examined) <= 2 * len(text)
    assert json.loads(arguments) == json.loads(LONG_ARGS) and arguments == _extracted(fmt, text)[0][1]
    assert content == text[:len(content)] and content.strip() == (fmt.extract(text).content or "")
    assert stream.called
