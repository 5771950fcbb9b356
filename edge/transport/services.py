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
"""

from __future__ import annotations

import logging
import traceback
from types import ModuleType
from typing import Any, Callable, Iterator, Mapping

import grpc
from google.protobuf.message import DecodeError

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
        self._context.abort(code, _clip(details))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _parse(message_type, data: bytes, context, method: str):
    try:
        return message_type.FromString(data)
    except DecodeError as e:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      f"{method}: expected a serialized {message_type.DESCRIPTOR.full_name}, "
                      f"got {len(data)} bytes that do not parse ({e})")


def _check_size(size: int, limit: Limit | None, context, method: str) -> None:
    if limit is None:
        return
    most, why = limit()
    if most and size > most:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"{method}: a request message of {size / 2**20:.1f} MiB; expected at "
                      f"most {most / 2**20:.1f} MiB ({why})")


def _handler(method, behaviour: Callable, request_type, response_type,
             limit: Limit | None) -> grpc.RpcMethodHandler:
    name = f"{method.containing_service.name}.{method.name}"
    serialize = response_type.SerializeToString
    make = (grpc.stream_stream_rpc_method_handler if method.server_streaming
            else grpc.stream_unary_rpc_method_handler)
    if method.client_streaming:
        def stream_in(request_iterator: Iterator[bytes], context):
            ctx = _Context(context)

            def requests():
                for b in request_iterator:
                    _check_size(len(b), limit, ctx, name)
                    yield _parse(request_type, b, ctx, name)

            return behaviour(requests(), ctx)

        return make(stream_in, request_deserializer=None, response_serializer=serialize)

    def unary_in(request_iterator: Iterator[bytes], context):
        ctx = _Context(context)
        data = next(request_iterator, None)
        if data is None:
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      f"{name}: expected a {request_type.DESCRIPTOR.full_name}, got no message")
        size = len(data)
        try:
            _check_size(size, limit, ctx, name)
            request = _parse(request_type, data, ctx, name)
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
                         getattr(messages, m.output_type.name), limits.pop(m.name, None))
        for m in desc.methods
    }
    if limits:
        raise ValueError(f"limits for methods {service} does not have: {sorted(limits)}")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(desc.full_name,
                                                                          handlers),))
