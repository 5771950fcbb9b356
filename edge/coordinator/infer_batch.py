"""Infer requests that queue up, sent through the pipeline as one batch
(``edge coordinator --infer-batch N``; off by default).

Every stage pays a fixed cost per message it receives and sends (gRPC's calls, thread
wake-ups, TLS records), and the coordinator pays three Python gRPC exchanges per request.
When more requests arrive than the pipeline has room for, they wait here anyway; those
that can share a batch are sent as one request, with their rows one after another along
the batch dimension, and the batch's outputs are split back by rows. Each stage then runs
them as one onnxruntime call and one message, and the coordinator sends one Forward and
receives one result for all of them.

Room: at most ``slots`` batches (or single requests) are in flight, by default two per
stage: each stage computing one and holding the next. Below that every request is sent
at once, by itself, exactly as without batching; only the requests that find every slot
taken wait, and the first of them to get a slot takes others that can share its batch.

How many it takes: an even share, the requests here (waiting or in flight) over the
slots, rounded up; at most ``max_batch``, and only as many rows as the plan's devices
hold. Taking every request that waits would be worse: the clients of a big batch send
their next requests together, they wait together, and the next slot takes them all again.
That batch then crosses the stages as a convoy, each stage busy with it while the others
wait for work. In a model of a closed loop (4 or 8 stages, 3 to 8 requests per stage in
flight) taking everything kept the stages 36-84% busy, the even share 98-99%; in the
emulated lab, taking everything ran BERT-base at 0.43-0.44 of the throughput without
batching (``benchmarks/batch_share_model.py``, BENCHMARKS.md).

When it pays: where a stage's compute is short beside its cost per message (a small
model, short inputs). For BERT-base at sequence 128 on emulated Pi 4s it did not: the
per-message costs it saves are a few percent of a stage there, and a batch's compute
cost as much or more per request.

Which requests can share a batch: the model's inputs and outputs all start with the same
symbolic dimension (its batch), and the requests agree on every other dimension and dtype
(a batch of BERT requests at sequence 128, not one at 128 and one at 64).

A batch travels as one request of the in-flight table, so a failover resends it whole and
nothing is lost. If it fails for any other reason than time or the pipeline being
unavailable (a worker refused its contents, say), each of its requests is sent again by
itself, so that one bad request cannot fail the others.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc

from edge.coordinator import metrics
from edge.coordinator.guard import BeyondModel, TooLarge, check_fits, request_sizes
from edge.coordinator.inflight import InferError, InferResult
from edge.errors import TensorError
from edge.planning.plan import Plan
from edge.proto import edge_pb2 as pb
from edge.transport.codec import split_rows, stack_rows

__all__ = ["InferBatcher", "batch_dim"]

# A batch that failed with one of these fails each of its requests the same way: sending
# them again one by one would not change the answer.
_SHARED = frozenset({grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE,
                     grpc.StatusCode.CANCELLED})


def batch_dim(plan: Plan) -> str | None:
    """The symbolic dimension every input and output of the plan's model starts with, or
    None when there is none (such a model's requests are never batched)."""
    specs = list(plan.model.inputs) + list(plan.model.outputs)
    if not specs or any(not s.shape for s in specs):
        return None
    first = specs[0].shape[0]
    if not isinstance(first, str) or any(s.shape[0] != first for s in specs):
        return None
    return first


@dataclass(eq=False)
class _Waiting:
    tensors: list[pb.Tensor]
    key: tuple | None         # requests with equal keys can share a batch (None: none)
    rows: int                 # its size in the batch dimension
    started: float            # perf_counter at arrival
    timeout: float            # seconds it may take
    end: float                # monotonic deadline
    ready: threading.Event = field(default_factory=threading.Event)
    lead: bool = False        # given a slot: it sends the batch
    taken: bool = False       # in a batch another request sends
    alone: bool = False       # its batch failed: send it by itself
    result: InferResult | None = None
    error: InferError | None = None


class InferBatcher:
    """Batches the Infer requests that wait for room in the pipeline.

    Args:
        pipeline: the :class:`~edge.coordinator.pipeline.Pipeline` (its ``plan`` and
            ``max_in_flight``).
        requests: the in-flight table (:class:`~edge.coordinator.inflight.InFlight`):
            its ``run(tensors, timeout, started) -> InferResult`` sends wire tensors as
            one request and waits for its result; ``run_async``, the same on a loop.
        max_batch: requests in one batch at most (1: batching off, every request sent at
            once, alone, without slots).
        slots: batches in flight at once (default: two per stage of the plan now).

    Attributes:
        batches: batches of more than one request sent.
        batched: the requests in them.
        largest: the most requests one batch had.
    """

    def __init__(self, pipeline: Any, requests: Any, max_batch: int,
                 slots: int | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch: expected at least 1, got {max_batch}")
        self.pipeline = pipeline
        self._requests = requests
        self.max_batch = max_batch
        self._slots = slots
        self._lock = threading.Lock()
        self._waiting: list[_Waiting] = []
        self._threads: ThreadPoolExecutor | None = None  # for infer_async
        self._used = 0        # slots taken
        self._members = 0     # requests here: waiting, or in a batch in flight
        self._sent = 0        # requests in batches in flight
        self.batches = self.batched = self.largest = 0

    @property
    def slots(self) -> int:
        # Read each time: a re-plan after a failover may change the stages.
        return self._slots or 2 * max(1, len(self.pipeline.plan.stages))

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot now."""
        with self._lock:
            return len(self._waiting)

    def infer(self, tensors: list[pb.Tensor], timeout: float) -> InferResult:
        """Run one checked request, in a batch if it has to wait, and wait for its outputs.

        Args:
            tensors: its inputs (checked against the plan).
            timeout: seconds it may take in all.

        Raises:
            InferError: its failure; RESOURCE_EXHAUSTED when ``max_in_flight`` requests are
                here already, DEADLINE_EXCEEDED when no slot or result came in time.
        """
        if self.max_batch == 1:  # batching off: sent at once, no slots
            return self._requests.run(tensors, timeout)
        me = _Waiting(tensors, self._key(tensors), _rows(tensors), time.perf_counter(),
                      timeout, time.monotonic() + timeout)
        limit = self.pipeline.max_in_flight
        with self._lock:
            if self._members >= limit:
                raise InferError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"{limit} requests already in flight; retry later")
            self._members += 1
            if self._used < self.slots and not self._waiting:
                self._used += 1
                me.lead = True
            else:
                self._waiting.append(me)
        try:
            return self._run(me)
        finally:
            with self._lock:
                self._members -= 1

    async def infer_async(self, tensors: list[pb.Tensor], timeout: float) -> InferResult:
        """:meth:`infer` on an event loop: with batching off, the request is sent and
        answered on the loop; with it on, it waits for a slot on a thread of its own."""
        if self.max_batch == 1:
            return await self._requests.run_async(tensors, timeout)
        with self._lock:  # a thread for each request here at most, made as they come
            if self._threads is None:
                self._threads = ThreadPoolExecutor(self.pipeline.max_in_flight,
                                                   thread_name_prefix="edge-infer-batch")
        return await asyncio.get_running_loop().run_in_executor(
            self._threads, self.infer, tensors, timeout)

    def _run(self, me: _Waiting) -> InferResult:
        while True:
            if me.lead:
                self._lead(me)
            elif not me.ready.wait(max(0.0, me.end - time.monotonic())):
                with self._lock:
                    if not (me.lead or me.taken):
                        self._waiting.remove(me)
                        raise InferError(
                            grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"the request waited {me.timeout:.3g} s for one of "
                            f"{self.slots} slots in the pipeline")
                if me.taken:  # its batch is in flight: its own deadline has passed
                    raise InferError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                     f"the request got no result within {me.timeout:.3g} s "
                                     "(sent in a batch)")
                continue  # given a slot just now
            if me.alone:  # its batch failed: by itself, outside the slots (it had one)
                return self._by_itself(me)
            if me.error is not None:
                raise me.error
            if me.result is not None:
                return me.result

    def _lead(self, me: _Waiting) -> None:
        """Send ``me``'s batch in ``me``'s slot, answer its requests, pass the slot on."""
        with self._lock:
            batch = self._take(me)
        try:
            self._send(batch)
        except Exception as e:  # a defect: no request may wait for an answer never sent
            for w in batch:
                if w.result is None and w.error is None:
                    w.error = InferError(grpc.StatusCode.INTERNAL,
                                         f"batch of {len(batch)} requests: {e}")
            raise
        finally:
            with self._lock:
                me.lead = False
                self._used -= 1
                self._sent -= len(batch)
                # The slot passes on to the request that waited longest (and more slots
                # to the next ones, if a re-plan added stages).
                while self._waiting and self._used < self.slots:
                    nxt = self._waiting.pop(0)
                    nxt.lead = True
                    self._used += 1
                    nxt.ready.set()
            for w in batch:
                if w is not me:
                    w.ready.set()

    def _take(self, me: _Waiting) -> list[_Waiting]:
        """``me`` and the waiting requests that can share its batch, oldest first, out of
        the waiting list. Called with the lock held."""
        batch = [me]
        # An even share of the requests here over the slots (see the module's docstring).
        share = -(-(len(self._waiting) + self._sent + 1) // self.slots)
        most = min(self.max_batch, share)
        if me.key is not None and most > 1:
            plan = self.pipeline.plan
            rows = me.rows
            for w in list(self._waiting):
                if len(batch) >= most:
                    break
                if w.key != me.key or not _fits(plan, me.tensors, rows + w.rows):
                    continue
                rows += w.rows
                w.taken = True
                self._waiting.remove(w)
                batch.append(w)
        self._sent += len(batch)
        return batch

    def _send(self, batch: list[_Waiting]) -> None:
        if len(batch) == 1:
            try:
                batch[0].result = self._by_itself(batch[0])
            except InferError as e:
                batch[0].error = e
            return
        self.batches += 1
        self.batched += len(batch)
        self.largest = max(self.largest, len(batch))
        metrics.count_batch(len(batch))
        timeout = max(w.end for w in batch) - time.monotonic()
        try:
            result = self._requests.run(stack_rows([w.tensors for w in batch]), timeout,
                                   min(w.started for w in batch))
            parts = split_rows(result.outputs, [w.rows for w in batch])
        except InferError as e:
            for w in batch:
                w.error, w.alone = e, e.code not in _SHARED
            return
        except TensorError:  # outputs not batch-major after all: each one by itself
            for w in batch:
                w.alone = True
            return
        now = time.perf_counter()
        for w, outputs in zip(batch, parts):
            w.result = InferResult(result.request_id, outputs, result.timings,
                                   (now - w.started) * 1e3)

    def _by_itself(self, me: _Waiting) -> InferResult:
        return self._requests.run(me.tensors, me.end - time.monotonic(), me.started)

    def _key(self, tensors: list[pb.Tensor]) -> tuple | None:
        if batch_dim(self.pipeline.plan) is None:
            return None
        if not tensors or any(not t.shape for t in tensors):
            return None
        if len({t.shape[0] for t in tensors}) != 1:
            return None
        return tuple((t.name, t.dtype, tuple(t.shape[1:])) for t in tensors)


def _rows(tensors: list[pb.Tensor]) -> int:
    return tensors[0].shape[0] if tensors and tensors[0].shape else 1


def _fits(plan: Plan, tensors: list[pb.Tensor], rows: int) -> bool:
    """Whether the plan's devices hold a batch of ``rows`` requests shaped as ``tensors``."""
    try:
        check_fits(plan, request_sizes(plan.model.inputs,
                                       [(t.name, [rows, *t.shape[1:]]) for t in tensors]))
    except (TooLarge, BeyondModel):
        return False
    return True
