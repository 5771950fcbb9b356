"""One asyncio event loop per process for the calls a coordinator keeps open all the time.

Why: in gRPC's synchronous API every channel with a call in progress has a Python
"channel spin" thread that polls its completion queue in 0.2 s slices. A coordinator
holds an event stream to every worker for as long as it serves, so each worker's channel
kept such a thread waking five times a second whatever the load. gRPC's asyncio API waits
on one completion queue without a timer: its streams cost nothing while no message comes.
Measured side by side (BENCHMARKS.md, "Event streams on one asyncio event loop"): the
coordinator's CPU about 9% lower at a Pi pipeline's 1.5 requests a second, over 4 or 8
stages, uncapped or under a Pi 4's CPU quota; no difference beyond the noise at 7.

The coordinator's server runs here too (:class:`LoopServer`): an Infer holds no thread
while in flight. It is taken, sent to the first stage (Forward on the loop's channel),
answered by the last stage's result where the event stream is read (``AioStream``'s
``take``) and replied to, all on the loop; the server's other methods run on threads. Forward sent from any other
thread (a retry, a generation step) stays a synchronous call on the worker's ordinary
channel: handing it to the loop and its answer back cost more than that channel's thread,
which lives only while the call does. The rest of edge stays synchronous: the loop runs in
a daemon thread and hands its results to threads (:func:`submit`, :class:`AioStream`).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Coroutine, Iterator

import grpc
from grpc_health.v1 import health_pb2_grpc

from edge.errors import EdgeError
from edge.proto import edge_pb2 as pb
from edge.proto import edge_pb2_grpc as pb_grpc
from edge.transport.channels import Security, channel_options
from edge.transport.security import AioInterceptor, token_entry

__all__ = ["event_loop", "submit", "on_loop", "AioLink", "AioStream", "LoopServer"]

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


def on_loop() -> bool:
    """Whether the calling thread is the event loop's."""
    try:
        return asyncio.get_running_loop() is _loop
    except RuntimeError:
        return False


class LoopServer:
    """A ``grpc.aio`` server on the event loop, driven from any thread as a
    ``grpc.Server`` is (made by ``create_server(on_loop=True)``).

    A method whose handler is a coroutine runs on the loop (a coordinator's Infer); the
    other handlers run on ``max_workers`` threads, and a synchronous server stream's
    messages are drawn on them (``edge.transport.services``).

    Args:
        max_workers: threads for the synchronous handlers.
        options: the server's channel arguments.
        interceptors: synchronous server interceptors (run through
            :class:`~edge.transport.security.AioInterceptor`).
        max_concurrent_rpcs: calls served at once (None: no bound).
    """

    def __init__(self, max_workers: int, options: list, interceptors: list,
                 max_concurrent_rpcs: int | None):
        # The synchronous handlers' threads (edge.transport.services draws its streams'
        # messages on them too).
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="edge-rpc")

        async def make() -> grpc.aio.Server:
            return grpc.aio.server(migration_thread_pool=self.pool, options=options,
                                   interceptors=[AioInterceptor(i) for i in interceptors],
                                   maximum_concurrent_rpcs=max_concurrent_rpcs)

        self._server = submit(make()).result()

    def _call(self, method: str, *args) -> Any:
        async def call():
            return getattr(self._server, method)(*args)
        return submit(call()).result()

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._call("add_generic_rpc_handlers", handlers)

    def add_registered_method_handlers(self, service: str, handlers) -> None:
        self._call("add_registered_method_handlers", service, handlers)

    def add_insecure_port(self, address: str) -> int:
        return self._call("add_insecure_port", address)

    def add_secure_port(self, address: str, credentials) -> int:
        return self._call("add_secure_port", address, credentials)

    def start(self) -> None:
        submit(self._server.start()).result()

    def stop(self, grace: float | None) -> threading.Event:
        """Refuse new calls, cancel those still running after ``grace`` seconds; the event
        is set once every call ended."""
        stopped = threading.Event()

        async def stop() -> None:
            try:
                await self._server.stop(grace)
            finally:
                stopped.set()
                self.pool.shutdown(wait=False)
        submit(stop())
        return stopped

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return submit(self._server.wait_for_termination(timeout)).result()


class AioStream:
    """A server stream read on the event loop, iterated by a thread.

    The thread blocks on a queue with no timeout: it wakes only for a message or the end.
    Iteration raises the call's ``grpc.RpcError`` when the stream breaks (CANCELLED when
    this side closed it) and stops when the server ends it. ``take(message)``, if given,
    sees each message first, on the loop: a message it handled (True) is not queued.
    """

    _END = object()

    def __init__(self, start: Callable[[], Any], take: Callable[[Any], bool] | None = None):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._take = take
        self._task = submit(self._read(start))  # held: the loop keeps tasks by weak reference

    async def _read(self, start: Callable[[], Any]) -> None:
        try:
            call = start()
            async for message in call:
                if not self._taken(message):
                    self._queue.put(message)
            self._queue.put(self._END)
        except grpc.RpcError as e:
            self._queue.put(e)
        except asyncio.CancelledError:  # the channel was closed
            self._queue.put(_Cancelled("the stream was closed by this side"))
        except BaseException as e:  # never leave the reader blocked forever
            self._queue.put(_Cancelled(f"the stream failed: {e!r}"))
            raise

    def _taken(self, message: Any) -> bool:
        if self._take is None:
            return False
        try:
            return bool(self._take(message))
        except Exception:  # a bug: the thread gets the message (and raises it there)
            log.exception("handling a stream's message on the event loop")
            return False

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
        self._calls: set[asyncio.Task] = set()

        async def open_channel() -> grpc.aio.Channel:
            if security.tls:
                return grpc.aio.secure_channel(address, security.channel_credentials(),
                                               options=channel_options(security))
            return grpc.aio.insecure_channel(address, options=channel_options(security))

        self._channel = submit(open_channel()).result()
        self._stub = pb_grpc.WorkerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def subscribe(self, request: pb.SubscribeRequest,
                  take: Callable[[pb.Event], bool] | None = None) -> AioStream:
        """The worker's event stream (no deadline: it lasts as long as the pipeline);
        ``take(event)``, called on the loop, True when it handled the event there."""
        return AioStream(lambda: self._stub.Subscribe(request, metadata=self._metadata), take)

    def forward(self, activation: pb.Activation, timeout: float,
                done: Callable[[grpc.StatusCode, str], None]) -> None:
        """Start a Forward call; ``done(code, details)`` is called on the loop when it
        ends. Call it on the loop's own thread (:func:`on_loop`)."""
        call = self._stub.Forward(activation, timeout=timeout, metadata=self._metadata)

        async def finished() -> None:
            try:
                code, details = await call.code(), await call.details()
            except asyncio.CancelledError:  # the channel was closed under it
                return
            finally:
                self._calls.discard(task)
            done(code, details or "")
        task = asyncio.ensure_future(finished())
        self._calls.add(task)  # the loop holds tasks by weak reference only

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
