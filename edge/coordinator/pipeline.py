"""The coordinator's view of a running pipeline: who serves which stage, which requests
are in flight, and where their results and failures come back.

Every request in flight is kept here with its inputs until its result arrives, so that a
failover can resend it (and nothing accepted is lost when a stage dies).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import grpc
import numpy as np

from edge.errors import EdgeError, TensorError
from edge.planning.plan import Device, Plan
from edge.proto import edge_pb2 as pb
from edge.transport.channels import Deadlines, Security
from edge.transport.codec import check_tensors, encode_spec, encode_tensors
from edge.coordinator.deploy import Progress, WorkerHandle, connect, deploy

__all__ = ["Pipeline", "InferError", "InferResult"]

log = logging.getLogger(__name__)


class InferError(EdgeError):
    """A request failed. ``code`` is the grpc.StatusCode to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class InferResult:
    request_id: str
    outputs: list[pb.Tensor]
    timings: list[pb.StageTiming]
    latency_ms: float


@dataclass
class _InFlight:
    request_id: str
    tensors: list[pb.Tensor]
    started: float
    future: Future = field(default_factory=Future)


class Pipeline:
    """Deploys a plan and runs requests through it.

    Args:
        plan: the plan to serve.
        plan_dir: the folder plan.json and shards/ are in.
        deadlines: per-call deadlines.
        security: how to reach the workers (and, in ``edge coordinator``, how to serve
            clients): ``Security.from_dir(bundle)`` for mutual TLS and the token; the
            default is plaintext, refused for non-loopback workers.
        max_in_flight: requests accepted at once; past it, RESOURCE_EXHAUSTED.
        diagnose: asked why a device whose worker stopped answering did so (e.g.
            ``edge.lab.Lab.diagnose``: "out of memory at its 512 MiB cap"); its answer,
            if not None, is added to the error. Only what runs the device can know.
    """

    def __init__(self, plan: Plan, plan_dir: Path, *, deadlines: Deadlines = Deadlines(),
                 security: Security = Security(), max_in_flight: int = 64,
                 diagnose: Callable[[Device], str | None] | None = None):
        self.plan = plan
        self.plan_dir = Path(plan_dir)
        self.deadlines = deadlines
        self.security = security
        self.max_in_flight = max_in_flight
        self.diagnose = diagnose
        self.epoch = 0
        self.workers: list[WorkerHandle] = []
        self._lock = threading.Lock()
        self._in_flight: dict[str, _InFlight] = {}
        self._subscriptions: list[threading.Thread] = []
        self._closed = threading.Event()
        self.requests_done = 0
        self.requests_failed = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self, progress: Progress | None = None) -> None:
        """Wait for every worker, upload missing shards, wire the chain, listen for results."""
        self.workers = [connect(s, self.security) for s in self.plan.stages]
        # A new epoch per deployment: workers drop anything sent under an older wiring.
        self.epoch = time.time_ns() // 1000
        deploy(self.plan, self.plan_dir, self.workers, self.epoch, self.deadlines, progress)
        for w in self.workers:
            t = threading.Thread(target=self._listen, args=(w,), daemon=True,
                                 name=f"edge-events-{w.stage.index}")
            t.start()
            self._subscriptions.append(t)

    def close(self) -> None:
        self._closed.set()
        for w in self.workers:
            w.close()
        with self._lock:
            pending = list(self._in_flight.values())
            self._in_flight.clear()
        for r in pending:
            if not r.future.done():
                r.future.set_exception(InferError(grpc.StatusCode.UNAVAILABLE,
                                                  "the coordinator is shutting down"))

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ requests

    def infer(self, inputs: Mapping[str, np.ndarray] | list[pb.Tensor],
              timeout: float | None = None) -> InferResult:
        """Run one request through the pipeline and wait for its outputs.

        Args:
            inputs: the model's inputs by name, or already-encoded wire tensors.
            timeout: seconds to wait (default: the infer deadline).

        Raises:
            InferError: with the status code to report.
        """
        if isinstance(inputs, Mapping):
            try:
                check_tensors(inputs, self.plan.model.inputs, "the model")
            except TensorError as e:
                raise InferError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
            tensors = encode_tensors(inputs)
        else:
            tensors = list(inputs)
        request = _InFlight(uuid.uuid4().hex, tensors, time.perf_counter())
        with self._lock:
            if len(self._in_flight) >= self.max_in_flight:
                raise InferError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"{self.max_in_flight} requests already in flight; retry later")
            self._in_flight[request.request_id] = request
        try:
            self._send(request)
            activation = request.future.result(timeout or self.deadlines.infer)
        except FutureTimeout:
            raise InferError(grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"request {request.request_id} got no result within "
                             f"{timeout or self.deadlines.infer:.0f} s") from None
        except InferError:
            with self._lock:
                self.requests_failed += 1
            raise
        finally:
            with self._lock:
                self._in_flight.pop(request.request_id, None)
        with self._lock:
            self.requests_done += 1
        return InferResult(request.request_id, list(activation.tensors),
                           list(activation.timings),
                           (time.perf_counter() - request.started) * 1e3)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def _send(self, request: _InFlight) -> None:
        first = self.workers[0]
        message = pb.Activation(request_id=request.request_id, tensors=request.tensors,
                                epoch=self.epoch)
        try:
            first.stub.Forward(message, timeout=self.deadlines.forward)
        except grpc.RpcError as e:
            code = e.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                code = grpc.StatusCode.UNAVAILABLE
            why = self._why(first) if code == grpc.StatusCode.UNAVAILABLE else ""
            raise InferError(code, f"{first.label} refused request {request.request_id}: "
                                   f"{e.details()}{why}") from None

    def _resolve(self, request_id: str, result: pb.Activation | None = None,
                 error: InferError | None = None) -> None:
        with self._lock:
            request = self._in_flight.get(request_id)
        if request is None or request.future.done():
            return  # answered already, or timed out
        if error is not None:
            request.future.set_exception(error)
        else:
            request.future.set_result(result)

    def _listen(self, w: WorkerHandle) -> None:
        """Consume a worker's event stream; reconnect with backoff while the pipeline lives."""
        delay = 0.1
        while not self._closed.is_set():
            try:
                for event in w.stub.Subscribe(pb.SubscribeRequest()):
                    delay = 0.1
                    kind = event.WhichOneof("kind")
                    if kind == "result":
                        if event.result.epoch == self.epoch:
                            self._resolve(event.result.request_id, result=event.result)
                    elif kind == "failure":
                        f = event.failure
                        if f.epoch == self.epoch:
                            code = grpc.StatusCode(_code(f.code))
                            message = f.message
                            if (code == grpc.StatusCode.UNAVAILABLE
                                    and f.stage + 1 < len(self.workers)):
                                # A stage could not reach the next one: say why it died.
                                message += self._why(self.workers[f.stage + 1])
                            self._resolve(f.request_id, error=InferError(code, message))
            except grpc.RpcError as e:
                if self._closed.is_set():
                    return
                self._stage_lost(w, f"{e.code().name}: {e.details()}")
            if self._closed.wait(delay):
                return
            delay = min(delay * 2, 2.0)

    def _why(self, w: WorkerHandle) -> str:
        """``"; <what diagnose says about w's device>"``, or "" when it says nothing."""
        if self.diagnose is None:
            return ""
        try:
            why = self.diagnose(w.stage.device)
        except Exception:  # a diagnosis must never hide the failure it explains
            log.exception("diagnosing %s failed", w.label)
            return ""
        return f"; {why}" if why else ""

    def _stage_lost(self, w: WorkerHandle, why: str) -> None:
        """A worker's stream broke: everything in flight through it cannot complete."""
        with self._lock:
            pending = list(self._in_flight.values())
        if pending:
            why += self._why(w)
            log.error("lost %s (%s); failing %d request(s) in flight", w.label, why, len(pending))
        for r in pending:
            self._resolve(r.request_id, error=InferError(
                grpc.StatusCode.UNAVAILABLE,
                f"{w.label} stopped answering ({why}); request {r.request_id} could not "
                "complete"))

    # ------------------------------------------------------------------ status

    def status(self) -> pb.ClusterStatus:
        out = pb.ClusterStatus(plan_id=self.plan.plan_id, requests_done=self.requests_done,
                               requests_failed=self.requests_failed, in_flight=self.in_flight,
                               model_inputs=[encode_spec(t) for t in self.plan.model.inputs],
                               bindings=self.plan.model.bindings, model=self.plan.model.name)
        for w in self.workers:
            s = out.stages.add(stage=w.stage.index, device=w.stage.device.name,
                               address=w.stage.device.address,
                               planned_memory_mb=w.stage.predicted.memory_mb)
            try:
                s.worker.CopyFrom(w.stub.GetStatus(pb.StatusRequest(),
                                                   timeout=self.deadlines.control))
                s.healthy = True
            except grpc.RpcError:
                s.healthy = False
        return out

    def profile(self, since: float = 0.0) -> pb.ClusterProfile:
        """Every worker's memory samples since ``since`` (unix seconds)."""
        out = pb.ClusterProfile()
        for w in self.workers:
            s = w.stage
            entry = out.stages.add(stage=s.index, device=s.device.name, address=s.device.address,
                                   profile=s.device.profile, shard=s.shard,
                                   planned_memory_mb=s.predicted.memory_mb,
                                   budget_mb=s.device.memory_mb)
            try:
                entry.profile_data.CopyFrom(w.stub.GetProfile(
                    pb.ProfileRequest(since=since), timeout=self.deadlines.control))
            except grpc.RpcError as e:
                entry.error = f"{e.code().name}: {e.details()}"
        return out


def _code(value: int) -> tuple:
    for c in grpc.StatusCode:
        if c.value[0] == value:
            return c.value
    return grpc.StatusCode.UNKNOWN.value
