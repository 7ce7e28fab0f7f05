"""A model whose tokenizer has no chat template, served: /v1/chat/completions answers 400 saying so and how to
give one (through the openai client), while /v1/completions serves. A live server over the FakeEngine."""

from __future__ import annotations

import openai
import pytest
from fake_engine import ByteTokenizer, FakeEngine
from server_utils import ThreadedServer

from scaleinfer.engine.async_engine import AsyncLLMEngine
from scaleinfer.server.app import build_app


class TemplatelessTokenizer(ByteTokenizer):
    chat_template = None


@pytest.fixture
def client():
    engine = AsyncLLMEngine(FakeEngine(tokenizer=TemplatelessTokenizer()))  # type: ignore[arg-type]
    threaded = ThreadedServer(build_app(engine))
    yield openai.OpenAI(base_url=f"{threaded.url}/v1", api_key="none", max_retries=0, timeout=30)
    threaded.stop()
    engine.shutdown()


def test_chat_is_refused_naming_the_missing_template(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert "model 'fake' has no chat template" in info.value.body["message"]
    assert "--chat-template" in info.value.body["message"] and info.value.body["param"] == "messages"
    assert client.completions.create(model="fake", prompt="hi", max_tokens=2).choices[0].text == "xx"
