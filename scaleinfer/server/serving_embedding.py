"""POST /v1/embeddings: EmbeddingRequest -> the embedder's worker thread -> EmbeddingResponse.

Inputs are bounded as completions' prompts are (RequestLimits, under the field name "input"); a text past
the model's sequence limit is truncated, as LLM.embed does, while token ids past it are refused.
"""

from __future__ import annotations

import base64

import numpy as np

from scaleinfer.engine.async_embedder import AsyncEmbedder
from scaleinfer.server.errors import bad_request
from scaleinfer.server.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from scaleinfer.server.serving import ServingContext
from scaleinfer.server.unsupported import refuse_unsupported_embedding


async def create_embedding(ctx: ServingContext, req: EmbeddingRequest) -> EmbeddingResponse:
    ctx.check_model(req.model)
    refuse_unsupported_embedding(req.model_extra)
    embedder: AsyncEmbedder = ctx.engine  # type: ignore[assignment]  # app.py routes only an embed server here
    _check_dimensions(embedder, req.dimensions)
    inputs = _normalize_inputs(req.input)
    ctx.limits.check_prompts(inputs, "input")
    if isinstance(inputs[0], list):
        _check_token_ids(embedder, inputs)  # type: ignore[arg-type]
    result = await embedder.embed(inputs)  # type: ignore[arg-type]
    data = [EmbeddingData(index=i, embedding=_encode(vector, req.encoding_format))
            for i, vector in enumerate(result.vectors)]
    usage = EmbeddingUsage(prompt_tokens=result.num_prompt_tokens, total_tokens=result.num_prompt_tokens)
    return EmbeddingResponse(data=data, model=ctx.model_name, usage=usage)


def _normalize_inputs(input_: str | list[str] | list[int] | list[list[int]]) -> list[str] | list[list[int]]:
    if isinstance(input_, str):
        return [input_]
    if not input_:
        raise bad_request("input must not be an empty list", "input")
    if isinstance(input_[0], int):
        return [input_]  # type: ignore[list-item]  # one input given as token ids
    return list(input_)  # type: ignore[arg-type]


def _check_dimensions(embedder: AsyncEmbedder, dimensions: int | None) -> None:
    if dimensions is not None and dimensions != embedder.embedding_size:
        raise bad_request(f"dimensions must be the model's embedding size, {embedder.embedding_size}, "
                          f"got {dimensions}: shortened embeddings are not supported", "dimensions")


def _check_token_ids(embedder: AsyncEmbedder, inputs: list[list[int]]) -> None:
    for index, ids in enumerate(inputs):
        where = "input" if len(inputs) == 1 else f"input {index}"
        if len(ids) > embedder.max_model_len:
            raise bad_request(f"{where} has {len(ids)} token ids; the model takes at most {embedder.max_model_len}",
                              "input")
        bad = [t for t in ids if not 0 <= t < embedder.vocab_size]
        if bad:
            raise bad_request(f"{where} must be token ids in [0, {embedder.vocab_size}), got {bad[:5]}", "input")


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "float":
        return vector
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
