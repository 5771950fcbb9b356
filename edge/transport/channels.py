"""gRPC servers and channels with edge's options in one place.

Every server and channel of edge is made by :func:`create_server` and
:func:`create_channel`, so their :class:`Security` (mutual TLS, the cluster token, the
refusal of plaintext off loopback; see ``edge.transport.security``) applies everywhere.
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc

from edge.transport.security import CLUSTER_NAME, Security, is_loopback, token_interceptor

__all__ = ["Deadlines", "Security", "MAX_MESSAGE_BYTES", "MIN_RECEIVE_BYTES", "PUSHBACK",
           "create_server",
           "create_channel", "channel_options", "serialized_unary", "is_loopback",
           "wait_for_signal"]

log = logging.getLogger(__name__)

# gRPC's Python layer waits for a stream's next message (and a future's result) in slices
# of 0.1 s, so that the main thread sees Ctrl-C: every open stream wakes its thread ten
# times a second. A coordinator holds one event stream per worker: with eight, those
# wake-ups were 4-5 ms of CPU a second, a sixth of an emulated Pi 4's share per request
# at its throughput. One second still lets a blocked main thread see Ctrl-C in time.
_WAIT_SLICE_S = 1.0


def _longer_wait_slices() -> None:
    """Set gRPC's wait slice to ``_WAIT_SLICE_S``: done by the first server or channel made
    here, before any of their calls waits (not at import, which runs nothing)."""
    try:  # a private constant: if a gRPC release drops it, the slices are merely shorter
        from grpc import _common as grpc_common
    except ImportError:  # pragma: no cover
        return
    if getattr(grpc_common, "MAXIMUM_WAIT_TIMEOUT", _WAIT_SLICE_S) < _WAIT_SLICE_S:
        grpc_common.MAXIMUM_WAIT_TIMEOUT = _WAIT_SLICE_S

# Activations of a large model at a long sequence exceed gRPC's 4 MiB default; raise the
# limit rather than split tensors. Shards travel in chunks, so this is not their bound.
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
# gRPC's trailer that tells a client when to retry: after this many ms (-1: never).
PUSHBACK = "grpc-retry-pushback-ms"

_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Notice a dead peer on an idle link (a Pi unplugged) within seconds, not hours.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # A worker that comes back is reached within a second or two, not after gRPC's
    # default reconnect backoff of up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    # A fixed flow-control window instead of gRPC's bandwidth probes. By default every
    # message received sends a PING to size the window, and its answer wakes gRPC's
    # event-engine threads. Without them a coordinator spends 0.5-1 ms of CPU a second
    # less under load and 2.3 ms less idle, a worker 6-14% less a hop (BENCHMARKS.md,
    # "Flow-control windows without probes"). 8 MiB in flight per stream covers any LAN's
    # bandwidth-delay product (a gigabit link at 1 ms holds 125 KB), so a cut never waits
    # for a window update.
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 8 << 20),
]
_SERVER_OPTIONS = [o for o in _OPTIONS if o[0] != "grpc.max_receive_message_length"] + [
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.so_reuseport", 0),
]
# The smallest receive limit a server takes: every control message fits many times over.
MIN_RECEIVE_BYTES = 4 << 20


@dataclass(frozen=True)
class Deadlines:
    """Seconds each kind of remote call may take. Every remote call has one."""

    control: float = 10.0       # status, health, configure, has-shard
    forward: float = 30.0       # handing activations to the next hop (queued, not computed)
    upload: float = 600.0       # a whole shard upload
    load: float = 300.0         # a worker loading its shard (Configure)
    infer: float = 120.0        # one request end to end
    ready: float = 60.0         # waiting for a worker to become healthy


def create_server(address: str, *, max_workers: int = 16, max_concurrent_rpcs: int | None = None,
                  security: Security = Security(),
                  max_receive_bytes: int = MAX_MESSAGE_BYTES,
                  on_loop: bool = False) -> tuple[grpc.Server, int]:
    """A gRPC server bound to ``address`` (port 0 picks a free port).

    Args:
        address: ``host:port``.
        max_workers: handler threads.
        max_concurrent_rpcs: calls served at once; past it, gRPC answers
            RESOURCE_EXHAUSTED at once instead of queueing without bound (None: no bound).
        security: how to secure it: mutual TLS if it has a bundle, the token checked on
            every call of every service (but health) if it has one.
        max_receive_bytes: the largest request message it takes (at least
            :data:`MIN_RECEIVE_BYTES`). gRPC reads a message's length from its 5-byte
            header and refuses a longer one with RESOURCE_EXHAUSTED before buffering its
            body, for every caller, token or not: the one bound that holds before
            authentication. Size it from what the server can hold, not from the 512 MiB
            that channels allow.
        on_loop: an asyncio server on the process's event loop
            (:class:`edge.transport.aio.LoopServer`): a method that is a coroutine runs on
            the loop, the others on the ``max_workers`` threads.

    Returns:
        The server, not started, and the bound port.

    Raises:
        SecurityError: plaintext on a non-loopback address without ``insecure``.
    """
    security.require_safe(address, "listen on")
    _longer_wait_slices()
    limit = max(MIN_RECEIVE_BYTES, min(int(max_receive_bytes), MAX_MESSAGE_BYTES))
    options = _SERVER_OPTIONS + [("grpc.max_receive_message_length", limit)]
    if on_loop:
        from edge.transport.aio import LoopServer  # aio imports this module

        server = LoopServer(max_workers, options, security.server_interceptors(),
                            max_concurrent_rpcs)
    else:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                             options=options, interceptors=security.server_interceptors(),
                             maximum_concurrent_rpcs=max_concurrent_rpcs)
    if security.tls:
        port = server.add_secure_port(address, security.server_credentials())
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return server, port


def create_channel(address: str, *, security: Security = Security(),
                   options: list[tuple[str, object]] | None = None) -> grpc.Channel:
    """A channel to ``address`` with edge's message limits and keepalives.

    ``options`` are added to edge's (a service config with a retry policy, say).

    With a bundle the server must present a certificate of the cluster CA (checked against
    the cluster name, not the address: see ``edge.transport.security``); with a token every
    call carries it.

    Raises:
        SecurityError: plaintext to a non-loopback address without ``insecure``.
    """
    security.require_safe(address, "connect to")
    _longer_wait_slices()
    if security.tls:
        channel = grpc.secure_channel(address, security.channel_credentials(),
                                      options=channel_options(security, options))
    else:
        channel = grpc.insecure_channel(address, options=channel_options(security, options))
    if security.token:
        channel = grpc.intercept_channel(channel, token_interceptor(security.token))
    return channel


def channel_options(security: Security, options: list[tuple[str, object]] | None = None
                    ) -> list[tuple[str, object]]:
    """Edge's options for a channel secured by ``security``, then ``options``: with TLS the
    server's certificate is checked against the cluster name, not the address."""
    tls = [("grpc.ssl_target_name_override", CLUSTER_NAME)] if security.tls else []
    return _OPTIONS + tls + list(options or ())


def serialized_unary(channel: grpc.Channel, method, response_type) -> grpc.UnaryUnaryMultiCallable:
    """A unary call that takes its request already serialized (``bytes``).

    For requests whose bytes were built without a message object (see
    ``edge.transport.codec.encode_activation``); the server sees an ordinary call.

    Args:
        channel: the channel to call on.
        method: the method's descriptor
            (``pb.DESCRIPTOR.services_by_name[...].methods_by_name[...]``).
        response_type: the reply's message class.
    """
    path = f"/{method.containing_service.full_name}/{method.name}"
    return channel.unary_unary(path, request_serializer=None,
                               response_deserializer=response_type.FromString)


def catch_stop_signals() -> threading.Event:
    """From now on SIGTERM and SIGINT set the returned event instead of killing the
    process. Call it before saying "ready" (a port file, systemd's READY=1): whoever
    reads that may send SIGTERM at once, and it must stop gracefully."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def wait_for_signal(stop: threading.Event | None = None) -> None:
    """Block until SIGTERM or SIGINT: how `edge worker` and `edge coordinator` run.

    Args:
        stop: the event of an earlier :func:`catch_stop_signals` (default: catch them now).
    """
    stop = stop or catch_stop_signals()
    while not stop.wait(0.5):
        pass
