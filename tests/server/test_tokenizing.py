"""Prompts are tokenized on the server's tokenizer thread, never on the event loop or the engine thread; the
engine gets token ids, echo returns the text as sent. A live server over the FakeEngine and a byte tokenizer."""

from __future__ import annotations

import httpx
import pytest
from fake_engine import ByteTokenizer, FakeEngine
from server_utils import ThreadedServer

from scaleinfer.engine.async_engine import AsyncLLMEngine
from scaleinfer.server.app import build_app


@pytest.fixture
def byte_server():
    fake = FakeEngine(tokenizer=ByteTokenizer())
    engine = AsyncLLMEngine(fake)  # type: ignore[arg-type]
    threaded = ThreadedServer(build_app(engine))
    yield fake, threaded.url
    threaded.stop()
    engine.shutdown()


def post(url: str, path: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/{path}", json={"model": "fake", "max_tokens": 2, **body}, timeout=30)


def test_completions_and_chat_tokenize_on_the_tokenizer_thread(byte_server):
    fake, url = byte_server
    texts = post(url, "completions", prompt=["hi", "héllo"], echo=True)
    assert texts.status_code == 200, texts.text
    assert [c["text"] for c in texts.json()["choices"]] == ["hixx", "hélloxx"]  # the text as sent, then the fake's "xx"
    ids = post(url, "completions", prompt=[7, 8], max_tokens=1)
    assert ids.status_code == 200, ids.text
    chat = post(url, "chat/completions", messages=[{"role": "user", "content": "yo"}])
    assert chat.status_code == 200, chat.text
    assert sorted(map(tuple, fake.prompts.values())) == sorted([tuple(b"hi"), tuple("héllo".encode()), (7, 8),
                                                                tuple(b"user: yo\n")])
    assert fake.tokenizer.caller_threads == {"scaleinfer-tokenizer_0"}


def test_text_prompts_without_a_tokenizer_are_refused():
    """skip_tokenizer_init: the front has no tokenizer, so a text prompt is a 400 (token ids are served)."""
    fake = FakeEngine()
    engine = AsyncLLMEngine(fake)  # type: ignore[arg-type]
    threaded = ThreadedServer(build_app(engine))
    try:
        refused = post(threaded.url, "completions", prompt="bad")
        assert refused.status_code == 400 and "text prompts need a tokenizer" in refused.json()["error"]["message"]
        assert post(threaded.url, "completions", prompt=[7, 8]).status_code == 200
        chat = post(threaded.url, "chat/completions", messages=[{"role": "user", "content": "yo"}])
        assert chat.status_code == 400 and "needs a tokenizer" in chat.json()["error"]["message"]
    finally:
        threaded.stop()
        engine.shutdown()


class BosTokenizer(ByteTokenizer):
    """Puts a BOS (id 1) before each text, as Llama's tokenizers do, unless add_special_tokens is false."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [1] * add_special_tokens + super().encode(text)


def test_completions_add_special_tokens_false_drops_the_bos():
    """vLLM's add_special_tokens on /v1/completions (default true): false reaches the tokenizer, not ignored."""
    fake = FakeEngine(tokenizer=BosTokenizer())
    engine = AsyncLLMEngine(fake)  # type: ignore[arg-type]
    threaded = ThreadedServer(build_app(engine))
    try:
        for body, expected in [({}, [1, *b"hi"]), ({"add_special_tokens": True}, [1, *b"hi"]),
                               ({"add_special_tokens": False}, list(b"hi"))]:
            fake.prompts.clear()
            answer = post(threaded.url, "completions", prompt="hi", **body)
            assert answer.status_code == 200, answer.text
            assert list(fake.prompts.values()) == [expected], body
            assert answer.json()["usage"]["prompt_tokens"] == len(expected)
        assert post(threaded.url, "completions", prompt="hi", add_special_tokens="no").status_code == 422
    finally:
        threaded.stop()
        engine.shutdown()
