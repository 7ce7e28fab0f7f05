"""Request fields of OpenAI's and vLLM's APIs that would change the output and are not built here: a request
that sets one to anything but its inert value answers 400 naming it, never a 200 that ignored it.

Fields that only describe the caller (user, metadata, store, service_tier) or the scheduling (priority)
are ignored, as OpenAI clients send them freely; so are fields this table does not know.
"""

from __future__ import annotations

from typing import Any

from scaleinfer.server.errors import bad_request

_NOT_SET = (None,)

# field -> (the values that change nothing, why it is refused). Both endpoints.
_SAMPLING: dict[str, tuple[tuple[Any, ...], str]] = {
    "best_of": ((None, 1), "best_of other than 1 is not supported; use n"),
    "use_beam_search": ((None, False), "beam search is not supported"),
    "length_penalty": ((None, 1, 1.0), "length_penalty (beam search) is not supported"),
    "allowed_token_ids": (_NOT_SET, "allowed_token_ids is not supported; logit_bias can ban tokens"),
    "bad_words": ((None, []), "bad_words is not supported"),
    "logits_processors": ((None, []), "logits_processors is not supported"),
    "truncate_prompt_tokens": (_NOT_SET, "truncate_prompt_tokens is not supported"),
    "spaces_between_special_tokens": ((None, True), "spaces_between_special_tokens=false is not supported"),
    "return_tokens_as_token_ids": ((None, False), "return_tokens_as_token_ids is not supported"),
    "return_token_ids": ((None, False), "return_token_ids is not supported"),
}

_COMPLETION = {
    **_SAMPLING,
    "suffix": ((None, ""), "suffix (fill in the middle) is not supported"),
}

_CHAT = {
    **_SAMPLING,
    "functions": ((None, []), "functions (OpenAI's deprecated form) is not supported; use tools"),
    "function_call": ((None, "none"), "function_call (OpenAI's deprecated form) is not supported; use tool_choice"),
    "audio": (_NOT_SET, "audio output is not supported"),
    "modalities": ((None, ["text"]), "modalities other than ['text'] are not supported"),
    "reasoning_effort": (_NOT_SET, "reasoning_effort is not supported"),
    "verbosity": (_NOT_SET, "verbosity is not supported"),
    "web_search_options": (_NOT_SET, "web_search_options is not supported"),
    "echo": ((None, False), "echo is not supported for chat completions"),
    "chat_template": (_NOT_SET, "a per-request chat_template is not supported; start the server with "
                                "--chat-template"),
    "chat_template_kwargs": ((None, {}), "chat_template_kwargs is not supported"),
    "documents": (_NOT_SET, "documents is not supported"),
    "continue_final_message": ((None, False), "continue_final_message is not supported"),
    "add_generation_prompt": ((None, True), "add_generation_prompt=false is not supported"),
    "add_special_tokens": ((None, False), "add_special_tokens is not supported for chat completions"),
    "mm_processor_kwargs": (_NOT_SET, "mm_processor_kwargs is not supported"),
}


_EMBEDDING = {
    "truncate_prompt_tokens": (_NOT_SET, "truncate_prompt_tokens is not supported: texts are truncated to the "
                                         "model's sequence limit"),
    "add_special_tokens": ((None, True), "add_special_tokens=false is not supported for embeddings"),
    "normalize": ((None, True), "normalize=false is not supported: vectors are L2-normalized"),
}


def refuse_unsupported_embedding(extra: dict[str, Any] | None) -> None:
    _refuse(extra, _EMBEDDING)


def refuse_unsupported_completion(extra: dict[str, Any] | None) -> None:
    _refuse(extra, _COMPLETION)


def refuse_unsupported_chat(extra: dict[str, Any] | None, messages_extra: list[dict[str, Any] | None]) -> None:
    """extra: the request's fields the schema does not declare; messages_extra: each message's."""
    _refuse(extra, _CHAT)
    for i, fields in enumerate(messages_extra):
        if (fields or {}).get("function_call"):
            raise bad_request(f"messages[{i}].function_call: OpenAI's deprecated form is not supported; use "
                              "tool_calls", "messages")


def _refuse(extra: dict[str, Any] | None, table: dict[str, tuple[tuple[Any, ...], str]]) -> None:
    for name, value in (extra or {}).items():
        entry = table.get(name)
        if entry is not None and not _is_inert(value, entry[0]):
            raise bad_request(f"{name}: {entry[1]}", name)


def _is_inert(value: Any, inert: tuple[Any, ...]) -> bool:
    # type equality too: True == 1 and 1 == 1.0 would let best_of=true pass
    return any(value == v and (v is None or type(value) is type(v) or {type(value), type(v)} <= {int, float})
               for v in inert)
