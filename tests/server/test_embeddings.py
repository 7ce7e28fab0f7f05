"""POST /v1/embeddings on a live embed server (all-minilm-l6-v2, CPU), through the official openai client:
the vectors are LLM.embed's, in order, as floats or base64; bad input is a 400 naming its field; each task
refuses the other's routes. One server for the module, built from the LLM whose embed() answers were
recorded first."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import httpx
import numpy as np
import openai
import pytest
from fake_engine import ByteTokenizer, FakeEngine
from server_utils import API_KEY, MAX_BODY_BYTES, ThreadedServer

from scaleinfer.engine.async_embedder import AsyncEmbedder
from scaleinfer.engine.async_engine import AsyncLLMEngine
from scaleinfer.server.app import build_app

MODEL = "all-minilm-l6-v2"
TEXTS = ["Hello world", "The quick brown fox jumps over the lazy dog.", "x",
         "A longer sentence about embeddings, packing and attention, with enough words to span many tokens."]


@dataclass
class EmbedServer:
    url: str
    client: openai.OpenAI
    batch: list[list[float]]  # LLM.embed_vectors(TEXTS)
    single: list[list[float]]  # LLM.embed_vectors([text]) for each text
    token_ids: list[list[int]]  # TEXTS tokenized as the embedder does
    size: int


@pytest.fixture(scope="module")
def embed_server():
    from scaleinfer.llm import LLM

    llm = LLM(MODEL, task="embed", device="cpu", progress=False)
    batch, single = llm.embed_vectors(TEXTS), [llm.embed_vectors([text])[0] for text in TEXTS]
    token_ids = llm.embedder.tokenize(TEXTS)
    embedder = AsyncEmbedder(llm.embedder, MODEL)  # its worker thread owns the runner from here on
    threaded = ThreadedServer(build_app(embedder, api_key=API_KEY, max_body_bytes=MAX_BODY_BYTES))
    client = openai.OpenAI(base_url=f"{threaded.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    yield EmbedServer(threaded.url, client, batch, single, token_ids, embedder.embedding_size)
    threaded.stop()
    embedder.shutdown()


def _vectors(response) -> np.ndarray:
    assert [d.index for d in response.data] == list(range(len(response.data)))
    return np.array([d.embedding for d in response.data])


def test_a_batch_equals_llm_embed_in_order(embed_server):
    response = embed_server.client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    np.testing.assert_allclose(_vectors(response), embed_server.batch, atol=1e-5)
    assert response.model == MODEL and response.object == "list"
    num_tokens = sum(len(ids) for ids in embed_server.token_ids)
    assert response.usage.prompt_tokens == response.usage.total_tokens == num_tokens


def test_one_string_and_a_reversed_batch(embed_server):
    one = embed_server.client.embeddings.create(model=MODEL, input=TEXTS[1], encoding_format="float")
    np.testing.assert_allclose(_vectors(one), [embed_server.single[1]], atol=1e-5)
    reversed_ = embed_server.client.embeddings.create(model=MODEL, input=TEXTS[::-1], encoding_format="float")
    np.testing.assert_allclose(_vectors(reversed_), embed_server.single[::-1], atol=1e-5)


def test_base64_decodes_to_the_same_floats(embed_server):
    raw = httpx.post(f"{embed_server.url}/v1/embeddings", headers={"Authorization": f"Bearer {API_KEY}"},
                     json={"model": MODEL, "input": TEXTS, "encoding_format": "base64"}, timeout=60).json()
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw["data"]]
    np.testing.assert_allclose(decoded, embed_server.batch, atol=1e-5)
    # the openai client asks for base64 when no format is given, and decodes it itself
    default = embed_server.client.embeddings.create(model=MODEL, input=TEXTS)
    np.testing.assert_allclose(_vectors(default), embed_server.batch, atol=1e-5)
    assert len(default.data[0].embedding) == embed_server.size


def test_token_id_input(embed_server):
    ids = embed_server.token_ids
    many = embed_server.client.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    np.testing.assert_allclose(_vectors(many), embed_server.batch, atol=1e-5)
    one = embed_server.client.embeddings.create(model=MODEL, input=ids[2], encoding_format="float")
    np.testing.assert_allclose(_vectors(one), [embed_server.single[2]], atol=1e-5)
    assert one.usage.prompt_tokens == len(ids[2])


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"input": []}, "input", "empty"),
    ({"input": ""}, "input", "empty"),
    ({"input": ["a", ""]}, "input", "input 1 is empty"),
    ({"input": [[]]}, "input", "empty"),
    ({"input": [10**9]}, "input", "token ids"),
    ({"input": list(range(1, 2000))}, "input", "at most"),
    ({"input": ["a"] * 65}, "input", "at most 64"),
    ({"input": "a", "dimensions": 8}, "dimensions", "384"),
    ({"input": "a", "extra_body": {"truncate_prompt_tokens": 4}}, "truncate_prompt_tokens", "not supported"),
])
def test_bad_input_is_a_400_naming_the_field(embed_server, body, param, words):
    with pytest.raises(openai.BadRequestError) as info:
        embed_server.client.embeddings.create(model=MODEL, **body)
    assert info.value.body["param"] == param and words in info.value.body["message"], info.value.body


def test_the_models_own_dimensions_are_accepted(embed_server):
    response = embed_server.client.embeddings.create(model=MODEL, input="a", dimensions=embed_server.size)
    assert len(response.data[0].embedding) == embed_server.size


def test_api_key_model_name_and_the_other_routes(embed_server):
    assert httpx.post(f"{embed_server.url}/v1/embeddings", json={"model": MODEL, "input": "a"},
                      timeout=30).status_code == 401
    with pytest.raises(openai.NotFoundError):
        embed_server.client.embeddings.create(model="text-embedding-3-small", input="a")
    assert [m.id for m in embed_server.client.models.list().data] == [MODEL]
    assert httpx.get(f"{embed_server.url}/health", timeout=30).json() == {"status": "ok"}
    metrics = httpx.get(f"{embed_server.url}/metrics", timeout=30).text
    assert "scaleinfer_prompt_tokens_total" in metrics and "scaleinfer_engine_healthy 1.0" in metrics
    tokens = httpx.post(f"{embed_server.url}/tokenize", headers={"Authorization": f"Bearer {API_KEY}"},
                        json={"model": MODEL, "prompt": TEXTS[0]}, timeout=30).json()["tokens"]
    assert tokens == embed_server.token_ids[0]


def test_an_embed_server_refuses_generation(embed_server):
    with pytest.raises(openai.BadRequestError) as info:
        embed_server.client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert "--task generate" in info.value.body["message"] and "--task embed" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        embed_server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert "/v1/chat/completions needs a server started with --task generate" in info.value.body["message"]


def test_a_generate_server_refuses_embeddings():
    engine = AsyncLLMEngine(FakeEngine(tokenizer=ByteTokenizer()))  # type: ignore[arg-type]
    threaded = ThreadedServer(build_app(engine))
    try:
        client = openai.OpenAI(base_url=f"{threaded.url}/v1", api_key="none", max_retries=0, timeout=30)
        with pytest.raises(openai.BadRequestError) as info:
            client.embeddings.create(model="fake", input="hi")
        assert "/v1/embeddings needs a server started with --task embed" in info.value.body["message"]
        assert "--task generate" in info.value.body["message"]
    finally:
        threaded.stop()
        engine.shutdown()
