"""Registering edge's gRPC services so that no request can make a handler fail untidily.

The generated ``add_*Servicer_to_server`` let gRPC parse each request, and bytes that are
not the expected message then end the call as INTERNAL ("Exception deserializing
request!"), the code for a server bug. Here the handlers receive the raw bytes and parse
them themselves: a request that does not parse is INVALID_ARGUMENT, naming the message that
was expected. Error details are also clipped, so that a message echoing a huge name from a
request cannot exceed gRPC's metadata limit (which the caller would see as INTERNAL).

Memory: the server's receive limit (``create_server(max_receive_bytes=...)``) bounds every
message before it is buffered. Within it, a method can have its own, tighter bound
(``limits``), checked on the raw bytes before they are parsed. Every handler takes its
requests as a stream, even a unary method's one request (the wire is the same): then
gRPC does not hold the request while the handler runs, and after a call with a large
request, refused or not, the handler drops it and gives the free heap back to the kernel
(``malloc_trim``). gRPC receives a message in many small buffers that leave the heap
fragmented: without the trim, five refused 480 MB calls kept a worker at 1-1.5 GiB.

On an asyncio server (``create_server(on_loop=True)``, the coordinator's) a method that is
a coroutine runs on the event loop; the synchronous ones run on the server's threads, and
a synchronous server stream's messages are drawn on those threads and sent from the loop.
The same checks, with the same statuses, hold for both kinds.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
import traceback
from concurrent.futures import Executor
from types import ModuleType
from typing import Any, Callable, Iterator, Mapping

import grpc
from google.protobuf.message import DecodeError

from edge.errors import EdgeError
from edge.profiling.memory import release_free_heap

__all__ = ["add_service", "MAX_DETAILS", "TRIM_AFTER_BYTES", "Limit"]

log = logging.getLogger(__name__)

# Characters of error details sent back; gRPC's default metadata limit is 8 KiB.
MAX_DETAILS = 2000
# A call whose request is at least this large gives the free heap back when it ends.
TRIM_AFTER_BYTES = 4 << 20
# A method's bound on one request message: () -> (bytes or 0 for none, what it is, for
# the message), asked at each call (a worker's bound changes with its stage).
Limit = Callable[[], "tuple[int, str]"]


def _clip(details: str) -> str:
    if len(details) <= MAX_DETAILS:
        return details
    return details[:MAX_DETAILS - 40] + f"... ({len(details)} characters in all)"


class _Context:
    """A handler's ServicerContext whose abort clips its details."""

    def __init__(self, context: grpc.ServicerContext):
        self._context = context

    def abort(self, code: grpc.StatusCode, details: str):
        # The synchronous API raises here; the asyncio API returns a coroutine to await.
        return self._context.abort(code, _clip(details))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class _Refused(EdgeError):
    """A request refused before its handler runs (it does not parse, or is too large)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


_END = object()


class _ThreadContext:
    """An asyncio call's context for a synchronous handler running on a thread: abort
    raises :class:`_Refused` (the loop aborts the call), trailing metadata is kept for
    the loop to set, callbacks run when the call ends; the rest is read from the call."""

    def __init__(self, context):
        self._context = context
        self._loop = asyncio.get_running_loop()
        self.trailing: tuple = ()
        remaining = context.time_remaining()
        self._deadline = None if remaining is None else time.monotonic() + remaining

    def abort(self, code: grpc.StatusCode, details: str):
        raise _Refused(code, details)

    def set_trailing_metadata(self, metadata) -> None:
        self.trailing = tuple(metadata)

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def add_callback(self, callback: Callable[[], None]) -> bool:
        self._loop.call_soon_threadsafe(self._context.add_done_callback,
                                        lambda _call: callback())
        return True

    def __getattr__(self, name: str) -> Any:  # peer, auth_context, invocation_metadata
        return getattr(self._context, name)


def _parse(message_type, data: bytes, method: str):
    try:
        return message_type.FromString(data)
    except DecodeError as e:
        raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                       f"{method}: expected a serialized {message_type.DESCRIPTOR.full_name}, "
                       f"got {len(data)} bytes that do not parse ({e})") from None


def _check_size(size: int, limit: Limit | None, method: str) -> None:
    if limit is None:
        return
    most, why = limit()
    if most and size > most:
        raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                       f"{method}: a request message of {size / 2**20:.1f} MiB; expected at "
                       f"most {most / 2**20:.1f} MiB ({why})")


def _no_message(method: str, request_type) -> _Refused:
    return _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                    f"{method}: expected a {request_type.DESCRIPTOR.full_name}, got no message")


def _first_message(name: str, request_type, limit: Limit | None) -> Callable:
    """On an asyncio server: reads a call's one request message, checks and parses it."""
    async def first_message(request_iterator, ctx):
        data = None
        async for data in request_iterator:
            break
        try:
            return _request(data, name, request_type, limit)
        except _Refused as e:
            await ctx.abort(e.code, e.details)
    return first_message


def _request(data: bytes | None, name: str, request_type, limit: Limit | None) -> Any:
    """A call's one request message, checked and parsed (raises ``_Refused``)."""
    if data is None:
        raise _no_message(name, request_type)
    _check_size(len(data), limit, name)
    return _parse(request_type, data, name)


