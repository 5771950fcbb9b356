"""A worker's stage engine: the stage it serves and the two threads that run it.

A request moves through two threads so that a stage computes request n+1 while it still
sends request n:

    submit (Forward) -> jobs -> compute thread -> outbox -> send thread -> next worker
                                                                      \\-> events (last stage)

The engine knows nothing of gRPC handlers: it raises the typed errors of
``edge.worker.errors`` and the servicer maps them to status codes. A re-configure swaps
the StageRunner (and the channel to the next hop) under a lock; jobs of an older epoch
are then dropped, since the coordinator resends them.

A generation step (``Activation.step``) runs with its sequence's caches from the
engine's session store (``edge.worker.sessions``), in the order the steps came; a
release frees them and goes on to the next stage like a step, with no tensors. A batch
of decode steps (``Activation.rows``) runs as one (``sessions.run_batch``).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import numpy as np

from edge.errors import SecurityError, TensorError
from edge.profiling.memory import release_free_heap
from edge.proto import edge_pb2 as pb
from edge.transport.channels import Deadlines, Security, create_channel, serialized_unary
from edge.transport.codec import encode_activation
from edge.worker.errors import (RUN_FAILURE_CODES, NextHopRefused, QueueFull,
                                ShardLoadError, WorkerError, status_code)
from edge.worker.events import WAKE, EventBus
from edge.worker.metrics import count_failure, stage_metrics
from edge.worker.sessions import (DEFAULT_IDLE_S, SessionStore, run_batch, run_step,
                                  split_prefill)
from edge.worker.stage import ShardMismatch, StageRunner, StageSpec, describe_ort_error

__all__ = ["Job", "StageEngine"]

log = logging.getLogger(__name__)

_FORWARD = pb.DESCRIPTOR.services_by_name["Worker"].methods_by_name["Forward"]
# Freed caches of at least this many bytes are handed back to the kernel at once: glibc
# keeps up to 32 MiB of free heap (edge.profiling.memory.tune_malloc) otherwise.
_TRIM_BYTES = 1 << 20
# How long the compute and send threads wait on an empty queue before looking up (the
# idle sequences' sweep, a stop): each wake-up costs CPU a board's stage needs, so no
# more often than that sweep needs; a stop wakes them at once (events.WAKE).
_POLL_S = 1.0


def _sweep_period(idle_s: float) -> float:
    """Seconds between sweeps of idle sequences: a quarter of the time after which a
    sequence's caches are freed, at most ``_POLL_S``."""
    return min(_POLL_S, idle_s / 4)


@dataclass
class Job:
    """One request on its way through the engine."""

    request_id: str
    epoch: int
    arrays: dict[str, np.ndarray]
    timings: list[pb.StageTiming]
    received: float  # perf_counter
    runner: StageRunner
    received_ns: int = 0  # time.time_ns(), reported in StageTiming
    compute_ms: float = 0.0
    queue_ms: float = 0.0
    outputs: dict[str, np.ndarray] | None = None
    step: pb.Step | None = None  # a generation step (a release has no arrays)
    tokens: np.ndarray | None = None  # drawn by the last stage for a step
    rows: list[pb.Step] = field(default_factory=list)  # a batch of decode steps, by row
    reply_to: str = ""  # the direct client that sent it ("": the coordinator)


def _chunks(job: Job) -> list[Job]:
    """A first stage's step longer than its prefill chunk, as one job per chunk (see
    :func:`edge.worker.sessions.split_prefill`); else ``[job]``."""
    spec = job.runner.spec
    if job.step is None or spec.stage != 0 or not spec.prefill_chunk:
        return [job]
    parts = split_prefill(job.arrays, job.step, spec.prefill_chunk)
    if len(parts) == 1:
        return [job]
    return [replace(job, arrays=arrays, step=step) for arrays, step in parts]


