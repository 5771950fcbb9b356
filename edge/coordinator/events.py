"""Listening to the workers' event streams: results from the last stage, failures from any.

One thread per device in the pipeline consumes its worker's Subscribe stream while the
device serves a stage, and reconnects with backoff when the stream breaks. Where the stream
is read on the event loop (``edge.transport.aio``), results are answered there, as they
arrive, and the thread wakes only for failures and for the stream's end. A result
answers its request whatever the epoch; a failure under the current epoch either
schedules its request to be sent again (a cause that is not the request's) or answers it.
A broken stream makes its device suspect; without failover, it fails every request in
flight at once. A stream the worker ends with ABORTED means another coordinator took the
worker over.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import grpc

from edge.coordinator.inflight import RETRY, InferError, InFlight
from edge.coordinator.state import Current
from edge.coordinator.workers import StageWorker
from edge.proto import edge_pb2 as pb

__all__ = ["Listeners", "status_code"]

log = logging.getLogger(__name__)

# A broken stream with one of these codes says the device or the connection is gone; any
# other is the worker refusing the stream.
_GONE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                   grpc.StatusCode.DEADLINE_EXCEEDED})


def status_code(value: int) -> grpc.StatusCode:
    """The grpc.StatusCode whose number is ``value`` (UNKNOWN for none)."""
    return next((c for c in grpc.StatusCode if c.value[0] == value), grpc.StatusCode.UNKNOWN)


class Listeners:
    """The event streams of the pipeline's workers.

    Args:
        current: the deployment that serves.
        requests: the in-flight table that results and failures answer.
        failover: retry failures that are not the request's fault, and suspect a device
            whose stream broke (False: fail what is in flight).
        suspect: told ``(address, why)`` of a device whose stream broke.
        on_taken: told ``(worker, why)`` when a worker ends our stream with ABORTED.
        why: what is known about why a worker stopped answering ("; ..." or "").
    """

    def __init__(self, current: Current, requests: InFlight, failover: bool,
                 suspect: Callable[[str, str], None],
                 on_taken: Callable[[StageWorker, str], None],
                 why: Callable[[StageWorker], str]):
        self.current = current
        self.requests = requests
        self.failover = failover
        self.suspect = suspect
        self.on_taken = on_taken
        self.why = why
        self._threads: dict[str, threading.Thread] = {}
        self._refused: dict[str, grpc.StatusCode] = {}  # logged once per address

    def listen(self, workers: list[StageWorker]) -> None:
        """Make sure a listener runs for each of ``workers``."""
        for w in workers:
            address = w.stage.device.address
            t = self._threads.get(address)
            if t is None or not t.is_alive():
                t = threading.Thread(target=self._listen, args=(address,), daemon=True,
                                     name=f"edge-events-{w.stage.device.name}")
                self._threads[address] = t
                t.start()

    def _listen(self, address: str) -> None:
        """Consume a worker's event stream while its device is in the pipeline;
        reconnect with backoff."""
        cur, delay = self.current, 0.1
        while not cur.closed.is_set():
            w = cur.worker_at(address)
            if w is None or cur.taken_over:
                return  # no longer in the pipeline, or no longer ours
            heard = []  # the stream carried events (a result taken on the loop included)

            def result(event: pb.Event) -> None:
                heard.append(True)
                self.on_event(event)
            try:
                for event in w.client.subscribe(cur.coordinator_id, result):
                    heard.append(True)
                    self.on_event(event)
            except grpc.RpcError as e:
                if cur.closed.is_set():
                    return
                if e.code() == grpc.StatusCode.ABORTED:
                    # The worker ends the stream of the coordinator it was taken from.
                    self.on_taken(w, e.details())
                    return
                if heard:  # it was accepted: a refusal now is news again
                    self._refused.pop(address, None)
                self._broke(w, e.code(), e.details())
            finally:
                if heard:  # it was accepted: back to the shortest backoff
                    delay = 0.1
            if cur.closed.wait(delay):
                return
            delay = min(delay * 2, 2.0)

    def _broke(self, w: StageWorker, code: grpc.StatusCode, details: str) -> None:
        address = w.stage.device.address
        if code not in _GONE and self._refused.get(address) != code:
            # Refused (too many streams, a token): results from it cannot arrive until it
            # accepts one. Said once until a stream is accepted again.
            self._refused[address] = code
            log.warning("%s refused this coordinator's event stream: %s: %s; its results "
                        "cannot arrive until it accepts one (retrying)", w.label, code.name,
                        details)
        why = f"{code.name}: {details}"
        if self.failover:
            self.suspect(address, why)
            return
        # Without failover everything in flight through it cannot complete.
        pending = self.requests.pending()
        if pending:
            why += self.why(w)
            log.error("lost %s (%s); failing %d request(s) in flight", w.label, why, len(pending))
        self.requests.fail_all(lambda r: InferError(
            grpc.StatusCode.UNAVAILABLE,
            f"{w.label} stopped answering ({why}); request {r.request_id} could not complete"))

    def on_event(self, event: pb.Event) -> None:
        """A result answers its request; a failure is retried or answers it."""
        kind = event.WhichOneof("kind")
        if kind == "result":
            # Whatever the epoch: a result that went through every stage is right.
            self.requests.resolve(event.result.request_id, result=event.result)
            return
        if kind == "delivered":
            self.requests.direct = event.delivered
            return
        if kind != "failure":
            return
        f, cur = event.failure, self.current
        with cur.lock:
            if f.epoch != cur.epoch:
                return  # about an older wiring: the request was sent again since
            workers = list(cur.workers)
        request = self.requests.get(f.request_id)
        code = status_code(f.code)
        message = f.message
        next_stage = workers[f.stage + 1] if f.stage + 1 < len(workers) else None
        if self.failover and code in RETRY and request is not None:
            target = next_stage if code == grpc.StatusCode.UNAVAILABLE and next_stage \
                else workers[min(f.stage, len(workers) - 1)]
            self.requests.retry_later(request, f.epoch, target, code, message)
            return
        if code == grpc.StatusCode.UNAVAILABLE and next_stage is not None:
            if self.failover and request is None:
                # A direct client's request (or one answered meanwhile): the client sends
                # it again once the route changes; the failover is ours to start.
                self.suspect(next_stage.stage.device.address, f"{code.name}: {message}")
                return
            message += self.why(next_stage)  # a stage could not reach the next one
        self.requests.resolve(f.request_id, error=InferError(code, message))
