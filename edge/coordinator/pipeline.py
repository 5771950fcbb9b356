"""The coordinator's view of a running pipeline: a facade over its parts.

Every request in flight is kept with its inputs until its result arrives. When a device
stops answering, the monitor notices it (its event stream breaks, a stage reports it
unreachable, or it misses health checks), moves its work to the devices that remain under
a new epoch, and sends every request in flight again: nothing accepted is lost. Results
are matched by request id, so a result computed under an older epoch still answers its
request, and a request answered twice is answered once.

The parts, each with one job:

- ``state``: what is deployed now and whether it serves;
- ``inflight``: admission, the in-flight table, retries with backoff, resends (a step of a
  generated sequence is resent as its replay);
- ``generate``: the token loop of ``edge generate`` over :meth:`Pipeline.step`;
- ``events``: the workers' event streams (results and failures);
- ``monitor``: health probes, suspects, backoff of devices that refused a stage;
- ``recovery``: deploy, recover, give up, and take-over (with ``failover.Replanner``);
- ``workers``: the :class:`~edge.coordinator.workers.WorkerClient` they all talk through.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Callable, Mapping

import grpc
import numpy as np

from edge.coordinator import metrics
from edge.coordinator.deploy import Progress
from edge.coordinator.events import Listeners
from edge.coordinator.failover import Deployment, Replanner
from edge.coordinator.guard import BeyondModel, TooLarge, check_fits, request_sizes
from edge.coordinator.infer_batch import InferBatcher
from edge.coordinator.inflight import InferError, InferResult, InFlight
from edge.coordinator.monitor import BACKOFF_MAX_S, BACKOFF_S, Monitor
from edge.coordinator.recovery import Failover, Recovery
from edge.coordinator.state import Current
from edge.coordinator.workers import StageWorker, WorkerFactory, WorkerPool, grpc_workers
from edge.errors import TensorError
from edge.planning.plan import Device, Plan
from edge.proto import edge_pb2 as pb
from edge.transport.channels import Deadlines, Security
from edge.transport.codec import check_tensors, encode_spec, encode_tensors

__all__ = ["Pipeline", "InferError", "InferResult", "Recovery", "BACKOFF_S", "BACKOFF_MAX_S"]

log = logging.getLogger(__name__)


class Pipeline:
    """Deploys a plan, runs requests through it, and keeps it running when devices fail.

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
        failover: move work off a device that stops answering and resend the requests in
            flight (False: fail them with UNAVAILABLE naming the device).
        model: the source model, for re-plans (default: the one plan.json names).
        health_interval: seconds between health checks of every device.
        misses: health checks in a row a device may miss before it counts as lost (a
            device whose event stream broke counts as lost at its first miss).
        max_losses: device losses a request may be in flight through and still be sent
            again; at the next one it fails. A request that kills the worker it reaches
            (say, an input so large the kernel kills the worker for memory) must not
            take down the devices it is resent to, one after another.
        on_change: called with each :class:`Recovery` (``edge coordinator`` prints it).
        take_over: configure the workers even if another coordinator that is alive owns
            them (``edge coordinator --take-over``); that one then stops serving. Without
            it, such a worker refuses, and :meth:`start` raises naming the owner. Only
            the first deployment takes over: failover never takes a device from another
            coordinator.
        backoff_s: seconds a device that failed to take a stage is first left out of the
            layouts (doubling with each failure in a row, up to ``BACKOFF_MAX_S``).
        worker_factory: makes the client of the worker at an address (default: gRPC with
            ``security``); tests pass ``edge.coordinator.fake.FakeCluster.client``.
        replanner: finds the deployment for the devices that answer (default: a
            :class:`~edge.coordinator.failover.Replanner` of ``plan``).
        infer_batch, infer_slots: above 1, Infer requests past ``infer_slots`` in flight
            (default two per stage) wait and go as batches of at most ``infer_batch``
            (:mod:`edge.coordinator.infer_batch`); 1: each is sent at once, alone.

    Every Pipeline has its own ``coordinator_id`` (a uuid), sent with each Configure and
    Subscribe: see the README's "Two coordinators" for the ownership rule.
    """

    def __init__(self, plan: Plan, plan_dir: Path, *, deadlines: Deadlines = Deadlines(),
                 security: Security = Security(), max_in_flight: int = 64,
                 diagnose: Callable[[Device], str | None] | None = None,
                 failover: bool = True, model: Path | None = None,
                 health_interval: float = 0.5, misses: int = 3, max_losses: int = 1,
                 on_change: Callable[[Recovery], None] | None = None,
                 take_over: bool = False, backoff_s: float = BACKOFF_S,
                 worker_factory: WorkerFactory | None = None,
                 replanner: Replanner | None = None, infer_batch: int = 1,
                 infer_slots: int | None = None):
        self.deadlines = deadlines
        self.security = security
        self.max_in_flight = max_in_flight
        self.diagnose = diagnose
        self.failover = failover
        self.take_over = take_over
        self.coordinator_id = uuid.uuid4().hex
        self.replanner = replanner or Replanner(
            plan, Path(plan_dir), Path(model) if model else plan.source_model(plan_dir))
        self.pool = WorkerPool(worker_factory or grpc_workers(security))
        self._current = cur = Current(plan, Path(plan_dir), self.coordinator_id)
        self._monitor = Monitor(cur, self.replanner.devices, self.pool, deadlines.control,
                                health_interval, misses, backoff_s,
                                on_taken=lambda w, why: self._failover.taken(w, why),
                                progress=lambda: self._requests.done + self._requests.direct)
        self._requests = InFlight(cur, deadlines.forward, max_in_flight, failover,
                                  suspect=self._monitor.suspect, why=self._why)
        self._listeners = Listeners(cur, self._requests, failover,
                                    suspect=self._monitor.suspect,
                                    on_taken=lambda w, why: self._failover.taken(w, why),
                                    why=self._why)
        self._failover = Failover(cur, self.replanner, self._monitor, self._requests,
                                  self._listeners, self.pool, deadlines, max_losses, on_change)
        self.batcher = InferBatcher(self, self._requests, infer_batch, infer_slots)
        metrics.watch_pipeline(self)

    # ------------------------------------------------------------------ lifecycle

    def start(self, progress: Progress | None = None) -> None:
        """Wait for every worker, upload missing shards, wire the chain, listen for results."""
        cur = self._current
        self._failover.switch(Deployment(cur.plan, cur.plan_dir, "original"), progress,
                              take_over=self.take_over)
        if self.failover:
            self._failover.start()

    def close(self) -> None:
        cur = self._current
        metrics.unwatch_pipeline(self)
        cur.closed.set()
        cur.wake.set()
        cur.serving.set()  # wake requests waiting for a recovery
        self._failover.stop(self.deadlines.control)  # and let go of the workers
        self.pool.close()
        self._requests.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ state

    @property
    def plan(self) -> Plan:
        """The plan deployed now (a re-plan after a failover replaces it)."""
        return self._current.plan

    @property
    def plan_dir(self) -> Path:
        return self._current.plan_dir

    @property
    def workers(self) -> list[StageWorker]:
        """The stages deployed now, on their workers, in order."""
        return self._current.workers

    @property
    def epoch(self) -> int:
        return self._current.epoch

    @property
    def recoveries(self) -> list[Recovery]:
        return self._failover.recoveries

    @property
    def requests_done(self) -> int:
        return self._requests.done

    @property
    def requests_failed(self) -> int:
        return self._requests.failed

    @property
    def in_flight(self) -> int:
        """Requests sent and not answered (a batch counts once), and those waiting to be."""
        return len(self._requests) + self.batcher.waiting

    @property
    def not_serving(self) -> str:
        """Why no request can be served now ("" while they can)."""
        return self._current.not_serving()

    @property
    def taken_over(self) -> str:
        """Why another coordinator owns the workers now ("" while they are ours)."""
        return self._current.taken_over

    def watch_serving(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call ``callback(why)`` now and each time the pipeline stops serving (why it
        cannot) or serves again, a re-deployment included (""); ``edge coordinator`` sets
        its health service by it. Returns what stops the calls.

        Args:
            callback: takes the reason, "" when serving.
        """
        self._current.watch(callback)
        return lambda: self._current.unwatch(callback)

    def route(self) -> pb.Route:
        """Where a direct client sends requests now (see ``edge.coordinator.direct``)."""
        return self._current.direct_route()

    # ------------------------------------------------------------------ requests

    def infer(self, inputs: Mapping[str, np.ndarray] | list[pb.Tensor],
              timeout: float | None = None) -> InferResult:
        """Run one request through the pipeline and wait for its outputs. While the
        pipeline recovers from a lost device the request waits (within its deadline); it
        is answered once, by whichever of its sends completes first.

        Args:
            inputs: the model's inputs by name, or already-encoded wire tensors.
            timeout: seconds to wait (default: the infer deadline).

        Raises:
            InferError: with the status code to report.
        """
        with metrics.tracked("infer"):
            return self.batcher.infer(checked_request(self.plan, inputs),
                                      timeout or self.deadlines.infer)

    async def infer_async(self, inputs: Mapping[str, np.ndarray] | list[pb.Tensor],
                          timeout: float | None = None) -> InferResult:
        """:meth:`infer` on an event loop, free while the request is in flight."""
        with metrics.tracked("infer"):  # a cancelled call (client gone) is not counted
            return await self.batcher.infer_async(checked_request(self.plan, inputs),
                                                  timeout or self.deadlines.infer)

    def step(self, tensors: list[pb.Tensor], step: pb.Step,
             replay: Callable[[], tuple[list[pb.Tensor], pb.Step]], cache_epoch: int = -1,
             timeout: float | None = None,
             on_admit: Callable[[str], None] | None = None) -> pb.Activation:
        """Run one step of a generated sequence and wait for its result (``tokens`` set).

        Sent, retried and resent like an Infer, except that every send after the first,
        and one under another epoch than ``cache_epoch``, sends ``replay`` instead (see
        :mod:`edge.coordinator.inflight`). The tensors are not checked against the plan:
        :mod:`edge.coordinator.generate` builds them from it.

        Args:
            tensors: the step's inputs (``input_ids``, ``attention_mask``, ``position_ids``).
            step: the sequence, position and sampling.
            replay: builds the same step restarted at position 0 with every token so
                far (called only if it is sent).
            cache_epoch: the epoch of the sequence's last result (-1: a prefill).
            timeout: seconds to wait (default: the infer deadline).
            on_admit: told the request id once admitted (to :meth:`cancel` it).

        Raises:
            InferError: with the status code to report.
        """
        request = self._requests.admit(tensors, step, replay, cache_epoch)
        if on_admit is not None:
            on_admit(request.request_id)
        return self._requests.wait(request, timeout or self.deadlines.infer)

    def step_batch(self, tensors: list[pb.Tensor], rows: list[pb.Step], cache_epoch: int,
                   timeout: float | None = None) -> pb.Activation:
        """Run one decode step of each of several sequences as one request and wait for
        its result (a token per row); sent once, under ``cache_epoch`` only (see
        :mod:`edge.coordinator.batcher`).

        Args:
            tensors: the batch's inputs, row i being ``rows[i]``'s step.
            rows: each row's sequence, position and sampling.
            cache_epoch: the epoch of every row's last result.
            timeout: seconds to wait (default: the infer deadline).

        Raises:
            InferError: with the status code to report (BROKEN_UP: replay each row).
        """
        request = self._requests.admit(tensors, cache_epoch=cache_epoch, rows=rows)
        return self._requests.wait(request, timeout or self.deadlines.infer)

    def cancel(self, request_id: str, why: str) -> None:
        """Answer a request in flight with CANCELLED (its caller went away)."""
        self._requests.resolve(request_id, error=InferError(grpc.StatusCode.CANCELLED, why,
                                                            retryable=False))

    def release(self, sequence_id: str) -> None:
        """Free a sequence's caches on every stage: best effort, not waited for."""
        self._requests.send_once(pb.Step(sequence_id=sequence_id, release=True))

    def _why(self, w: StageWorker) -> str:
        return diagnosis(self.diagnose, w)

    # ------------------------------------------------------------------ status

    def status(self) -> pb.ClusterStatus:
        """The cluster as the coordinator sees it; asks every worker its status."""
        plan = self.plan
        out = pb.ClusterStatus(plan_id=plan.plan_id, requests_done=self.requests_done,
                               requests_direct=self._requests.direct,
                               requests_failed=self.requests_failed, in_flight=self.in_flight,
                               model_inputs=[encode_spec(t) for t in plan.model.inputs],
                               bindings=plan.model.bindings, model=plan.model.name,
                               coordinator_id=self.coordinator_id)
        for w in self.workers:
            s = out.stages.add(stage=w.stage.index, device=w.stage.device.name,
                               address=w.stage.device.address,
                               planned_memory_mb=w.stage.predicted.memory_mb,
                               planned_kv_cache_mb=w.stage.predicted.kv_cache_mb)
            try:
                s.worker.CopyFrom(w.client.status(self.deadlines.control))
                # Answering is not enough: it must serve this coordinator's stage.
                s.healthy = (s.worker.coordinator_id == self.coordinator_id
                             and s.worker.epoch == self.epoch)
                owner = s.worker.coordinator_id
                if owner and owner != self.coordinator_id:
                    self._failover.taken(w, f"it now belongs to coordinator {owner} (plan "
                                            f"{s.worker.plan_id}, epoch {s.worker.epoch})")
            except grpc.RpcError as e:
                # Said, not swallowed: a caller reading this worker's memory gets nothing.
                log.warning("status of stage %d on %s (%s) failed: %s: %s", w.stage.index,
                            w.stage.device.name, w.stage.device.address, e.code().name,
                            e.details())
                s.healthy = False
        out.not_serving = self._current.not_serving()
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
                entry.profile_data.CopyFrom(w.client.profile(since, self.deadlines.control))
            except grpc.RpcError as e:
                entry.error = f"{e.code().name}: {e.details()}"
        return out


