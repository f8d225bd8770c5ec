"""OpenAI request parsing and response shapes, as vLLM's OpenAI server produces them
(`vllm/entrypoints/openai/protocol.py`: CompletionResponse, ChatCompletionResponse, their stream
chunks, ErrorResponse; `kv_transfer_params` is a top-level field of requests and responses).

No tokenizer runs here: a prompt given as token ids has that many tokens, a text prompt one token
per whitespace-separated word, and a chat message its words plus the few tokens a chat template
adds around each message. Generated text is a fixed cycle of words, one per token.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

#: Tokens a chat template adds per message (role header and end-of-turn markers, as Llama 2/3's do).
CHAT_TEMPLATE_TOKENS = 4
_WORDS = ("The", " pool", " serves", " this", " request", " token", " by", " token", ".")


class InvalidRequest(ValueError):
    """A request vLLM would answer with 400 BadRequestError."""


@dataclass(frozen=True)
class GenerationRequest:
    chat: bool
    model: str
    prompt_tokens: int
    max_tokens: int
    stream: bool
    include_usage: bool
    kv_transfer_params: dict[str, Any] | None


def _count_text(text: str) -> int:
    return max(1, len(text.split()))


def _prompt_tokens(prompt: Any) -> int:
    if isinstance(prompt, str):
        return _count_text(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return len(prompt)
    if isinstance(prompt, list) and len(prompt) == 1:
        return _prompt_tokens(prompt[0])
    raise InvalidRequest("prompt must be a string, a list of token ids, or a list of one of those")


def _message_tokens(messages: Any) -> int:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list")
    total = 0
    for message in messages:
        if not isinstance(message, dict) or "role" not in message:
            raise InvalidRequest("each message needs a role")
        content = message.get("content") or ""
        if isinstance(content, list):  # content parts: count the text ones
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        total += len(str(content).split()) + CHAT_TEMPLATE_TOKENS
    return total


def check_context_length(prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    """vLLM's 400s for a request that does not fit `--max-model-len` (its `_validate_input`)."""
    if prompt_tokens >= max_model_len:
        raise InvalidRequest(
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{prompt_tokens} input tokens. Please reduce the length of the input messages."
        )
    if prompt_tokens + max_tokens > max_model_len:
        raise InvalidRequest(
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum "
            f"context length is {max_model_len} tokens and your request has {prompt_tokens} input tokens "
            f"({max_tokens} > {max_model_len} - {prompt_tokens})."
        )


def parse(
    body: Any, chat: bool, served_model: str, default_max_tokens: int, max_model_len: int | None = None
) -> GenerationRequest:
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    model = body.get("model") or served_model
    if model != served_model:
        raise NotFound(f"The model `{model}` does not exist.")
    if int(body.get("n") or 1) != 1:
        raise InvalidRequest("only n=1 is supported")
    prompt_tokens = _message_tokens(body.get("messages")) if chat else _prompt_tokens(body.get("prompt"))
    limit = body.get("max_completion_tokens") if chat else None
    limit = limit if limit is not None else body.get("max_tokens")
    # OpenAI's completions default is 16 tokens; a chat request without a limit generates until EOS,
    # which this engine (no model, no EOS) stands in for with a configured length.
    max_tokens = int(limit) if limit is not None else (default_max_tokens if chat else 16)
    if max_tokens < 1:
        raise InvalidRequest(f"max_tokens must be at least 1, got {max_tokens}.")
    if max_model_len is not None:
        check_context_length(prompt_tokens, max_tokens, max_model_len)
    stream = bool(body.get("stream", False))
    options = body.get("stream_options")
    if options is not None and not stream:
        raise InvalidRequest("Stream options can only be defined when `stream=True`.")
    params = body.get("kv_transfer_params")
    if params is not None and not isinstance(params, dict):
        raise InvalidRequest("kv_transfer_params must be an object")
    return GenerationRequest(
        chat=chat,
        model=model,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
        kv_transfer_params=params,
    )


class NotFound(InvalidRequest):
    """vLLM's 404 NotFoundError (an unknown model)."""


def request_id(chat: bool, header: str | None) -> str:
    """vLLM's ids: `cmpl-`/`chatcmpl-` and the client's X-Request-Id when it sends one."""
    base = header or uuid.uuid4().hex
    return f"{'chatcmpl' if chat else 'cmpl'}-{base}"


def token_text(index: int) -> str:
    return _WORDS[index % len(_WORDS)]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
    }


def error(message: str, kind: str, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def response(
    req: GenerationRequest,
    rid: str,
    created: int,
    text: str,
    completion_tokens: int,
    finish_reason: str,
    kv_transfer_params: dict[str, Any] | None,
) -> dict[str, Any]:
    if req.chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": text,
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "tool_calls": [],
                "reasoning_content": None,
            },
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
        }
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": req.model,
            "choices": [choice],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": usage(req.prompt_tokens, completion_tokens),
            "prompt_logprobs": None,
            "kv_transfer_params": kv_transfer_params,
        }
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": req.model,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": None,
                "prompt_logprobs": None,
            }
        ],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": usage(req.prompt_tokens, completion_tokens),
        "kv_transfer_params": kv_transfer_params,
    }


def chunk(
    req: GenerationRequest, rid: str, created: int, text: str | None, finish_reason: str | None, first: bool
) -> dict[str, Any]:
    """One SSE chunk; a chat stream's first chunk carries the assistant role and empty content."""
    if req.chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {
            "index": 0,
            "delta": delta,
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        if finish_reason is not None:
            choice["stop_reason"] = None
        obj = "chat.completion.chunk"
    else:
        choice = {
            "index": 0,
            "text": text or "",
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
        }
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [choice]}


def usage_chunk(req: GenerationRequest, rid: str, created: int, completion_tokens: int) -> dict[str, Any]:
    """The last chunk of a stream with `stream_options.include_usage`: no choices, the usage."""
    return {
        "id": rid,
        "object": "chat.completion.chunk" if req.chat else "text_completion",
        "created": created,
        "model": req.model,
        "choices": [],
        "usage": usage(req.prompt_tokens, completion_tokens),
    }


def models(served_model: str, root: str, max_model_len: int) -> dict[str, Any]:
    created = int(time.time())
    return {
        "object": "list",
        "data": [
            {
                "id": served_model,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": root,
                "parent": None,
                "max_model_len": max_model_len,
                "permission": [],
            }
        ],
    }
