"""A client that sends Infer requests straight to the first stage and hears their results
from the last: the coordinator stays out of the data path.

Through the coordinator a request costs it three gRPC exchanges in Python (the client's
Infer, the Forward to the first stage, the result on the last stage's event stream): about
3 ms of CPU a request at a Pi pipeline's pace, 8-16% of a BERT-base stage on an emulated
Pi 4, against 2-4% with direct clients (BENCHMARKS.md). A direct client does that work
itself, on its own machine:

- the coordinator tells it the route (``WatchRoute``: the epoch, the first and the last
  stage's addresses) now and at every change, on one stream that costs it nothing while
  nothing changes;
- it opens its own results stream at the last stage (``Subscribe`` with its
  ``client_id``) and sends each request to the first stage (``Forward`` with the epoch and
  ``reply_to`` = its id); each stage passes the id on, and the last answers on that stream;
- the coordinator still deploys, watches and fails over: the last stage tells it how many
  direct results it delivered, so that it skips health checks while they flow, as it does
  for its own requests.

Nothing is lost, as through the coordinator: the client keeps every request with its
inputs until its result arrives, and sends it again when the route changes (a failover's
new epoch), when its results stream had to be opened again (results in between are lost),
when the first stage refuses it for a reason that is not its own (full, gone, another
epoch), or after ``resend_after`` seconds without a result. Inference has no side effects:
a request answered twice is answered once, with whichever result comes first.

What it needs: a bundle that workers accept (a client-role certificate may call exactly
this: see ``edge.transport.security``) and a network path to the first and last stages.
What it gives up: the coordinator's request guard (the sizes the plan's memory allows) does
not see these requests; the first stage checks their names, types and shapes, and each
worker its message limit. Generation stays with the coordinator (``InferClient``).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout  # not the builtin before 3.11
from dataclasses import dataclass, field
from typing import Mapping

import grpc
import numpy as np

from edge.coordinator.workers import CallError
from edge.proto import edge_pb2 as pb
from edge.proto import edge_pb2_grpc as pb_grpc
from edge.transport.channels import PUSHBACK, Security, create_channel
from edge.transport.codec import decode_tensors, encode_tensors

__all__ = ["DirectClient"]

log = logging.getLogger(__name__)

# The first stage's refusals that are not the request's fault: send it again (a full
# queue after a backoff; it says so with a pushback).
_WAIT_FOR_ROUTE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                             grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.CANCELLED})
_BACKOFF = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED})
_RECONNECT_S = (0.1, 2.0)  # a stream that broke is opened again after this, doubling
_SEND_TIMEOUT_S = 10.0     # a Forward returns once the request is queued
_RETRY_S = 1.0             # a refused request waits this long for a new route, then is sent


def _pushback(e: grpc.RpcError) -> bool:
    """Whether the refusal says when to try again (gRPC's ``grpc-retry-pushback-ms``)."""
    return any(k == PUSHBACK and v != "-1" for k, v in (e.trailing_metadata() or ()))


@dataclass(eq=False)
class _Pending:
    request_id: str
    tensors: list[pb.Tensor]
    future: Future = field(default_factory=Future)
    started: float = field(default_factory=time.perf_counter)
    sent_epoch: int | None = None   # None: not with any stage now
    sent_at: float = 0.0            # monotonic time of the last send
    sends: int = 0
    sending: bool = False           # a thread is sending it now
    deadline: float = float("inf")  # monotonic time after which it is no longer sent


class DirectClient:
    """Runs Infer requests on a pipeline without passing them through its coordinator.

    Args:
        address: the coordinator's ``host:port`` (for the route only).
        security: the bundle (``Security.from_dir``), as for :class:`InferClient`.
        timeout: seconds a request may take, resends included.
        resend_after: seconds without a result before a request is sent again.
        client_id: this client's id on the last stage (default: a random one).
    """

    def __init__(self, address: str, security: Security = Security(), timeout: float = 120.0,
                 resend_after: float = 60.0, client_id: str | None = None):
        self.security = security
        self.timeout = timeout
        self.resend_after = resend_after
        self.client_id = client_id or uuid.uuid4().hex
        self._coordinator = create_channel(address, security=security)
        self._lock = threading.Condition()
        self._route: pb.Route | None = None
        self._pending: dict[str, _Pending] = {}
        self._channels: dict[str, grpc.Channel] = {}
        self._listening = ""          # the last stage whose results stream is open ("": none)
        self._results_call = None     # that stream's call, to cancel on a new route
        self._trouble = ""            # why the route or the results stream failed last
        self._closed = threading.Event()
        self._threads = [threading.Thread(target=target, daemon=True, name=name)
                         for target, name in ((self._watch, "edge-direct-route"),
                                              (self._listen, "edge-direct-results"),
                                              (self._sweep, "edge-direct-resend"))]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ requests

    def submit(self, inputs: Mapping[str, np.ndarray] | list[pb.Tensor]) -> Future:
        """Send one request (returns once the first stage took it, or its deadline passed);
        a future of its :class:`pb.InferReply`."""
        tensors = inputs if isinstance(inputs, list) else encode_tensors(inputs)
        p = _Pending(uuid.uuid4().hex, tensors, deadline=time.monotonic() + self.timeout)
        with self._lock:
            if self._closed.is_set():
                raise CallError(grpc.StatusCode.CANCELLED, "the client is closed")
            self._pending[p.request_id] = p
        self._send(p)
        return p.future

    def infer_raw(self, inputs: Mapping[str, np.ndarray] | list[pb.Tensor]) -> pb.InferReply:
        """Run one request and wait for its reply (as ``InferClient.infer_raw``)."""
        future = self.submit(inputs)
        try:
            return future.result(timeout=self.timeout)
        except FutureTimeout:
            pass
        with self._lock:
            p = next((p for p in self._pending.values() if p.future is future), None)
            if p is not None:
                del self._pending[p.request_id]
            route = self._route
        if future.done():
            return future.result()
        why = f"; the pipeline: {route.unavailable}" if route and route.unavailable else ""
        why += f"; {self._trouble}" if self._trouble else ""
        raise CallError(grpc.StatusCode.DEADLINE_EXCEEDED,
                          f"no result within {self.timeout:g} s after {p.sends if p else 0} "
                          f"send(s){why}")

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one request; returns the model's outputs by name."""
        return decode_tensors(self.infer_raw(inputs).outputs)

    def _send(self, p: _Pending) -> None:
        """Hand ``p`` to the first stage of the current route once the last stage's
        results stream is open; a refusal that is not the request's waits for a new route
        (or backs off), one that is answers it."""
        with self._lock:
            if p.sending:
                return
            p.sending = True
        try:
            self._send_now(p)
        finally:
            with self._lock:
                p.sending = False

    def _send_now(self, p: _Pending) -> None:
        delay = 0.05
        while not (p.future.done() or self._closed.is_set()):
            with self._lock:
                if p.request_id not in self._pending or time.monotonic() > p.deadline:
                    return
                if not self._lock.wait_for(self._ready, timeout=1.0):
                    continue
                route = self._route
                p.sent_epoch, p.sent_at = route.epoch, time.monotonic()
                p.sends += 1
            message = pb.Activation(request_id=p.request_id, epoch=route.epoch,
                                    tensors=p.tensors, reply_to=self.client_id)
            try:
                self._stub(route.first_address).Forward(message, timeout=_SEND_TIMEOUT_S)
                return
            except grpc.RpcError as e:
                code = e.code()
                if code in _BACKOFF and _pushback(e):  # a full queue, not too large
                    with self._lock:
                        p.sent_epoch = None
                    time.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                if code in _WAIT_FOR_ROUTE:
                    # The coordinator hears of it too (its stream, its checks) and tells
                    # the new route: _watch sends the request again then.
                    with self._lock:
                        p.sent_epoch = None
                    log.debug("request %s waits for a new route: %s: %s", p.request_id,
                              code.name, e.details())
                    return
                self._answer(p.request_id, error=CallError(
                    code, f"the first stage ({route.first_address}) refused request "
                          f"{p.request_id}: {e.details()}"))
                return

    def _ready(self) -> bool:
        """A route that serves, and this client's stream open at its last stage."""
        r = self._route
        return self._closed.is_set() or (r is not None and not r.unavailable
                                         and bool(r.first_address)
                                         and self._listening == r.last_address)

    def _answer(self, request_id: str, reply: pb.InferReply | None = None,
                error: Exception | None = None) -> None:
        with self._lock:
            p = self._pending.pop(request_id, None)
        if p is None or p.future.done():
            return  # answered already (a request sent twice is answered twice)
        if error is not None:
            p.future.set_exception(error)
        else:
            reply.latency_ms = (time.perf_counter() - p.started) * 1e3
            p.future.set_result(reply)

    def _resend(self, why: str, which=lambda p: True) -> None:
        """Send again, each on a thread of its own, the pending requests ``which`` picks."""
        with self._lock:
            again = [p for p in self._pending.values() if not p.sending and which(p)]
            for p in again:
                p.sent_epoch = None
        if again:
            log.info("sending %d request(s) again: %s", len(again), why)
        for p in again:
            threading.Thread(target=self._send, args=(p,), daemon=True,
                             name="edge-direct-send").start()

    # ------------------------------------------------------------------ streams

    def _watch(self) -> None:
        """Follow the coordinator's route; a new epoch sends what is pending again."""
        delay = _RECONNECT_S[0]
        stub = pb_grpc.CoordinatorStub(self._coordinator)
        while not self._closed.is_set():
            try:
                for route in stub.WatchRoute(pb.RouteRequest()):
                    delay, self._trouble = _RECONNECT_S[0], ""
                    self._new_route(route)
            except grpc.RpcError as e:
                if self._closed.is_set():
                    return
                self._trouble = f"the coordinator's route: {e.code().name}: {e.details()}"
                log.debug("%s", self._trouble)
            if self._closed.wait(delay):
                return
            delay = min(delay * 2, _RECONNECT_S[1])

    def _new_route(self, route: pb.Route) -> None:
        with self._lock:
            old, self._route = self._route, route
            if old is not None and old.last_address != route.last_address \
                    and self._results_call is not None:
                self._results_call.cancel()  # _listen opens the new last stage's
            self._lock.notify_all()
        if old is None or route.epoch != old.epoch:
            # Those sent under the old one, and those that waited for a new one.
            self._resend(f"the pipeline is now epoch {route.epoch}",
                         lambda p: p.sent_epoch != route.epoch)

    def _listen(self) -> None:
        """Hold this client's results stream at the current last stage."""
        delay = _RECONNECT_S[0]
        opened_before = False
        while not self._closed.is_set():
            with self._lock:
                self._lock.wait_for(lambda: self._closed.is_set() or (
                    self._route is not None and bool(self._route.last_address)))
                if self._closed.is_set():
                    return
                address = self._route.last_address
                call = self._stub(address).Subscribe(pb.SubscribeRequest(
                    client_id=self.client_id))
                self._results_call = call
            try:
                for event in call:
                    kind = event.WhichOneof("kind")
                    if kind is None:  # the stream is open: requests may go
                        delay, opened = _RECONNECT_S[0], time.monotonic()
                        self._trouble = ""
                        with self._lock:
                            self._listening = address
                            self._lock.notify_all()
                        if opened_before:  # results may have come while it was closed
                            self._resend("the results stream was opened again",
                                         lambda p: p.sent_epoch is not None
                                         and p.sent_at < opened)
                        opened_before = True
                    elif kind == "result":
                        r = event.result
                        self._answer(r.request_id, pb.InferReply(
                            request_id=r.request_id, outputs=r.tensors, timings=r.timings))
            except grpc.RpcError as e:
                if self._closed.is_set():
                    return
                self._trouble = (f"the results stream at the last stage ({address}): "
                                 f"{e.code().name}: {e.details()}")
                log.debug("%s", self._trouble)
            with self._lock:
                self._listening = ""
                self._results_call = None
            if self._closed.wait(delay):
                return
            delay = min(delay * 2, _RECONNECT_S[1])

    def _sweep(self) -> None:
        """Send again what waited ``resend_after`` seconds for its result, and what a
        stage refused over a second ago without the route changing since (a blip)."""
        period = max(0.05, min(_RETRY_S, self.resend_after / 4))
        while not self._closed.wait(period):
            now = time.monotonic()
            self._resend(f"no result within {self.resend_after:g} s, or refused",
                         lambda p: now - p.sent_at > (_RETRY_S if p.sent_epoch is None
                                                      else self.resend_after))

    def _stub(self, address: str) -> pb_grpc.WorkerStub:
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = create_channel(address,
                                                                   security=self.security)
        return pb_grpc.WorkerStub(channel)

    # ------------------------------------------------------------------ life

    def close(self) -> None:
        """Stop; requests still waiting fail with CANCELLED."""
        self._closed.set()
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
            call = self._results_call
            self._lock.notify_all()
        if call is not None:
            call.cancel()
        for p in pending:
            if not p.future.done():
                p.future.set_exception(CallError(grpc.StatusCode.CANCELLED,
                                                   "the client was closed"))
        self._coordinator.close()
        for channel in list(self._channels.values()):
            channel.close()

    def __enter__(self) -> "DirectClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
