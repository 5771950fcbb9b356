"""OpenAI's HTTP API as data: requests checked into what the token loop takes, replies and
errors shaped as OpenAI's (``chat.completion``, ``chat.completion.chunk``,
``text_completion``, ``{"error": {...}}``). No HTTP here: :mod:`edge.coordinator.http_api`
serves it.

What is taken: ``max_tokens`` (or ``max_completion_tokens``), ``temperature``, ``top_p``,
``seed``, ``stop`` (a string or a list), ``stream`` with ``stream_options.include_usage``,
``n`` of 1. Fields the loop has no use for (``user``, ``presence_penalty`` at 0, ...) are
ignored as OpenAI's own server ignores unknown ones; those that would change the answer
and cannot be honoured (``n`` > 1, several prompts, ``logprobs``, ``tools``) are refused.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

import grpc

from edge.coordinator.inflight import InferError
from edge.errors import EdgeError
from edge.proto import edge_pb2 as pb

__all__ = ["ApiError", "TextRequest", "parse_text_request", "api_error", "usage_dict",
           "chat_chunk", "completion_chunk", "chat_reply", "completion_reply"]

_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


class ApiError(EdgeError):
    """An HTTP error reply: ``{"error": {"message", "type", "code", "param"}}``.

    Args:
        status: the HTTP status.
        message: what was expected and what came.
        kind: OpenAI's error ``type`` (``invalid_request_error``, ...).
        code: a short machine-readable code, or None.
        param: the request field at fault, or None.
    """

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "code": self.code,
                          "param": self.param}}


def api_error(e: InferError) -> ApiError:
    """The HTTP error for a pipeline's :class:`InferError`: by its status code, and a
    RESOURCE_EXHAUSTED that retrying cannot cure (a request too large for a device) 413
    rather than 429 (a full queue)."""
    if e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not e.retryable:
        return ApiError(413, str(e), "invalid_request_error", "request_too_large")
    status, kind = _STATUS.get(e.code, (500, "server_error"))
    return ApiError(status, str(e), kind, e.code.name.lower())


def _bad(param: str, expected: str, got: Any) -> ApiError:
    shown = repr(got) if len(repr(got)) < 80 else repr(got)[:77] + "..."
    return ApiError(400, f"{param}: expected {expected}, got {shown}", param=param,
                    code="invalid_value")


def _number(body: Mapping, name: str, lo: float, hi: float, default: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise _bad(name, f"a number in [{lo:g}, {hi:g}]", v)
    return float(v)


def _count(body: Mapping, name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise _bad(name, "a whole number >= 1", v)
    return v


def _stop(body: Mapping) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    if isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
        return [s for s in stop if s]
    raise _bad("stop", "a string or a list of at most 4 strings", stop)


def _prompt(body: Mapping) -> str | list[int]:
    """A completion's prompt: a string or token ids, alone or as a list of one."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str) and p:
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                         and t >= 0 for t in p):
        return list(p)
    if isinstance(p, list) and len(p) > 1 and all(isinstance(x, (str, list)) for x in p):
        raise _bad("prompt", "one prompt (this server answers one per request)",
                   f"{len(p)} prompts")
    raise _bad("prompt", "a non-empty string or a list of token ids", p)


