"""OpenAI API request and response schemas (the subset scaleinfer serves).

Requests are parsed strictly (no "1" -> 1 coercion) so a wrong-typed field is a 422 naming it; unknown
fields are kept in model_extra, where unsupported.py refuses those that would change the output and the
rest are ignored, as OpenAI clients send optional ones freely. Value checks (ranges, lengths) are not
here: SamplingParams and the engine own them and answer 400.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- requests ---------------------------------------------------------------------------------------


class StreamOptions(_Request):
    include_usage: bool = False  # a last chunk with the usage (OpenAI's)
    continuous_usage_stats: bool = False  # extension (vLLM): with include_usage, the usage so far in every chunk


class JsonSchemaFormat(_Request):
    """response_format {"type": "json_schema", "json_schema": {...}}: OpenAI's named schema."""

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)
    name: str
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")  # None: any JSON object
    strict: bool | None = None  # the output always follows the schema, strict or not


class ResponseFormat(_Request):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(_Request):
    """vLLM's structured_outputs: exactly one constraint (server/structured.py checks)."""

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)
    json_: dict | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    disable_any_whitespace: bool = False
    whitespace_pattern: str | None = None  # JSON only: the regex whitespace between tokens matches


class SamplingRequest(_Request):
    """Fields shared by completions and chat completions."""

    model: str
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension (vLLM)
    min_p: float | None = None  # extension (vLLM)
    min_tokens: int = 0  # extension (vLLM)
    ignore_eos: bool = False  # extension (vLLM): benchmarks use it for fixed output lengths
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # extension (vLLM)
    include_stop_str_in_output: bool = False  # extension (vLLM)
    skip_special_tokens: bool = True  # extension (vLLM)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # extension (vLLM)
    prompt_logprobs: int | None = None  # extension (vLLM): top-k per prompt position; not with stream=true
    logit_bias: dict[str, float] | None = None  # token id (a JSON key, so a string) -> bias
    user: str | None = None  # accepted and ignored
    # Structured outputs (server/structured.py): OpenAI's response_format, vLLM's structured_outputs and its
    # older guided_* fields; at most one of them.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None  # extension (vLLM)
    guided_json: dict | str | None = None  # extension (vLLM, older)
    guided_regex: str | None = None  # extension (vLLM, older)
    guided_choice: list[str] | None = None  # extension (vLLM, older)
    guided_grammar: str | None = None  # extension (vLLM, older)
    guided_whitespace_pattern: str | None = None  # extension (vLLM, older): of the JSON constraint above

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        """Usage so far in every chunk: vLLM's continuous_usage_stats, which takes include_usage too."""
        return self.include_usage and self.stream_options.continuous_usage_stats


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None  # None: OpenAI's default of 16
    logprobs: int | None = None  # top-k per generated token
    echo: bool = False
    add_special_tokens: bool = True  # extension (vLLM): the tokenizer's special tokens (BOS) around text prompts


class ContentPart(_Request):
    type: str
    text: str | None = None


class FunctionCallIn(_Request):
    name: str
    arguments: str  # JSON text, as OpenAI returned it


class ToolCallIn(_Request):
    """An assistant message's earlier tool call, in the history."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_Request):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # role "assistant"
    tool_call_id: str | None = None  # role "tool": the call this message answers


class FunctionDefinition(_Request):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class ChatTool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = None  # deprecated by OpenAI for max_completion_tokens; both accepted
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # None: "auto" with tools
    parallel_tool_calls: bool = True


class TokenizeRequest(_Request):
    """vLLM's /tokenize: a prompt, or messages rendered through the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # None: True for a prompt, False for messages (the template adds them)
    add_generation_prompt: bool = True  # messages only


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class EmbeddingRequest(_Request):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"  # base64: little-endian float32 bytes, as OpenAI's
    dimensions: int | None = None  # only the model's own size is accepted
    user: str | None = None  # accepted and ignored


# ---- responses --------------------------------------------------------------------------------------


class Usage(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(_Response):
    tokens: list[str] = Field(default_factory=list)
    # None at the first prompt token of an echo (nothing precedes it to score it)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(_Response):
    """One token's entry at one prompt position (vLLM's prompt_logprobs: token id -> this)."""

    logprob: float
    rank: int
    decoded_token: str | None = None


PromptLogprobs = list[dict[str, PromptLogprob] | None]  # None at the first position


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # extension (vLLM): of this choice's prompt


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Response):
    content: list[TokenLogprob] | None = None


class FunctionCallOut(_Response):
    name: str
    arguments: str  # JSON text


class ToolCallOut(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatMessageOut(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(_Response):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    prompt_logprobs: PromptLogprobs | None = None  # extension (vLLM)
    system_fingerprint: str | None = None


class DeltaFunctionCall(_Response):
    name: str | None = None  # in a call's first delta
    arguments: str | None = None  # the next fragment of its JSON text


class DeltaToolCall(_Response):
    index: int
    id: str | None = None  # with type and function.name, in a call's first delta only
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class DeltaMessage(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class EmbeddingData(_Response):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64


class EmbeddingUsage(_Response):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(_Response):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "scaleinfer"
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(_Response):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(_Response):
    prompt: str


class VersionResponse(_Response):
    version: str


class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorInfo
