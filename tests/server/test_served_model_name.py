"""--served-model-name: the name /v1/models lists, responses carry and requests must name (another is a 404,
as OpenAI answers); a live server over the FakeEngine."""

from __future__ import annotations

import httpx
import openai
import pytest
from fake_engine import ByteTokenizer, FakeEngine
from server_utils import ThreadedServer

from scaleinfer.engine.async_engine import AsyncLLMEngine
from scaleinfer.server.app import build_app


@pytest.fixture
def client():
    engine = AsyncLLMEngine(FakeEngine(tokenizer=ByteTokenizer()))  # type: ignore[arg-type]
    threaded = ThreadedServer(build_app(engine, served_model_name="my-model"))
    yield openai.OpenAI(base_url=f"{threaded.url}/v1", api_key="none", max_retries=0, timeout=30), threaded.url
    threaded.stop()
    engine.shutdown()


def test_served_model_name_is_listed_answered_and_required(client):
    client, url = client
    assert [m.id for m in client.models.list().data] == ["my-model"]
    assert client.completions.create(model="my-model", prompt="hi", max_tokens=2).model == "my-model"
    chat = client.chat.completions.create(model="my-model", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2)
    assert chat.model == "my-model"
    for model in ("fake", "gpt-4o"):  # the engine's own name is not served either
        with pytest.raises(openai.NotFoundError) as info:
            client.completions.create(model=model, prompt="hi", max_tokens=2)
        assert info.value.body["code"] == "model_not_found" and model in info.value.body["message"]
    tokenize = httpx.post(f"{url}/tokenize", json={"model": "fake", "prompt": "x"}, timeout=30)
    assert tokenize.status_code == 404