@dataclass
class TextRequest:
    """A chat or completion request, checked.

    Attributes:
        model: the model asked for ("" none).
        messages: the chat (chat completions), or None.
        prompt: the prompt text or token ids (completions), or None.
        max_tokens: tokens to generate at most (0: up to the plan's context).
        sampling: temperature, top_p, seed (temperature 0: greedy).
        stop: stop strings.
        stream: answer with server-sent events.
        include_usage: a last stream event with the usage.
    """

    model: str = ""
    messages: Any = None
    prompt: str | list[int] | None = None
    max_tokens: int = 0
    sampling: pb.Sampling = field(default_factory=pb.Sampling)
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def parse_text_request(body: Any, chat: bool) -> TextRequest:
    """Check a ``/v1/chat/completions`` (``chat``) or ``/v1/completions`` body.

    Raises:
        ApiError: 400 naming the field, what was expected and what came.
    """
    if not isinstance(body, Mapping):
        raise ApiError(400, f"expected a JSON object as the request body, got "
                            f"{type(body).__name__}")
    if body.get("n") not in (None, 1):
        raise _bad("n", "1 (one choice per request)", body.get("n"))
    for name in ("logprobs", "top_logprobs", "tools", "functions", "best_of", "echo",
                 "suffix"):
        if body.get(name) not in (None, False, [], 1 if name == "best_of" else None):
            raise _bad(name, "not given (not supported by this server)", body.get(name))
    model = body.get("model", "")
    if not isinstance(model, str):
        raise _bad("model", "a string", model)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", "true or false", stream)
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping):
        raise _bad("stream_options", 'an object such as {"include_usage": true}', options)
    limit = _count(body, "max_completion_tokens") or _count(body, "max_tokens") or 0
    sampling = pb.Sampling(temperature=_number(body, "temperature", 0, 2, 1.0),
                           top_p=_number(body, "top_p", 0, 1, 1.0))
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise _bad("seed", "a whole number", seed)
        sampling.seed = seed % (1 << 64) or 1  # 0 means "pick one" to the loop
    req = TextRequest(model=model, max_tokens=limit, sampling=sampling, stop=_stop(body),
                      stream=stream, include_usage=bool(options.get("include_usage")))
    if chat:
        if "messages" not in body:
            raise _bad("messages", "a list of {role, content} messages", None)
        req.messages = body["messages"]
    else:
        req.prompt = _prompt(body)
    return req


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def _head(rid: str, obj: str, model: str, created: int | None) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": created or int(time.time()), "model": model}


def chat_chunk(rid: str, model: str, created: int, delta: dict[str, Any],
               finish_reason: str | None = None,
               usage: dict[str, int] | None = None) -> dict[str, Any]:
    """A ``chat.completion.chunk``; with ``usage`` and no delta, the last one (no
    choices), as OpenAI sends for ``stream_options.include_usage``."""
    return _chunk(_head(rid, "chat.completion.chunk", model, created),
                  {"delta": delta}, finish_reason, usage)


def completion_chunk(rid: str, model: str, created: int, text: str,
                     finish_reason: str | None = None,
                     usage: dict[str, int] | None = None) -> dict[str, Any]:
    """A streamed ``text_completion`` event (OpenAI streams completions with the same
    object name as the whole reply)."""
    return _chunk(_head(rid, "text_completion", model, created), {"text": text},
                  finish_reason, usage)


def _chunk(out: dict[str, Any], content: dict[str, Any], finish_reason: str | None,
           usage: dict[str, int] | None) -> dict[str, Any]:
    """A streamed event: its one choice, or with ``usage`` none (the last event)."""
    if usage is not None:
        out["choices"], out["usage"] = [], usage
    else:
        out["choices"] = [{"index": 0, **content, "logprobs": None,
                           "finish_reason": finish_reason}]
    return out


def chat_reply(rid: str, model: str, text: str, finish_reason: str,
               usage: dict[str, int]) -> dict[str, Any]:
    out = _head(rid, "chat.completion", model, None)
    out["choices"] = [{"index": 0, "message": {"role": "assistant", "content": text},
                       "logprobs": None, "finish_reason": finish_reason}]
    out["usage"] = usage
    return out


def completion_reply(rid: str, model: str, text: str, finish_reason: str,
                     usage: dict[str, int]) -> dict[str, Any]:
    out = _head(rid, "text_completion", model, None)
    out["choices"] = [{"index": 0, "text": text, "logprobs": None,
                       "finish_reason": finish_reason}]
    out["usage"] = usage
    return out