class StageEngine:
    """Runs the current stage on queued requests and hands the outputs on.

    Args:
        events: where results (last stage) and failures go.
        max_queue: requests waiting for compute (and for sending) at most.
        threads: onnxruntime intra-op threads (None: all cores).
        deadlines: per-call deadlines for the calls to the next hop.
        security: how the channel to the next hop is secured.
        session_idle_s: seconds after which a sequence without a step loses its caches.
        device: this worker's device profile, the ``device`` label of its metrics.
    """

    def __init__(self, events: EventBus, max_queue: int = 64, threads: int | None = None,
                 deadlines: Deadlines = Deadlines(), security: Security = Security(),
                 session_idle_s: float = DEFAULT_IDLE_S, device: str = "unknown"):
        self.events = events
        self.device = device
        self.max_queue = max_queue
        self.threads = threads
        self.deadlines = deadlines
        self.security = security
        self.runner: StageRunner | None = None  # swapped whole, read without the lock
        self._configure_lock = threading.Lock()
        self._jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self._outbox: queue.Queue = queue.Queue(maxsize=max_queue)
        self._next_channel: grpc.Channel | None = None
        self._next_forward: grpc.UnaryUnaryMultiCallable | None = None  # takes bytes
        self._stats_lock = threading.Lock()
        self._done = 0
        self._failed = 0
        self._compute_ms_total = 0.0
        self._batched_runs = self._batched_rows = 0
        self.sessions = SessionStore(session_idle_s)
        self._next_sweep = 0.0
        self.stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self._compute_loop, name="edge-compute", daemon=True),
            threading.Thread(target=self._send_loop, name="edge-send", daemon=True),
        ]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ state

    def serving(self) -> str:
        """What this worker serves, for messages: "plan P, epoch E" or "no stage"."""
        runner = self.runner
        if runner is None:
            return "no stage"
        return f"plan {runner.spec.plan_id or '?'}, epoch {runner.spec.epoch}"

    def stats(self) -> tuple[int, int, float]:
        """Requests done, requests failed, and their total compute ms."""
        with self._stats_lock:
            return self._done, self._failed, self._compute_ms_total

    def batched(self) -> tuple[int, int]:
        """Runs of a batch of decode steps, and their rows."""
        with self._stats_lock:
            return self._batched_runs, self._batched_rows

    def counters(self) -> tuple[int, int]:
        """Requests done and the queue's depth, for the memory sampler."""
        return self._done, self._jobs.qsize()

    def queue_depth(self) -> int:
        return self._jobs.qsize()

    def queue_depths(self) -> tuple[int, int]:
        """Requests waiting for compute, and computed ones waiting to be sent."""
        return self._jobs.qsize(), self._outbox.qsize()

    def busy(self) -> bool:
        """True while requests wait for compute or for sending."""
        return bool(self._jobs.qsize() or self._outbox.qsize())

    # ------------------------------------------------------------------ configure

    def install(self, spec: StageSpec, path: Path, coordinator_id: str,
                take_over: bool) -> StageRunner:
        """Serve ``spec`` from the shard at ``path``: load it (or re-wire the current
        runner, when only the wiring changed), connect the next hop, swap, and make
        ``coordinator_id`` the owner.

        Raises:
            ShardMismatch, ShardLoadError: the shard does not load or keep the contract.
            OwnedElsewhere: another live coordinator configured this worker meanwhile.
            NextHopRefused: the channel to the next hop cannot be secured.
        """
        with self._configure_lock:
            runner = self._load(spec, path)
            # Checked again where it is decided: two coordinators may configure at once.
            self.events.check_may_configure(coordinator_id, take_over, self.serving())
            old_channel = self._next_channel
            self._connect_next_hop(spec)
            self.runner = runner
            # Another plan or epoch: the stage's layers, or its sequences' owner, may have
            # changed; the coordinator replays its sequences from position 0.
            self._trim(self.sessions.reset((spec.plan_id, spec.epoch)))
            self.events.claim(coordinator_id,
                              f"plan {spec.plan_id or '?'}, epoch {spec.epoch}")
            if old_channel is not None:
                old_channel.close()
        return runner

    def _load(self, spec: StageSpec, path: Path) -> StageRunner:
        try:
            current = self.runner
            return ((current.rewired(spec) if current is not None else None)
                    or StageRunner(spec, path, self.threads))
        except ShardMismatch:
            raise
        except Exception as e:  # onnxruntime cannot load it
            raise ShardLoadError(f"cannot load shard {spec.shard_sha256[:12]}: "
                                 f"{describe_ort_error(e)[1]}") from None

    def _connect_next_hop(self, spec: StageSpec) -> None:
        if not spec.next_address:
            self._next_channel = self._next_forward = None
            return
        try:
            self._next_channel = create_channel(spec.next_address, security=self.security)
        except SecurityError as e:  # plaintext to a LAN address without --insecure
            raise NextHopRefused(f"{spec.where} cannot forward to {spec.next_address}: "
                                 f"{e}") from None
        self._next_forward = serialized_unary(self._next_channel, _FORWARD, pb.Ack)

    # ------------------------------------------------------------------ requests

    def submit(self, job: Job) -> None:
        """Queue ``job`` for compute.

        Raises:
            QueueFull: ``max_queue`` requests wait already.
        """
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{job.runner.spec.where} has {self.max_queue} requests queued; "
                            "retry later") from None

    def _stale(self, job: Job) -> bool:
        """True if the worker was re-configured (a new epoch) since ``job`` came."""
        runner = self.runner
        return runner is None or job.epoch != runner.spec.epoch

    def _fail(self, job: Job, code: grpc.StatusCode, message: str, phase: str) -> None:
        with self._stats_lock:
            self._failed += 1
        count_failure(job.runner.spec.stage, self.device, code, phase)
        log.warning("request %s failed: %s", job.request_id, message)
        self.events.publish(pb.Event(failure=pb.Failure(
            request_id=job.request_id, stage=job.runner.spec.stage, code=code.value[0],
            message=message, epoch=job.epoch)))

    @staticmethod
    def _trim(freed: int) -> None:
        if freed >= _TRIM_BYTES:
            release_free_heap()

    def _sweep(self) -> None:
        """Free the caches of idle sequences, at most about once a second."""
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + _sweep_period(self.sessions.idle_s)
            self._trim(self.sessions.sweep())

    def _compute_loop(self) -> None:
        poll = max(0.25, _sweep_period(self.sessions.idle_s))
        while not self.stopping.is_set():
            self._sweep()
            try:
                job = self._jobs.get(timeout=poll)
            except queue.Empty:
                continue
            if job is WAKE:
                continue
            if self._stale(job):
                continue  # re-configured since it was queued: the coordinator resends it
            if job.step is not None and job.step.release:
                self._trim(self.sessions.release(job.step.sequence_id))
                job.outputs = {}
                self._outbox.put(job)  # and on to the next stage (the last: a result)
                continue
            for part in _chunks(job):  # in order; a refused chunk ends the step
                if not self._compute(part):
                    break

    def _compute(self, job: Job) -> bool:
        """Run ``job`` and queue its outputs to be sent; False if it failed (said)."""
        start = time.perf_counter()
        job.queue_ms = (start - job.received) * 1e3
        try:
            if job.rows:
                job.outputs, job.tokens = run_batch(job.runner, self.sessions, job.epoch,
                                                    job.arrays, job.rows)
            elif job.step is None:
                job.outputs = job.runner.run(job.arrays)
            else:
                job.outputs, job.tokens = run_step(job.runner, self.sessions, job.epoch,
                                                   job.arrays, job.step)
        except WorkerError as e:  # a step refused: its position, the bounds
            job.arrays = {}
            self._fail(job, status_code(e) or grpc.StatusCode.INTERNAL,
                       f"request {job.request_id}: {e}", "compute")
            return False
        except Exception as e:
            kind, msg = describe_ort_error(e)
            code = RUN_FAILURE_CODES.get(kind, grpc.StatusCode.INTERNAL)
            self._fail(job, code, f"{job.runner.spec.where} could not run request "
                                  f"{job.request_id}: {msg}", "compute")
            return False
        job.compute_ms = (time.perf_counter() - start) * 1e3
        job.arrays = {}  # free the inputs before the outputs are sent
        metrics = stage_metrics(job.runner.spec.stage, self.device)
        metrics.queue.observe(job.queue_ms / 1e3)
        metrics.compute.observe(job.compute_ms / 1e3)
        with self._stats_lock:
            self._done += 1
            self._compute_ms_total += job.compute_ms
            if job.rows:
                self._batched_runs += 1
                self._batched_rows += len(job.rows)
        self._outbox.put(job)
        return True

    def _send_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                job = self._outbox.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if job is WAKE:
                continue
            if self._stale(job):
                continue  # re-configured since: the coordinator resends it
            self._send(job)

    def _send(self, job: Job) -> None:
        start = time.perf_counter()
        spec = job.runner.spec
        if spec.is_last and job.step is not None and job.step.partial:
            job.outputs = None  # a prompt's chunk before the last: cached, not answered
            return
        timing = pb.StageTiming(stage=spec.stage, queue_ms=job.queue_ms,
                                compute_ms=job.compute_ms, received_unix_ns=job.received_ns)

        def timings() -> list[pb.StageTiming]:
            timing.send_ms = (time.perf_counter() - start) * 1e3  # the encoding
            return job.timings + [timing]

        # Straight to wire bytes: one copy of the outputs instead of three.
        try:
            data = encode_activation(job.request_id, job.epoch, job.outputs, timings,
                                     step=job.step, rows=job.rows, reply_to=job.reply_to,
                                     tokens=() if job.tokens is None else job.tokens)
        except TensorError as e:
            self._fail(job, grpc.StatusCode.INTERNAL, f"{spec.where} cannot send the "
                                                      f"outputs of {job.request_id}: {e}",
                       "send")
            return
        finally:
            job.outputs = None
        if spec.is_last:
            event = pb.Event()
            event.result.MergeFromString(data)
            del data
            self.events.answer(event, job.reply_to)
            stage_metrics(spec.stage, self.device).send.observe(time.perf_counter() - start)
            return
        try:
            # Blocking: a .future() on a channel with no other call in flight starts a
            # gRPC "channel spin" thread per request. A hung next hop still does not hold
            # this loop once the pipeline moves: a re-configure (or stop) closes the
            # channel, which ends the call at once (CANCELLED).
            self._next_forward(data, timeout=self.deadlines.forward)
            stage_metrics(spec.stage, self.device).send.observe(time.perf_counter() - start)
        except ValueError:  # its channel was closed before the call began: re-wired, stopped
            if not (self._stale(job) or self.stopping.is_set()):
                raise
        except grpc.RpcError as e:
            if self._stale(job) or self.stopping.is_set():
                return  # the hop was re-wired meanwhile: the coordinator resends it
            code = e.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                code = grpc.StatusCode.UNAVAILABLE
            self._fail(job, code, f"{spec.where} could not hand request {job.request_id} "
                                  f"to stage {spec.stage + 1} at {spec.next_address}: "
                                  f"{e.code().name}: {e.details()}", "send")
        finally:
            del data  # not kept while the loop waits for and encodes the next one

    def stop(self) -> None:
        self.stopping.set()
        for q in (self._jobs, self._outbox):
            with contextlib.suppress(queue.Full):  # full: its thread is busy, sees it next
                q.put_nowait(WAKE)
        if self._next_channel is not None:
            self._next_channel.close()
