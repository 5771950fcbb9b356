"""How the coordinator talks to a worker: the :class:`WorkerClient` protocol, its gRPC
implementation, and a stage placed on a worker.

Everything the coordinator does to a worker (deploy, forward, listen, probe, ask its
status) goes through :class:`WorkerClient`. The coordinator's logic (retries, failover,
take-over) then runs the same over real workers (:class:`GrpcWorker`) and over the
in-memory ones of :mod:`edge.coordinator.fake`, which test it in milliseconds.

Failures are raised as ``grpc.RpcError`` with ``code()`` and ``details()`` whichever the
implementation (a fake raises :class:`CallError`): callers decide by status code.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Protocol, runtime_checkable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge.errors import EdgeError
from edge.proto import edge_pb2 as pb
from edge.proto import edge_pb2_grpc as pb_grpc
from edge.transport.aio import AioLink, on_loop
from edge.transport.channels import Security, create_channel

if TYPE_CHECKING:
    from edge.planning.plan import Stage

__all__ = ["WorkerClient", "WorkerFactory", "GrpcWorker", "Link", "StageWorker", "CallError",
           "Done", "SERVING", "grpc_workers", "WorkerPool"]

SERVING = health_pb2.HealthCheckResponse.SERVING
_HEALTH = health_pb2.HealthCheckRequest(service="edge.v1.Worker")

# Told how a Forward ended: (code, details); OK when the worker queued the request.
Done = Callable[[grpc.StatusCode, str], None]


class CallError(EdgeError, grpc.RpcError):
    """A failed call, as gRPC reports one: ``code()`` and ``details()`` (a grpc.RpcError, so
    callers handle a fake's failures and gRPC's alike)."""

    def __init__(self, code: grpc.StatusCode, details: str = ""):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@runtime_checkable
class WorkerClient(Protocol):
    """One worker, as the coordinator uses it. Failures raise ``grpc.RpcError``.

    Attributes:
        address: the worker's ``host:port`` (the device's address in the plan).
    """

    address: str

    def forward(self, activation: pb.Activation, timeout: float, done: Done) -> None:
        """Hand ``activation`` to the worker without waiting; ``done(code, details)`` is
        called once the worker queued it (OK) or refused it. Not called for a call this
        side cancelled (the client was closed)."""

    def subscribe(self, coordinator_id: str,
                  results: Callable[[pb.Event], None] | None = None) -> Iterator[pb.Event]:
        """The worker's results and failures, until the stream breaks (raises).
        ``results``: where the stream is read on the event loop, each result event (and
        delivered count) is given to it there instead (its request's Infer is answered on
        the loop, without waking a thread); a client without a loop yields them as the
        others."""

    def release(self, coordinator_id: str, timeout: float) -> None:
        """Let go of the worker: ``coordinator_id`` will not subscribe to it
        (:func:`edge.coordinator.deploy.let_go`)."""

    def status(self, timeout: float) -> pb.WorkerStatus: ...

    def health(self, timeout: float) -> Future:
        """A future of the worker's ``HealthCheckResponse.ServingStatus``."""

    def has_shard(self, sha256: str, timeout: float) -> bool: ...

    def upload(self, chunks: Iterator[pb.ShardChunk], timeout: float) -> None: ...

    def configure(self, config: pb.StageConfig, timeout: float) -> pb.ConfigureReply: ...

    def profile(self, since: float, timeout: float) -> pb.WorkerProfile: ...

    def close(self) -> None: ...


# Makes the client of the worker at an address; the coordinator keeps one per address.
WorkerFactory = Callable[[str], WorkerClient]


@dataclass
class Link:
    """The channels to one worker, with their stubs; outlives the stage it serves.

    Calls made for a request or an operator (Forward, configure, upload, status) go
    through ``channel``. The calls that run whatever the load (the event stream, health
    checks) go through ``aio``, on the process's event loop, where an open stream costs no
    CPU while it waits.
    """

    channel: grpc.Channel
    stub: pb_grpc.WorkerStub
    health: health_pb2_grpc.HealthStub
    address: str = ""
    aio: AioLink | None = None

    @staticmethod
    def open(address: str, security: Security, on_loop: bool = False) -> "Link":
        """Open the channel; ``on_loop``: the event loop's too (a link the coordinator keeps
        for as long as it serves, not a one-off handle)."""
        channel = create_channel(address, security=security)
        return Link(channel, pb_grpc.WorkerStub(channel), health_pb2_grpc.HealthStub(channel),
                    address, AioLink(address, security) if on_loop else None)

    def handle(self, stage: "Stage"):
        """A :class:`~edge.coordinator.deploy.WorkerHandle` of ``stage`` on this channel."""
        from edge.coordinator.deploy import WorkerHandle  # deploy imports this module

        return WorkerHandle(stage, self.channel, self.stub, self.health)

    def close(self) -> None:
        self.channel.close()
        if self.aio is not None:
            self.aio.close()


