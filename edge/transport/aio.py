"""One asyncio event loop per process for the calls a coordinator keeps open all the time.

Why: in gRPC's synchronous API every channel with a call in progress has a Python
"channel spin" thread that polls its completion queue in 0.2 s slices. A coordinator
holds an event stream to every worker for as long as it serves, so each worker's channel
kept such a thread waking five times a second whatever the load. gRPC's asyncio API waits
on one completion queue without a timer: its streams cost nothing while no message comes.
Measured side by side (BENCHMARKS.md, "Event streams on one asyncio event loop"): the
coordinator's CPU about 9% lower at a Pi pipeline's 1.5 requests a second, over 4 or 8
stages, uncapped or under a Pi 4's CPU quota; no difference beyond the noise at 7.

Only the event streams and health checks run here. Forward, one call per request, stays a
synchronous call made by the thread that has the request: handing it to the loop and its
answer back cost more than its channel's thread, which lives only while the call does.
The rest of edge stays synchronous: the loop runs in a daemon thread and hands its results
to threads (:func:`submit`, :class:`AioStream`).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Coroutine, Iterator

import grpc
from grpc_health.v1 import health_pb2_grpc

from edge.errors import EdgeError
from edge.proto import edge_pb2 as pb
from edge.proto import edge_pb2_grpc as pb_grpc
from edge.transport.channels import Security, channel_options
from edge.transport.security import token_entry

__all__ = ["event_loop", "submit", "AioLink", "AioStream"]

log = logging.getLogger(__name__)

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def event_loop() -> asyncio.AbstractEventLoop:
    """The process's gRPC event loop, started on first use in a daemon thread."""
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            started = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(started.set)
                loop.run_forever()

            threading.Thread(target=run, name="edge-grpc-loop", daemon=True).start()
            started.wait()
            _loop = loop
        return _loop


def submit(coroutine: Coroutine) -> Future:
    """Run ``coroutine`` on the event loop; a future of its result for any thread."""
    return asyncio.run_coroutine_threadsafe(coroutine, event_loop())


class AioStream:
    """A server stream read on the event loop, iterated by a thread.

    The thread blocks on a queue with no timeout: it wakes only for a message or the end.
    Iteration raises the call's ``grpc.RpcError`` when the stream breaks (CANCELLED when
    this side closed it) and stops when the server ends it.
    """

    _END = object()

    def __init__(self, start: Callable[[], Any]):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._task = submit(self._read(start))  # held: the loop keeps tasks by weak reference

    async def _read(self, start: Callable[[], Any]) -> None:
        try:
            call = start()
            async for message in call:
                self._queue.put(message)
            self._queue.put(self._END)
        except grpc.RpcError as e:
            self._queue.put(e)
        except asyncio.CancelledError:  # the channel was closed
            self._queue.put(_Cancelled("the stream was closed by this side"))
        except BaseException as e:  # never leave the reader blocked forever
            self._queue.put(_Cancelled(f"the stream failed: {e!r}"))
            raise

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        item = self._queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item


class _Cancelled(EdgeError, grpc.RpcError):
    """A stream ended by this side, raised as gRPC raises a cancelled call."""

    def __init__(self, details: str):
        super().__init__(details)
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.CANCELLED

    def details(self) -> str:
        return self._details


class AioLink:
    """A worker's long-lived calls on the event loop: its event stream and health checks.

    Each call carries the cluster token, if any, in its metadata; with a bundle the channel
    is mutual TLS and checks the worker's certificate against the cluster name, as
    :func:`~edge.transport.channels.create_channel` does.

    Args:
        address: the worker's ``host:port``.
        security: how to reach it (checked by ``require_safe``).
    """

    def __init__(self, address: str, security: Security):
        security.require_safe(address, "connect to")
        self.address = address
        self._metadata = (token_entry(security.token),) if security.token else None

        async def open_channel() -> grpc.aio.Channel:
            if security.tls:
                return grpc.aio.secure_channel(address, security.channel_credentials(),
                                               options=channel_options(security))
            return grpc.aio.insecure_channel(address, options=channel_options(security))

        self._channel = submit(open_channel()).result()
        self._stub = pb_grpc.WorkerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def subscribe(self, request: pb.SubscribeRequest) -> AioStream:
        """The worker's event stream (no deadline: it lasts as long as the pipeline)."""
        return AioStream(lambda: self._stub.Subscribe(request, metadata=self._metadata))

    def health(self, request, timeout: float) -> Future:
        """A future of the worker's health check reply."""
        async def check():
            return await self._health.Check(request, timeout=timeout, metadata=self._metadata)
        return submit(check())

    def close(self, timeout: float = 5.0) -> None:
        """Close the channel: calls in progress end with CANCELLED."""
        try:
            submit(self._channel.close()).result(timeout)
        except Exception as e:  # closing must not raise over what the caller is doing
            log.debug("closing the channel to %s: %r", self.address, e)