def diagnosis(diagnose: Callable[[Device], str | None] | None, w: StageWorker) -> str:
    """``"; <what diagnose says about w's device>"``, or "" when it says nothing."""
    if diagnose is None:
        return ""
    try:
        why = diagnose(w.stage.device)
    except Exception:  # a diagnosis must never hide the failure it explains
        log.exception("diagnosing %s failed", w.label)
        return ""
    return f"; {why}" if why else ""


def checked_request(plan: Plan, inputs: Mapping[str, np.ndarray] | list[pb.Tensor]
                    ) -> list[pb.Tensor]:
    """An Infer request's wire tensors, once checked against the plan's inputs and the
    sizes its devices hold.

    Raises:
        InferError: INVALID_ARGUMENT (wrong names, dtypes, ranks, beyond the model's own
            limits) or RESOURCE_EXHAUSTED (more than the devices hold).
    """
    if isinstance(inputs, Mapping):
        try:
            check_tensors(inputs, plan.model.inputs, "the model")
        except TensorError as e:
            raise InferError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        shapes = [(k, v.shape) for k, v in inputs.items()]
        tensors = encode_tensors(inputs)
    else:
        tensors = list(inputs)
        shapes = [(t.name, tuple(t.shape)) for t in tensors]
    try:
        check_fits(plan, request_sizes(plan.model.inputs, shapes))
    except BeyondModel as e:
        raise InferError(grpc.StatusCode.INVALID_ARGUMENT, str(e), retryable=False) from None
    except TooLarge as e:
        raise InferError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e), retryable=False) from None
    return tensors