class GrpcWorker:
    """:class:`WorkerClient` over gRPC stubs (a :class:`Link` or a ``WorkerHandle``).

    The stubs are read at each call, so a caller may swap them (tests point a handle at
    another worker)."""

    def __init__(self, stubs, address: str):
        self.stubs = stubs
        self.address = address

    def forward(self, activation: pb.Activation, timeout: float, done: Done) -> None:
        aio = getattr(self.stubs, "aio", None)
        if aio is not None and on_loop():  # an Infer served on the loop: stays there
            aio.forward(activation, timeout, done)
            return
        call = self.stubs.stub.Forward.future(activation, timeout=timeout)

        def finished(c) -> None:
            if not c.cancelled():
                done(c.code(), c.details() or "")
        call.add_done_callback(finished)

    def subscribe(self, coordinator_id: str,
                  results: Callable[[pb.Event], None] | None = None) -> Iterator[pb.Event]:
        # No deadline: the stream lasts as long as the pipeline; keepalives and health
        # checks tell when its device is gone.
        request = pb.SubscribeRequest(coordinator_id=coordinator_id)
        aio = getattr(self.stubs, "aio", None)
        if aio is not None:
            def take(event: pb.Event) -> bool:
                if event.WhichOneof("kind") not in ("result", "delivered"):
                    return False  # failures wake the device's listener thread
                results(event)
                return True
            return aio.subscribe(request, take if results is not None else None)
        return self.stubs.stub.Subscribe(request)

    def release(self, coordinator_id: str, timeout: float) -> None:
        # A stream that ends at once. (A worker older than ``release`` takes it for the
        # owner's stream, which lets go of it too, until the deadline ends it.)
        request = pb.SubscribeRequest(coordinator_id=coordinator_id, release=True)
        for _ in self.stubs.stub.Subscribe(request, timeout=timeout):
            pass

    def status(self, timeout: float) -> pb.WorkerStatus:
        return self.stubs.stub.GetStatus(pb.StatusRequest(), timeout=timeout)

    def health(self, timeout: float) -> Future:
        out: Future = Future()
        aio = getattr(self.stubs, "aio", None)
        call = aio.health(_HEALTH, timeout) if aio is not None \
            else self.stubs.health.Check.future(_HEALTH, timeout=timeout)

        def finished(c) -> None:
            if c.cancelled():  # the channel was closed under it
                out.set_exception(CallError(grpc.StatusCode.CANCELLED, "cancelled"))
                return
            try:
                out.set_result(c.result().status)
            except grpc.RpcError as e:
                out.set_exception(e)
            except Exception as e:  # never leave the caller waiting on a future
                out.set_exception(CallError(grpc.StatusCode.UNKNOWN, repr(e)))
        call.add_done_callback(finished)
        return out

    def has_shard(self, sha256: str, timeout: float) -> bool:
        return self.stubs.stub.HasShard(pb.ShardRef(sha256=sha256), timeout=timeout).present

    def upload(self, chunks: Iterator[pb.ShardChunk], timeout: float) -> None:
        self.stubs.stub.UploadShard(chunks, timeout=timeout)

    def configure(self, config: pb.StageConfig, timeout: float) -> pb.ConfigureReply:
        return self.stubs.stub.Configure(config, timeout=timeout)

    def profile(self, since: float, timeout: float) -> pb.WorkerProfile:
        return self.stubs.stub.GetProfile(pb.ProfileRequest(since=since), timeout=timeout)

    def close(self) -> None:
        self.stubs.close()


def grpc_workers(security: Security) -> WorkerFactory:
    """The default factory: a channel per address, opened with ``security``."""
    return lambda address: GrpcWorker(Link.open(address, security, on_loop=True), address)


@dataclass
class StageWorker:
    """A stage and the client of the worker it is deployed on."""

    stage: "Stage"
    client: WorkerClient = field(repr=False)

    @property
    def label(self) -> str:
        d = self.stage.device
        return f"device {d.name} ({d.address}, stage {self.stage.index})"


class WorkerPool:
    """One client per address, made by ``factory`` on first use and kept across plans: a
    failover re-uses the channels it already has.

    Args:
        factory: makes the client of the worker at an address.
    """

    def __init__(self, factory: WorkerFactory):
        self.factory = factory
        self._lock = threading.Lock()
        self._clients: dict[str, WorkerClient] = {}

    def __call__(self, address: str) -> WorkerClient:
        with self._lock:
            if address not in self._clients:
                self._clients[address] = self.factory(address)
            return self._clients[address]

    def place(self, stage: "Stage") -> StageWorker:
        """``stage`` on the worker at its device's address."""
        return StageWorker(stage, self(stage.device.address))

    def close(self) -> None:
        with self._lock:
            clients = list(self._clients.values())
        for client in clients:
            client.close()
