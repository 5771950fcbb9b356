"""The coordinator's OpenAI-compatible HTTP face, as a Starlette app over a Pipeline.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions`` and ``/v1/completions``
(decoder plans; streamed as server-sent events or not), ``POST /v1/embeddings`` (encoder
plans), ``POST /v1/infer`` (any plan, tensors as JSON), ``GET /metrics`` (Prometheus),
``GET /health``. Errors are OpenAI's ``{"error": {"message", "type", "code", "param"}}``.

The token loop and Infer block; they run on threads, and an event loop thread only moves
bytes. A stream whose client goes away cancels its generation, which frees its caches.
:mod:`edge.coordinator.http_server` serves the app with uvicorn.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import math
import threading
import time
from typing import Any, AsyncIterator, Callable

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edge.coordinator import openai_api as oa
from edge.coordinator.embeddings import Embedder, parse_inputs
from edge.coordinator.generate import Chunk, Generation, Generator, check_context
from edge.coordinator.inflight import InferError
from edge.errors import ConfigError, TensorError
from edge.text import ChatError, chat_messages
from edge.transport.codec import SUPPORTED_DTYPES, decode_tensors

__all__ = ["create_app", "json_arrays", "array_json"]

log = logging.getLogger(__name__)

# OpenAI's /v1/completions answers 16 tokens when max_tokens is not given; chats run to
# the end of the turn (or the plan's context).
COMPLETION_MAX_TOKENS = 16
_END = object()
# JSON spends up to ~20 bytes per number: 64 MiB is a few million values for /v1/infer.
MAX_BODY_BYTES = 64 << 20


def json_arrays(inputs: Any) -> dict[str, np.ndarray]:
    """``{"name": {"dtype", "shape", "data"}}`` to arrays (``data`` flat or nested).

    Raises:
        ApiError: 400 saying which tensor and what was expected.
    """
    if not isinstance(inputs, dict) or not inputs:
        raise oa.ApiError(400, 'inputs: expected {"NAME": {"dtype": ..., "shape": [...], '
                               f'"data": [...]}}, ...}}, got {repr(inputs)[:80]}',
                          param="inputs")
    out = {}
    for name, t in inputs.items():
        where = f"inputs.{name}"
        if not (isinstance(t, dict) and {"dtype", "shape", "data"} <= set(t)):
            raise oa.ApiError(400, f"{where}: expected an object with dtype, shape and "
                                   f"data, got {repr(t)[:80]}", param=where)
        dtype, shape = t["dtype"], t["shape"]
        # isinstance first: a list or an object as dtype is not hashable.
        if not isinstance(dtype, str) or dtype not in SUPPORTED_DTYPES or dtype == "bfloat16":
            raise oa.ApiError(400, f"{where}.dtype: expected one of "
                                   f"{', '.join(sorted(SUPPORTED_DTYPES - {'bfloat16'}))}, "
                                   f"got {repr(dtype)[:80]}", param=where)
        if not (isinstance(shape, list) and all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise oa.ApiError(400, f"{where}.shape: expected a list of sizes >= 0, got "
                                   f"{repr(shape)[:80]}", param=where)
        try:
            flat = np.asarray(t["data"], dtype=dtype).reshape(-1)
        except (TypeError, ValueError, OverflowError) as e:  # Overflow: 2**70 as int64
            raise oa.ApiError(400, f"{where}.data: expected numbers of {dtype}: {e}",
                              param=where) from None
        want = math.prod(shape)  # Python ints: a product past int64 cannot wrap to a match
        if flat.size != want:
            raise oa.ApiError(400, f"{where}: shape {shape} holds {want} values, data has "
                                   f"{flat.size}", param=where)
        out[name] = flat.reshape(shape)
    return out


def array_json(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Arrays to ``{"name": {"dtype", "shape", "data"}}`` (``data`` flat, C order)."""
    return {k: {"dtype": a.dtype.name, "shape": list(a.shape), "data": a.ravel().tolist()}
            for k, a in arrays.items()}