def _stream_from_threads(behaviour: Callable, first_message: Callable,
                         pool: Executor) -> Callable:
    """A synchronous server stream on an asyncio server: its messages are drawn on
    ``pool``'s threads and sent from the loop (gRPC's own bridge for such handlers did
    not end a call that the handler aborted)."""
    async def stream_out_async(request_iterator, context):
        request = await first_message(request_iterator, _Context(context))
        ctx = _ThreadContext(context)
        loop = asyncio.get_running_loop()
        stream, turn = None, threading.Lock()  # one thread in the generator at a time

        def step():
            with turn:
                return next(stream, _END)

        def close():
            with turn:  # after a step still running (a cancelled call's last one)
                getattr(stream, "close", lambda: None)()

        try:
            stream = await loop.run_in_executor(pool, lambda: iter(behaviour(request, ctx)))
            while (item := await loop.run_in_executor(pool, step)) is not _END:
                yield item
        except _Refused as e:
            if ctx.trailing:
                context.set_trailing_metadata(ctx.trailing)
            await context.abort(e.code, _clip(e.details))
        finally:
            if stream is not None:
                pool.submit(close)
    return stream_out_async


def _handler(method, behaviour: Callable, request_type, response_type,
             limit: Limit | None, pool: Executor | None = None) -> grpc.RpcMethodHandler:
    name = f"{method.containing_service.name}.{method.name}"
    serialize = response_type.SerializeToString
    make = (grpc.stream_stream_rpc_method_handler if method.server_streaming
            else grpc.stream_unary_rpc_method_handler)
    if method.client_streaming:
        def stream_in(request_iterator: Iterator[bytes], context):
            ctx = _Context(context)

            def requests():
                for b in request_iterator:
                    try:
                        _check_size(len(b), limit, name)
                        yield _parse(request_type, b, name)
                    except _Refused as e:
                        ctx.abort(e.code, e.details)

            return behaviour(requests(), ctx)

        return make(stream_in, request_deserializer=None, response_serializer=serialize)

    first_message = _first_message(name, request_type, limit)
    if inspect.iscoroutinefunction(behaviour):  # served on an asyncio server's loop
        if pool is None:
            raise TypeError(f"{name} is a coroutine: it needs an asyncio server "
                            "(create_server(on_loop=True))")
        if method.server_streaming:
            raise TypeError(f"{name}: a coroutine serves only a unary response")

        async def unary_in_async(request_iterator, context):
            ctx = _Context(context)
            return await behaviour(await first_message(request_iterator, ctx), ctx)

        return make(unary_in_async, request_deserializer=None, response_serializer=serialize)
    if inspect.isasyncgenfunction(behaviour):  # a stream served on the loop
        if pool is None or not method.server_streaming:
            raise TypeError(f"{name} is an async generator: it needs an asyncio server "
                            "(create_server(on_loop=True)) and a streamed response")

        async def stream_out_on_loop(request_iterator, context):
            ctx = _Context(context)
            async for item in behaviour(await first_message(request_iterator, ctx), ctx):
                yield item

        return make(stream_out_on_loop, request_deserializer=None,
                    response_serializer=serialize)
    if pool is not None and method.server_streaming:
        return make(_stream_from_threads(behaviour, first_message, pool),
                    request_deserializer=None, response_serializer=serialize)

    def unary_in(request_iterator: Iterator[bytes], context):
        ctx = _Context(context)
        data = next(request_iterator, None)
        size = 0 if data is None else len(data)
        try:
            try:
                request = _request(data, name, request_type, limit)
            except _Refused as e:
                ctx.abort(e.code, e.details)
            del data
            return behaviour(request, ctx)
        except BaseException as e:
            if size >= TRIM_AFTER_BYTES:  # the handler's frames hold the request
                traceback.clear_frames(e.__traceback__)
            raise
        finally:
            if size >= TRIM_AFTER_BYTES:
                data = request = None
                release_free_heap()

    return make(unary_in, request_deserializer=None, response_serializer=serialize)


def add_service(server: grpc.Server, servicer: object, messages: ModuleType,
                service: str, limits: Mapping[str, Limit] | None = None) -> None:
    """Register ``servicer``'s methods for ``service`` of the generated ``messages`` module.

    Args:
        server: the gRPC server (not started yet).
        servicer: an object with one method per RPC, as the generated servicer base has.
        messages: the generated ``*_pb2`` module that defines the service.
        service: the service's name in it (``Worker``).
        limits: per method name, its bound on one request message (each message of a
            stream), checked before the message is parsed: over it, RESOURCE_EXHAUSTED.
    """
    limits = dict(limits or {})
    desc = messages.DESCRIPTOR.services_by_name[service]
    handlers = {
        m.name: _handler(m, getattr(servicer, m.name), getattr(messages, m.input_type.name),
                         getattr(messages, m.output_type.name), limits.pop(m.name, None),
                         pool=getattr(server, "pool", None))
        for m in desc.methods
    }
    if limits:
        raise ValueError(f"limits for methods {service} does not have: {sorted(limits)}")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(desc.full_name,
                                                                          handlers),))
