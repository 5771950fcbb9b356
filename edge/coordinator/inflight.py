"""The in-flight table: every request accepted and not yet answered, with its inputs.

A request is admitted (or refused at once: the pipeline cannot serve, or too many are in
flight), sent to the first stage of the current epoch, and kept here until its result or
its failure arrives. A refusal that is not the request's fault (a stage gone, full, or on
another epoch) schedules it to be sent again with backoff; a re-deployment under a new
epoch sends it again at once. Results are matched by request id, so a result computed
under an older epoch still answers, and a request answered twice is answered once.

A step of a generated sequence (``Request.step``) is a request like any other, with one
difference: the stages keep its sequence's KV caches, so sending the same step again may
find caches that already moved on (a stage before the one that failed ran it) or are gone
(a device replaced). Such a request carries its *replay*: a prefill at position 0 of every
token of the sequence so far, which restarts the sequence's caches on every stage and draws
the same token (the last stage seeds its draw by position). Every send after the first, and
a first send under another epoch than the one whose caches the step builds on, sends the
replay.

A batch of decode steps (``Request.rows``: one row per sequence, built by
:mod:`edge.coordinator.batcher`) is sent once, under the epoch its rows' caches belong
to. Anything that would send it again (a refusal, a resend after a failover, another
epoch) instead answers it with :data:`BROKEN_UP` (FAILED_PRECONDITION): each row then
takes its own replay, a single step, and rejoins batches after.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Callable

import grpc

from edge.coordinator.state import Current
from edge.coordinator.workers import StageWorker
from edge.errors import EdgeError
from edge.proto import edge_pb2 as pb

__all__ = ["InFlight", "InferError", "InferResult", "Request", "RETRY", "MAX_ATTEMPTS",
           "BROKEN_UP"]

log = logging.getLogger(__name__)

# Failures a stage reports that say nothing about the request itself: it is sent again
# (a next hop gone or full, a stage on another epoch, a call cut by a re-wiring).
RETRY = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                   grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
                   grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED})

# Sends of one request before it fails: a request that no stage ever completes must end.
MAX_ATTEMPTS = 8

# The code a batch of decode steps is answered with instead of being sent again: its rows
# replay singly (a stage before the one that refused may have run the batch already).
BROKEN_UP = grpc.StatusCode.FAILED_PRECONDITION


class InferError(EdgeError):
    """A request failed. ``code`` is the grpc.StatusCode to answer with; ``retryable``
    False when sending the same request again cannot succeed even for a code clients
    retry (a request too large for a device gets RESOURCE_EXHAUSTED, as a full queue does)."""

    def __init__(self, code: grpc.StatusCode, message: str, retryable: bool = True):
        super().__init__(message)
        self.code = code
        self.retryable = retryable


@dataclass
class InferResult:
    request_id: str
    outputs: list[pb.Tensor]
    timings: list[pb.StageTiming]
    latency_ms: float


@dataclass
class Request:
    request_id: str
    tensors: list[pb.Tensor]
    started: float
    future: Future = field(default_factory=Future)
    sent_epoch: int = -1      # the epoch it was last sent under (-1: not sent yet)
    retry_at: float = 0.0     # monotonic time of its next send, when it waits for one
    attempts: int = 0         # sends so far
    losses: int = 0           # device losses it was in flight through
    step: pb.Step | None = None    # a step of a generated sequence (None: an Infer)
    # Builds the step restarted at position 0: what every send after the first sends
    # instead. Built only then: it holds every token so far, and most steps never need it.
    replay: Callable[[], tuple[list[pb.Tensor], pb.Step]] | None = None
    cache_epoch: int = -1     # the epoch whose caches the step builds on (-1: none)
    replayed: bool = False    # its replay was sent
    rows: list[pb.Step] = field(default_factory=list)  # a batch of decode steps, by row

    def message(self, epoch: int) -> pb.Activation:
        """What to send under ``epoch`` (its ``attempts`` counting this send)."""
        tensors, step = self.tensors, self.step
        if self.replay is not None and (self.replayed or self.attempts > 1 or (
                self.cache_epoch >= 0 and self.cache_epoch != epoch)):
            (tensors, step), self.replayed = self.replay(), True
        out = pb.Activation(request_id=self.request_id, tensors=tensors, epoch=epoch)
        if step is not None:
            out.step.CopyFrom(step)
        out.rows.extend(self.rows)
        return out


class InFlight:
    """Admits requests, sends them, retries them, and answers each once.

    Args:
        current: the deployment to send to.
        forward_timeout: deadline of one Forward call.
        max_in_flight: requests accepted at once; past it, RESOURCE_EXHAUSTED.
        failover: retry refusals in :data:`RETRY` (False: they answer the request).
        suspect: told ``(address, why)`` of a stage that refused with UNAVAILABLE.
        why: what is known about why a worker stopped answering ("; ..." or "").
    """

    def __init__(self, current: Current, forward_timeout: float, max_in_flight: int,
                 failover: bool, suspect: Callable[[str, str], None],
                 why: Callable[[StageWorker], str]):
        self.current = current
        self.forward_timeout = forward_timeout
        self.max_in_flight = max_in_flight
        self.failover = failover
        self.suspect = suspect
        self.why = why
        self.done = 0
        self.failed = 0
        # The last stage's count of direct clients' requests it answered (Event.delivered).
        self.direct = 0  # with ``done``, the monitor's sign that requests flow
        self._requests: dict[str, Request] = {}

    def __len__(self) -> int:
        return len(self._requests)

    def get(self, request_id: str) -> Request | None:
        with self.current.lock:
            return self._requests.get(request_id)

    def pending(self, count_loss: bool = False) -> list[Request]:
        """Requests not answered yet; ``count_loss``: each was in flight through one more
        device loss."""
        with self.current.lock:
            pending = [r for r in self._requests.values() if not r.future.done()]
            for r in pending if count_loss else ():
                r.losses += 1
            return pending

    def admit(self, tensors: list[pb.Tensor], step: pb.Step | None = None,
              replay: Callable[[], tuple[list[pb.Tensor], pb.Step]] | None = None,
              cache_epoch: int = -1, rows: list[pb.Step] | None = None) -> Request:
        """Take a request in, or refuse it at once.

        Args:
            tensors: its inputs.
            step: for a step of a generated sequence: the step.
            replay: for a step: its replay (the module's docstring says when it is sent).
            cache_epoch: for a step: the epoch whose caches it builds on (-1: none); for
                a batch, the epoch it may be sent under.
            rows: for a batch of decode steps: each row's step.

        Raises:
            InferError: UNAVAILABLE while nothing can serve (not retryable once taken
                over), RESOURCE_EXHAUSTED when ``max_in_flight`` are in flight.
        """
        request = Request(uuid.uuid4().hex, tensors, time.perf_counter(), step=step,
                          replay=replay, cache_epoch=cache_epoch, rows=list(rows or ()))
        cur = self.current
        with cur.lock:
            if cur.unavailable:
                raise InferError(grpc.StatusCode.UNAVAILABLE, cur.unavailable,
                                 retryable=not cur.taken_over)
            if len(self._requests) >= self.max_in_flight:
                raise InferError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"{self.max_in_flight} requests already in flight; retry later")
            self._requests[request.request_id] = request
        return request

    def wait(self, request: Request, timeout: float) -> pb.Activation:
        """Send an admitted request once the pipeline serves, and wait for its answer.

        Raises:
            InferError: its failure, or DEADLINE_EXCEEDED after ``timeout`` seconds.
        """
        answered = False
        try:
            if self.current.serving.wait(timeout):
                self.send(request)
            activation = request.future.result(self._left(request, timeout))
            answered = True
        except FutureTimeout:
            raise self._timed_out(request, timeout) from None
        finally:
            self._finish(request, answered)
        return activation

    async def wait_async(self, request: Request, timeout: float) -> pb.Activation:
        """:meth:`wait` on an event loop, which stays free while the request is in flight
        (its Forward and its result are handled there too, see ``aio.LoopServer``).
        A cancelled caller (the client went away) takes the request out of the table."""
        answered = False
        try:
            if await self._serving(timeout):
                self.send(request)
            activation = await asyncio.wait_for(asyncio.wrap_future(request.future),
                                                self._left(request, timeout))
            answered = True
        except (FutureTimeout, asyncio.TimeoutError):
            raise self._timed_out(request, timeout) from None
        finally:
            self._finish(request, answered)
        return activation

    def _finish(self, request: Request, answered: bool) -> None:
        """Take a request that has left its waiter out of the table, and count it."""
        with self.current.lock:
            self._requests.pop(request.request_id, None)
        self._count(failed=not answered)

    async def _serving(self, timeout: float) -> bool:
        """Whether the pipeline serves within ``timeout`` seconds; while it recovers from
        a lost device, looked at every 50 ms (no thread held per waiting request)."""
        end = time.monotonic() + timeout
        while not self.current.serving.is_set():
            if time.monotonic() >= end:
                return False
            await asyncio.sleep(0.05)
        return True

    def _left(self, request: Request, timeout: float) -> float:
        return max(0.0, timeout - (time.perf_counter() - request.started))

    def _timed_out(self, request: Request, timeout: float) -> InferError:
        return InferError(grpc.StatusCode.DEADLINE_EXCEEDED,
                          f"request {request.request_id} got no result within "
                          f"{timeout:.0f} s{self.current.note()}")

    def run(self, tensors: list[pb.Tensor], timeout: float,
            started: float | None = None) -> InferResult:
        """Admit checked wire tensors as one request (a batch of requests is one:
        :mod:`edge.coordinator.infer_batch`), send it and wait for its outputs.

        Args:
            tensors: the request's inputs.
            timeout: seconds to wait.
            started: ``time.perf_counter()`` when it arrived (default: now), for its
                latency.

        Raises:
            InferError: with the status code to report.
        """
        request = self.admit(tensors)
        return self._result(request, self.wait(request, timeout), started)

    async def run_async(self, tensors: list[pb.Tensor], timeout: float) -> InferResult:
        """:meth:`run` on an event loop."""
        request = self.admit(tensors)
        return self._result(request, await self.wait_async(request, timeout), None)

    @staticmethod
    def _result(request: Request, activation: pb.Activation,
                started: float | None) -> InferResult:
        return InferResult(request.request_id, list(activation.tensors),
                           list(activation.timings),
                           (time.perf_counter() - (started or request.started)) * 1e3)

    def _count(self, failed: bool) -> None:
        with self.current.lock:
            if failed:
                self.failed += 1
            else:
                self.done += 1

    def send(self, request: Request) -> None:
        """Hand the request to the first stage, without waiting for it to be accepted.

        A refusal that is not the request's fault (the stage is gone, full, or on another
        epoch) leaves it to be sent again; other refusals answer it.
        """
        cur = self.current
        with cur.lock:
            if request.future.done() or not cur.workers:
                return
            first, epoch = cur.workers[0], cur.epoch
            broken = bool(request.rows) and (request.attempts > 0 or request.cache_epoch != epoch)
            if not broken:
                request.sent_epoch, request.attempts = epoch, request.attempts + 1
                message = request.message(epoch)
        if broken:
            self._break_up(request, "it would be sent again")
            return
        first.client.forward(message, self.forward_timeout,
                             lambda code, details: self._sent(request, epoch, first, code,
                                                              details))

    def _sent(self, request: Request, epoch: int, first: StageWorker, code: grpc.StatusCode,
              details: str) -> None:
        if code == grpc.StatusCode.OK:
            return
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            code = grpc.StatusCode.UNAVAILABLE
        if self.failover and code in RETRY:
            self.retry_later(request, epoch, first, code, details)
            return
        why = self.why(first) if code == grpc.StatusCode.UNAVAILABLE else ""
        self.resolve(request.request_id, error=InferError(
            code, f"{first.label} refused request {request.request_id}: {details}{why}"))

    def retry_later(self, request: Request, epoch: int, w: StageWorker,
                    code: grpc.StatusCode, details: str) -> None:
        """Schedule ``request``, refused by ``w`` under ``epoch``, to be sent again with
        backoff (or fail it after :data:`MAX_ATTEMPTS` sends)."""
        why = f"{code.name}: {details}"
        if request.rows:
            self._break_up(request, f"{w.label} refused it: {why}")
        elif request.attempts >= MAX_ATTEMPTS:
            self.resolve(request.request_id, error=InferError(
                grpc.StatusCode.UNAVAILABLE,
                f"request {request.request_id} was sent {request.attempts} times and never "
                f"completed; last: {w.label}: {why}"))
            return
        else:
            self._schedule(request, epoch)
        if code == grpc.StatusCode.UNAVAILABLE:
            self.suspect(w.stage.device.address, why)
        self.current.wake.set()

    def _break_up(self, request: Request, why: str) -> None:
        self.resolve(request.request_id, error=InferError(
            BROKEN_UP, f"batch {request.request_id} of {len(request.rows)} decode steps "
                       f"broken up ({why}): each row replays alone"))

    def _schedule(self, request: Request, epoch: int) -> None:
        with self.current.lock:
            if request.sent_epoch == epoch:
                # A step's first refusal is sent again at once, as its replay: a stage
                # whose caches do not match it (FAILED_PRECONDITION) will not change its
                # mind, and the replay does not depend on any cache.
                first_replay = request.replay is not None and not request.replayed
                request.retry_at = time.monotonic() + (
                    0.0001 if first_replay else min(2.0, 0.05 * 2 ** request.attempts))

    def resolve(self, request_id: str, result: pb.Activation | None = None,
                error: InferError | None = None) -> None:
        """Answer a request with its result or its error; the first answer stands."""
        with self.current.lock:
            request = self._requests.get(request_id)
        if request is None or request.future.done():
            return  # answered already, or timed out
        try:
            if error is not None:
                request.future.set_exception(error)
            else:
                request.future.set_result(result)
        except Exception:  # set twice by two threads at once: the first answer stands
            pass

    def fail_all(self, error: Callable[[Request], InferError]) -> None:
        """Answer every request not answered yet with ``error(request)``."""
        for r in self.pending():
            self.resolve(r.request_id, error=error(r))

    def resend_due(self) -> None:
        """Send again the requests whose retry time has come or that were sent under an
        older epoch."""
        cur = self.current
        if not cur.serving.is_set() or cur.unavailable:
            return
        now = time.monotonic()
        with cur.lock:
            due = [r for r in self._requests.values() if not r.future.done() and (
                (r.sent_epoch != -1 and r.sent_epoch != cur.epoch)
                or (r.retry_at and r.retry_at <= now))]
            for r in due:
                r.retry_at = 0.0
        for r in due:
            self.send(r)

    def send_once(self, step: pb.Step) -> None:
        """Send a step without tensors (a release) to the first stage, without keeping it:
        best effort, a refusal is logged (caches idle too long are freed anyway)."""
        cur = self.current
        with cur.lock:
            if not cur.workers:
                return
            first, epoch = cur.workers[0], cur.epoch
        message = pb.Activation(request_id=uuid.uuid4().hex, epoch=epoch, step=step)

        def done(code: grpc.StatusCode, details: str) -> None:
            if code != grpc.StatusCode.OK:
                log.info("release of sequence %s refused by %s: %s: %s", step.sequence_id,
                         first.label, code.name, details)

        first.client.forward(message, self.forward_timeout, done)

    def close(self) -> None:
        """Fail everything in flight: the coordinator is shutting down."""
        with self.current.lock:
            pending = list(self._requests.values())
            self._requests.clear()
        for r in pending:
            if not r.future.done():
                r.future.set_exception(InferError(grpc.StatusCode.UNAVAILABLE,
                                                  "the coordinator is shutting down"))