def _error(e: oa.ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class _Run:
    """A generation run on a thread of its own, its chunks handed to the event loop."""

    def __init__(self, generation: Generation):
        self.generation = generation
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        threading.Thread(target=self._produce, daemon=True,
                         name=f"http-gen-{generation.sequence_id[:8]}").start()

    def _put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone: the server stopped
            self.generation.cancel()

    def _produce(self) -> None:
        try:
            for chunk in self.generation:
                self._put(chunk)
            self._put(_END)
        except Exception as e:  # InferError, or a bug: the consumer reports it
            self._put(e)

    async def next(self) -> Chunk | None:
        """The next chunk, None at the end; raises what the generation raised."""
        item = await self.queue.get()
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item


class _Api:
    """The routes' handlers over one pipeline."""

    def __init__(self, pipeline: Any, model_name: str, api_key: str | None, max_body: int,
                 generator: Generator | None):
        self.pipeline = pipeline
        self.max_body = max_body
        self.model_name = model_name
        self.api_key = api_key
        self.generator = generator or Generator(pipeline)
        self.embedder = Embedder(pipeline)
        self.not_serving = ""
        pipeline.watch_serving(self._serving)

    def _serving(self, why: str) -> None:
        self.not_serving = why

    # ------------------------------------------------------------------ plumbing

    def check_key(self, request: Request) -> None:
        if self.api_key is None or request.url.path == "/health":
            return
        got = request.headers.get("authorization", "")
        if not got:
            raise oa.ApiError(401, "this server expects an API key: send the header "
                                   "'Authorization: Bearer KEY' (the cluster token or the "
                                   "coordinator's --api-key-file)", "authentication_error",
                              "missing_api_key")
        # The scheme is case-insensitive (RFC 9110 11.1: "bearer KEY" is as good); the key
        # is compared in constant time.
        scheme, _, sent = got.strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                sent.strip().encode(), self.api_key.encode()):
            raise oa.ApiError(401, "the API key sent does not match this server's",
                              "authentication_error", "invalid_api_key")

    async def body(self, request: Request) -> Any:
        """The request's JSON, read up to ``max_body`` bytes (413 past it)."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            raise self._too_large(int(declared))
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > self.max_body:
                raise self._too_large(size)
            parts.append(part)
        raw = b"".join(parts)
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise oa.ApiError(400, f"expected a JSON body, got one that does not parse: {e}",
                              code="invalid_json") from None

    def _too_large(self, size: int) -> oa.ApiError:
        return oa.ApiError(413, f"request body of {size} bytes or more; this server takes at "
                                f"most {self.max_body} (larger tensors: gRPC Infer, e.g. "
                                f"`edge infer`, which sends them as raw bytes)",
                           code="request_too_large")

    def check_model(self, model: str) -> None:
        if model and model != self.model_name:
            raise oa.ApiError(404, f"model {model!r} is not served here; this coordinator "
                                   f"serves {self.model_name!r}", "invalid_request_error",
                              "model_not_found", "model")

    # ------------------------------------------------------------------ routes

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model()]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        self.check_model(name or "?")
        return JSONResponse(self._model())

    def _model(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "edge"}

    async def health(self, request: Request) -> Response:
        if self.not_serving:
            return JSONResponse({"status": "not serving", "reason": self.not_serving}, 503)
        return JSONResponse({"status": "ok", "model": self.model_name})

    async def metrics(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

        # On a thread: collecting asks each worker for its status (up to a second each
        # when one is down), which on the event loop would stall every stream meanwhile.
        body = await run_in_threadpool(generate_latest, REGISTRY)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def infer(self, request: Request) -> Response:
        body = await self.body(request)
        if not isinstance(body, dict):
            raise oa.ApiError(400, f'expected {{"inputs": {{...}}}}, got {repr(body)[:80]}')
        arrays = json_arrays(body.get("inputs"))
        result = await run_in_threadpool(self.pipeline.infer, arrays)
        outputs = decode_tensors(result.outputs)
        return JSONResponse({"request_id": result.request_id, "latency_ms": result.latency_ms,
                             "outputs": array_json(outputs)})

    async def embeddings(self, request: Request) -> Response:
        body = await self.body(request)
        if not isinstance(body, dict):
            raise oa.ApiError(400, f"expected a JSON object, got {repr(body)[:80]}")
        model = body.get("model") or ""
        if not isinstance(model, str):  # not a 404 "model 5 is not served"
            raise oa.ApiError(400, f"model: expected a string, got {repr(model)[:80]}",
                              param="model", code="invalid_value")
        self.check_model(model)
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise oa.ApiError(400, f"encoding_format: expected float or base64, got {fmt!r}",
                              param="encoding_format")
        items = parse_inputs(body.get("input"))
        vectors, tokens = await run_in_threadpool(self.embedder.embed, items)
        dims = body.get("dimensions")
        if dims is not None and dims != len(vectors[0]):
            raise oa.ApiError(400, f"dimensions: this model's embeddings have "
                                   f"{len(vectors[0])}, got {dims!r}", param="dimensions")
        data = [{"object": "embedding", "index": i,
                 "embedding": (base64.b64encode(v.astype("<f4").tobytes()).decode()
                               if fmt == "base64" else v.tolist())}
                for i, v in enumerate(vectors)]
        return JSONResponse({"object": "list", "data": data, "model": self.model_name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def chat(self, request: Request) -> Response:
        return await self._text(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._text(request, chat=False)

    # ------------------------------------------------------------------ text

    def _prompt_ids(self, req: oa.TextRequest) -> list[int]:
        if isinstance(req.prompt, list):
            return req.prompt
        tok = self.generator.tokenizer if self.pipeline.plan.model.generation else None
        if tok is None:
            raise oa.ApiError(400, "this plan has no tokenizer (tokenizer.json beside the "
                                   "exported decoder, copied by `edge plan`): send the prompt "
                                   "as token ids to /v1/completions", code="no_tokenizer")
        if req.messages is None:
            return tok.encode(req.prompt)
        try:
            return tok.chat_ids(chat_messages(req.messages))
        except ChatError as e:
            raise oa.ApiError(400, str(e), param="messages") from None
        except ConfigError as e:  # no chat_template: the plan's fault, not the server's
            raise oa.ApiError(400, f"messages: this model has no chat template ({e}); send "
                                   f"the prompt as text to /v1/completions",
                              code="no_chat_template", param="messages") from None
        except Exception as e:  # the template's own raise_exception (jinja2.TemplateError)
            if type(e).__module__.startswith("jinja2"):
                raise oa.ApiError(400, f"messages: the model's chat template refused them: "
                                       f"{e}", param="messages") from None
            raise

    async def _text(self, request: Request, chat: bool) -> Response:
        req = oa.parse_text_request(await self.body(request), chat)
        self.check_model(req.model)
        check_context(self.pipeline.plan, 1, 0)  # a plan without generation: say so first
        if not req.max_tokens and not chat:
            req.max_tokens = COMPLETION_MAX_TOKENS
        ids = await run_in_threadpool(self._prompt_ids, req)
        generation = self.generator.start(ids, req.max_tokens, req.sampling, req.stop)
        run = _Run(generation)
        watch = asyncio.create_task(_cancel_on_disconnect(request, generation))
        try:
            # The first chunk before any header: a full queue or a refused prefill is
            # still an HTTP status, not an error inside a 200 stream.
            first = await run.next()
            rid, created = oa.new_id(chat), int(time.time())
            if req.stream:  # from here the StreamingResponse watches the client itself
                watch.cancel()
                events = self._events(run, first, req, rid, created, chat)
                return StreamingResponse(events, media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            text, chunk = [], first
            while chunk is not None:
                text.append(chunk.text)
                last, chunk = chunk, await run.next()
        except BaseException:
            generation.cancel()
            raise
        finally:
            watch.cancel()
        usage = oa.usage_dict(last.usage.prompt_tokens, last.usage.completion_tokens)
        reply = oa.chat_reply if chat else oa.completion_reply
        return JSONResponse(reply(rid, self.model_name, "".join(text),
                                  last.usage.finish_reason, usage))

    async def _events(self, run: _Run, chunk: Chunk | None, req: oa.TextRequest, rid: str,
                      created: int, chat: bool) -> AsyncIterator[bytes]:
        """The SSE body; leaving it early (the client went away) cancels the generation."""
        model = self.model_name

        def event(text: str, finish: str | None = None, usage: dict | None = None) -> bytes:
            if chat:
                delta = {"content": text} if finish is None and usage is None else {}
                return _sse(oa.chat_chunk(rid, model, created, delta, finish, usage))
            return _sse(oa.completion_chunk(rid, model, created, text, finish, usage))

        try:
            if chat:
                yield _sse(oa.chat_chunk(rid, model, created,
                                         {"role": "assistant", "content": ""}))
            while chunk is not None:
                if chunk.text:
                    yield event(chunk.text)
                if chunk.usage is not None:
                    u = chunk.usage
                    yield event("", u.finish_reason)
                    if req.include_usage:
                        yield event("", None, oa.usage_dict(u.prompt_tokens,
                                                            u.completion_tokens))
                chunk = await run.next()
        except InferError as e:
            yield _sse(oa.api_error(e).body())
        finally:
            run.generation.cancel()
        yield b"data: [DONE]\n\n"


async def _cancel_on_disconnect(request: Request, generation: Generation) -> None:
    """Cancel ``generation`` when the client goes away (its body is read by now, so the
    next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    log.info("client left; cancelling sequence %s", generation.sequence_id)
    generation.cancel()


def _handler(api: _Api, method: Callable) -> Callable:
    """A route that checks the key first and answers errors the OpenAI way."""
    async def handle(request: Request) -> Response:
        try:
            api.check_key(request)
            return await method(request)
        except oa.ApiError as e:
            return _error(e)
        except InferError as e:
            return _error(oa.api_error(e))
        except TensorError as e:
            return _error(oa.ApiError(400, str(e)))
        except Exception as e:  # noqa: BLE001 - a bug: answered 500 here, not re-raised,
            # so uvicorn keeps the client's connection (past a raise it closes it, and the
            # client's next request on it is reset)
            return _internal(request, e)
    return handle


async def _http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    kind = "not_found_error" if status == 404 else "invalid_request_error"
    message = (f"no route {request.method} {request.url.path}; this server has GET "
               f"/v1/models, POST /v1/chat/completions, /v1/completions, /v1/embeddings, "
               f"/v1/infer, GET /metrics, /health" if status in (404, 405)
               else getattr(exc, "detail", "") or "error")
    return _error(oa.ApiError(status, message, kind, "unknown_route" if status in (404, 405)
                              else None))


def _internal(request: Request, exc: Exception) -> Response:
    log.error("HTTP %s %s failed", request.method, request.url.path, exc_info=exc)
    return _error(oa.ApiError(500, f"internal error: {type(exc).__name__}: {exc}",
                              "server_error", "internal_error"))


async def _server_error(request: Request, exc: Exception) -> Response:
    return _internal(request, exc)  # outside a route's handler (Starlette's own)


def create_app(pipeline: Any, model_name: str | None = None, api_key: str | None = None,
               max_body: int = MAX_BODY_BYTES, generator: Generator | None = None) -> Starlette:
    """The HTTP app over a started pipeline.

    Args:
        pipeline: the :class:`~edge.coordinator.pipeline.Pipeline`.
        model_name: the model id clients name (default the plan's model name).
        api_key: the key required as ``Authorization: Bearer KEY`` (None: none required).
        max_body: the largest request body taken, in bytes (413 past it).
        generator: the token loop, shared with the gRPC face so that the sequences
            holding caches stay within the plan's count across both (default a new one).
    """
    api = _Api(pipeline, model_name or pipeline.plan.model.name, api_key, max_body,
               generator)
    routes = [("/v1/models", api.models, "GET"), ("/v1/models/{model:path}", api.model, "GET"),
              ("/v1/chat/completions", api.chat, "POST"),
              ("/v1/completions", api.completions, "POST"),
              ("/v1/embeddings", api.embeddings, "POST"), ("/v1/infer", api.infer, "POST"),
              ("/metrics", api.metrics, "GET"), ("/health", api.health, "GET")]
    app = Starlette(
        routes=[Route(path, _handler(api, fn), methods=[m]) for path, fn, m in routes],
        exception_handlers={HTTPException: _http_error, Exception: _server_error})
    app.state.generator = api.generator  # its slots show the sequences generating
    return app
