"""What LLM.generate, LLM.embed and LLM.chat take, in vLLM's forms, normalized for the engine.

A prompt is a string, a list of token ids, {"prompt": str} (vLLM's TextPrompt) or {"prompt_token_ids": [...]}
(vLLM's TokensPrompt); several prompts are a list of these, in any mix. A chat message's content is a string or
a list of OpenAI content parts, of which {"type": "text", "text": ...} is supported; the texts are joined with
nothing between them, as the server joins them.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral
from typing import Any

from scaleinfer.errors import InvalidRequestError

PromptInput = str | Sequence[int] | dict[str, Any]
Prompt = str | list[int]  # what the engine takes
Message = dict[str, Any]
PROMPT_KEYS = ("prompt", "prompt_token_ids")
# vLLM prompt-dict keys that would change the output and are not built here: refused, not ignored
UNSUPPORTED_PROMPT_KEYS = ("multi_modal_data", "mm_processor_kwargs", "multi_modal_uuids", "token_type_ids",
                           "prompt_embeds", "cache_salt")


def as_prompt_list(prompts: PromptInput | Sequence[PromptInput]) -> list[Prompt]:
    """One prompt, or a non-empty list of them, as the engine's strings and token-id lists, in order."""
    if isinstance(prompts, (str, dict)) or _is_token_ids(prompts):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise InvalidRequestError(f"prompts must be a prompt or a list of prompts, got {type(prompts).__name__}")
    if not prompts:
        raise InvalidRequestError("prompts is empty")
    return [parse_prompt(prompt, index) for index, prompt in enumerate(prompts)]


def parse_prompt(prompt: PromptInput, index: int = 0) -> Prompt:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict):
        return _from_dict(prompt, index)
    if _is_token_ids(prompt):
        return [int(t) for t in prompt]
    raise InvalidRequestError(f"prompt {index} must be a string, a list of token ids, {{'prompt': str}} or "
                              f"{{'prompt_token_ids': [...]}}, got {_short(prompt)}")


def _from_dict(prompt: dict[str, Any], index: int) -> Prompt:
    unsupported = sorted(set(prompt) & set(UNSUPPORTED_PROMPT_KEYS))
    if unsupported:
        raise InvalidRequestError(f"prompt {index}: {', '.join(unsupported)} is not supported")
    unknown = sorted(set(prompt) - set(PROMPT_KEYS))
    if unknown:
        raise InvalidRequestError(f"prompt {index} has unknown keys {unknown}; a prompt dict holds 'prompt' or "
                                  "'prompt_token_ids'")
    if len(prompt) != 1:
        raise InvalidRequestError(f"prompt {index} must hold one of 'prompt' or 'prompt_token_ids', got "
                                  f"{sorted(prompt) or 'neither'}")
    if "prompt" in prompt and not isinstance(prompt["prompt"], str):
        raise InvalidRequestError(f"prompt {index}: 'prompt' must be a string, got {_short(prompt['prompt'])}")
    if "prompt_token_ids" in prompt and not _is_token_ids(prompt["prompt_token_ids"]):
        raise InvalidRequestError(f"prompt {index}: 'prompt_token_ids' must be a non-empty list of integers, got "
                                  f"{_short(prompt['prompt_token_ids'])}")
    return parse_prompt(next(iter(prompt.values())), index)


def _is_token_ids(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and bool(value)
            and all(isinstance(t, Integral) and not isinstance(t, bool) for t in value))


def _short(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def as_conversations(messages: Sequence[Message] | Sequence[Sequence[Message]]) -> list[list[Message]]:
    """One conversation (a list of messages) or a list of them, each message's content as one string."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequestError(f"messages must be a non-empty list of messages (or of conversations), got "
                                  f"{_short(messages)}")
    conversations = [messages] if isinstance(messages[0], dict) else messages
    return [_conversation(conversation, i) for i, conversation in enumerate(conversations)]


def _conversation(conversation: Sequence[Message], index: int) -> list[Message]:
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise InvalidRequestError(f"conversation {index} must be a non-empty list of messages, got "
                                  f"{_short(conversation)}")
    return [_message(message, index, i) for i, message in enumerate(conversation)]


def _message(message: Message, conversation: int, index: int) -> Message:
    where = f"conversation {conversation} message {index}"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise InvalidRequestError(f"{where} must be a dict with a 'role' string, got {_short(message)}")
    return {**message, "content": content_text(message.get("content"), where)}


def content_text(content: Any, where: str = "message") -> str:
    """A message's content as one string: a string as it is, None as "", text parts joined."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, (list, tuple)):
        raise InvalidRequestError(f"{where}: content must be a string or a list of content parts, got "
                                  f"{_short(content)}")
    return "".join(_part_text(part, f"{where} part {i}") for i, part in enumerate(content))


def _part_text(part: Any, where: str) -> str:
    if not isinstance(part, dict) or part.get("type") != "text":
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        raise InvalidRequestError(f"{where}: only text content parts are supported, got type {kind!r}")
    if not isinstance(part.get("text"), str):
        raise InvalidRequestError(f"{where}: a text part needs a 'text' string, got {_short(part.get('text'))}")
    return part["text"]
