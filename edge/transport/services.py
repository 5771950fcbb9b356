"""Registering edge's gRPC services so that no request can make a handler fail untidily.

The generated ``add_*Servicer_to_server`` let gRPC parse each request, and bytes that are
not the expected message then end the call as INTERNAL ("Exception deserializing
request!"), the code for a server bug. Here the handlers receive the raw bytes and parse
them themselves: a request that does not parse is INVALID_ARGUMENT, naming the message that
was expected. Error details are also clipped, so that a message echoing a huge name from a
request cannot exceed gRPC's metadata limit (which the caller would see as INTERNAL).
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any, Callable, Iterator

import grpc
from google.protobuf.message import DecodeError

__all__ = ["add_service", "MAX_DETAILS"]

log = logging.getLogger(__name__)

# Characters of error details sent back; gRPC's default metadata limit is 8 KiB.
MAX_DETAILS = 2000


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


def _handler(method, behaviour: Callable, request_type, response_type) -> grpc.RpcMethodHandler:
    name = f"{method.containing_service.name}.{method.name}"
    serialize = response_type.SerializeToString
    if method.client_streaming:
        def stream_in(request_iterator: Iterator[bytes], context):
            ctx = _Context(context)
            requests = (_parse(request_type, b, ctx, name) for b in request_iterator)
            return behaviour(requests, ctx)

        make = (grpc.stream_stream_rpc_method_handler if method.server_streaming
                else grpc.stream_unary_rpc_method_handler)
        return make(stream_in, request_deserializer=None, response_serializer=serialize)

    def unary_in(request: bytes, context):
        ctx = _Context(context)
        return behaviour(_parse(request_type, request, ctx, name), ctx)

    make = (grpc.unary_stream_rpc_method_handler if method.server_streaming
            else grpc.unary_unary_rpc_method_handler)
    return make(unary_in, request_deserializer=None, response_serializer=serialize)


def add_service(server: grpc.Server, servicer: object, messages: ModuleType,
                service: str) -> None:
    """Register ``servicer``'s methods for ``service`` of the generated ``messages`` module.

    Args:
        server: the gRPC server (not started yet).
        servicer: an object with one method per RPC, as the generated servicer base has.
        messages: the generated ``*_pb2`` module that defines the service.
        service: the service's name in it (``Worker``).
    """
    desc = messages.DESCRIPTOR.services_by_name[service]
    handlers = {
        m.name: _handler(m, getattr(servicer, m.name), getattr(messages, m.input_type.name),
                         getattr(messages, m.output_type.name))
        for m in desc.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(desc.full_name,
                                                                          handlers),))
