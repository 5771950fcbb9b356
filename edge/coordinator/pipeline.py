"""The coordinator's view of a running pipeline: who serves which stage, which requests
are in flight, and where their results and failures come back.

Every request in flight is kept here with its inputs until its result arrives. When a
device stops answering, a monitor notices it (its event stream breaks, a stage reports it
unreachable, or it misses health checks), moves its work to the devices that remain
(``edge.coordinator.failover``) under a new epoch, and sends every request in flight
again: nothing accepted is lost. Results are matched by request id, so a result computed
under an older epoch still answers its request, and a request answered twice is answered
once.
"""

from __future__ import annotations

import dataclasses
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
from grpc_health.v1 import health_pb2

from edge.coordinator.deploy import DeployError, Link, Progress, WorkerHandle, deploy
from edge.coordinator.failover import Deployment, NoCapacity, Replanner
from edge.coordinator.guard import BeyondModel, TooLarge, check_fits, request_sizes
from edge.errors import EdgeError, TensorError
from edge.planning.plan import Device, Plan, Stage
from edge.proto import edge_pb2 as pb
from edge.transport.channels import Deadlines, Security
from edge.transport.codec import check_tensors, encode_spec, encode_tensors

__all__ = ["Pipeline", "InferError", "InferResult", "Recovery"]

log = logging.getLogger(__name__)

# A device that failed to take a stage is left out of the layouts for this long, doubling
# with each failure in a row, up to the cap: re-plan over the rest meanwhile, and do not
# hammer a device that keeps saying no (a full disk, a budget below cluster.yaml's).
BACKOFF_S = 1.0
BACKOFF_MAX_S = 60.0

# Failures a stage reports that say nothing about the request itself: it is sent again
# (a next hop gone or full, a stage on another epoch, a call cut by a re-wiring).
_RETRY = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
                    grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED})


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


@dataclass(frozen=True)
class Recovery:
    """One change of the pipeline's devices, as the coordinator saw it.

    Attributes:
        lost: names of the devices that stopped answering.
        joined: names of the devices that came (back) into the pipeline.
        how: "original", "standby", "re-planned", or "unavailable" (nothing fits).
        devices: the pipeline's devices afterwards, in order.
        noticed_s: from the first sign (a broken stream, a missed health check) to the
            decision that a device is lost; 0 when a device joined.
        seconds: from that decision to serving again.
        uploaded_bytes: shard bytes sent (0: every worker had its shard cached).
        resent: requests in flight that were sent again.
        message: for "unavailable", why.
    """

    lost: tuple[str, ...]
    joined: tuple[str, ...]
    how: str
    devices: tuple[str, ...]
    seconds: float
    noticed_s: float = 0.0
    uploaded_bytes: int = 0
    resent: int = 0
    message: str = ""

    def describe(self) -> str:
        change = "; ".join(x for x in (f"lost {', '.join(self.lost)}" if self.lost else "",
                                       f"{', '.join(self.joined)} joined" if self.joined else "")
                           if x)
        if self.how == "unavailable":
            return f"{change}: cannot serve: {self.message.splitlines()[0]}"
        noticed = f"noticed in {self.noticed_s:.2f} s, " if self.lost else ""
        return (f"{change}: {noticed}{self.how} onto {', '.join(self.devices)} in "
                f"{self.seconds:.2f} s "
                f"({self.uploaded_bytes / 2**20:.1f} MiB uploaded, {self.resent} request(s) "
                "in flight sent again)")


@dataclass
class _InFlight:
    request_id: str
    tensors: list[pb.Tensor]
    started: float
    future: Future = field(default_factory=Future)
    sent_epoch: int = -1      # the epoch it was last sent under (-1: not sent yet)
    retry_at: float = 0.0     # monotonic time of its next send, when it waits for one
    attempts: int = 0         # sends so far
    losses: int = 0           # device losses it was in flight through


@dataclass
class _Backoff:
    failures: int = 0         # deployments in a row it failed
    until: float = 0.0        # monotonic time before which it is left out
    why: str = ""


@dataclass
class _Probe:
    misses: int = 0
    suspect: str = ""         # why we think it is gone ("" if we do not)
    since: float = 0.0        # monotonic time of the first sign of trouble (0: none)


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

    Every Pipeline has its own ``coordinator_id`` (a uuid), sent with each Configure and
    Subscribe: see the README's "Two coordinators" for the ownership rule.
    """

    def __init__(self, plan: Plan, plan_dir: Path, *, deadlines: Deadlines = Deadlines(),
                 security: Security = Security(), max_in_flight: int = 64,
                 diagnose: Callable[[Device], str | None] | None = None,
                 failover: bool = True, model: Path | None = None,
                 health_interval: float = 0.5, misses: int = 3, max_losses: int = 1,
                 on_change: Callable[[Recovery], None] | None = None,
                 take_over: bool = False, backoff_s: float = BACKOFF_S):
        self.plan = plan
        self.plan_dir = Path(plan_dir)
        self.deadlines = deadlines
        self.security = security
        self.max_in_flight = max_in_flight
        self.diagnose = diagnose
        self.failover = failover
        self.health_interval = health_interval
        self.misses = misses
        self.max_losses = max_losses
        self.on_change = on_change
        self.take_over = take_over
        self.backoff_s = backoff_s
        self.coordinator_id = uuid.uuid4().hex
        self.replanner = Replanner(plan, self.plan_dir,
                                   Path(model) if model else plan.source_model(self.plan_dir))
        self.epoch = 0
        self.workers: list[WorkerHandle] = []
        self.recoveries: list[Recovery] = []
        self.requests_done = 0
        self.requests_failed = 0
        self._lock = threading.Lock()
        self._in_flight: dict[str, _InFlight] = {}
        self._channels: dict[str, WorkerHandle] = {}   # by address, reused across plans
        self._listeners: dict[str, threading.Thread] = {}
        self._probes: dict[str, _Probe] = {d.address: _Probe() for d in self.replanner.devices}
        self._serving = threading.Event()
        self._unavailable = ""        # why requests cannot be served now ("" if they can)
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._monitor: threading.Thread | None = None
        self._stale = False                     # a worker restarted and forgot its stage
        self._failed_layout: tuple[str, ...] = ()  # devices no plan fitted on
        self._excluded: dict[str, _Backoff] = {}  # devices that failed to take a stage
        self._taken_over = ""         # why another coordinator owns our workers now
        self._serving_watchers: list[Callable[[str], None]] = []
        self._refused_streams: dict[str, grpc.StatusCode] = {}  # logged once per address

    # ------------------------------------------------------------------ lifecycle

    def start(self, progress: Progress | None = None) -> None:
        """Wait for every worker, upload missing shards, wire the chain, listen for results."""
        self._switch(Deployment(self.plan, self.plan_dir, "original"), progress,
                     take_over=self.take_over)
        if self.failover:
            self._monitor = threading.Thread(target=self._watch, daemon=True,
                                             name="edge-monitor")
            self._monitor.start()

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        self._serving.set()  # wake requests waiting for a recovery
        for link in self._channels.values():
            link.close()
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

        While the pipeline recovers from a lost device the request waits (within its
        deadline); it is answered once, by whichever of its sends completes first.

        Args:
            inputs: the model's inputs by name, or already-encoded wire tensors.
            timeout: seconds to wait (default: the infer deadline).

        Raises:
            InferError: with the status code to report.
        """
        plan = self.plan
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
            raise InferError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e),
                             retryable=False) from None
        timeout = timeout or self.deadlines.infer
        request = _InFlight(uuid.uuid4().hex, tensors, time.perf_counter())
        with self._lock:
            if self._unavailable:
                raise InferError(grpc.StatusCode.UNAVAILABLE, self._unavailable,
                                 retryable=not self._taken_over)
            if len(self._in_flight) >= self.max_in_flight:
                raise InferError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"{self.max_in_flight} requests already in flight; retry later")
            self._in_flight[request.request_id] = request
        try:
            if self._serving.wait(timeout):
                self._send(request)
            activation = request.future.result(
                max(0.0, timeout - (time.perf_counter() - request.started)))
        except FutureTimeout:
            with self._lock:
                self.requests_failed += 1
            raise InferError(grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"request {request.request_id} got no result within "
                             f"{timeout:.0f} s{self._state()}") from None
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

    def _state(self) -> str:
        if self._unavailable:
            return f"; {self._unavailable}"
        if not self._serving.is_set():
            return "; the pipeline is recovering from a lost device"
        return ""

    def _send(self, request: _InFlight) -> None:
        """Hand the request to the first stage, without waiting for it to be accepted.

        A refusal that is not the request's fault (the stage is gone, full, or on another
        epoch) leaves it for the monitor to send again; other refusals answer it.
        """
        with self._lock:
            if request.future.done() or not self.workers:
                return
            first, epoch = self.workers[0], self.epoch
            request.sent_epoch, request.attempts = epoch, request.attempts + 1
        message = pb.Activation(request_id=request.request_id, tensors=request.tensors,
                                epoch=epoch)
        call = first.stub.Forward.future(message, timeout=self.deadlines.forward)
        call.add_done_callback(lambda c: self._sent(request, epoch, first, c))

    def _sent(self, request: _InFlight, epoch: int, first: WorkerHandle, call) -> None:
        if call.cancelled() or call.code() == grpc.StatusCode.OK:
            return
        code = call.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            code = grpc.StatusCode.UNAVAILABLE
        if self.failover and code in _RETRY:
            self._retry_later(request, epoch, first, code, call.details())
            return
        why = self._why(first) if code == grpc.StatusCode.UNAVAILABLE else ""
        self._resolve(request.request_id, error=InferError(
            code, f"{first.label} refused request {request.request_id}: {call.details()}{why}"))

    def _retry_later(self, request: _InFlight, epoch: int, w: WorkerHandle,
                     code: grpc.StatusCode, details: str) -> None:
        why = f"{code.name}: {details}"
        if request.attempts >= 8:
            self._resolve(request.request_id, error=InferError(
                grpc.StatusCode.UNAVAILABLE,
                f"request {request.request_id} was sent {request.attempts} times and never "
                f"completed; last: {w.label}: {why}"))
            return
        with self._lock:
            if request.sent_epoch == epoch:
                request.retry_at = time.monotonic() + min(2.0, 0.05 * 2 ** request.attempts)
        if code == grpc.StatusCode.UNAVAILABLE:
            self._suspect(w.stage.device.address, why)
        self._wake.set()

    def _resolve(self, request_id: str, result: pb.Activation | None = None,
                 error: InferError | None = None) -> None:
        with self._lock:
            request = self._in_flight.get(request_id)
        if request is None or request.future.done():
            return  # answered already, or timed out
        try:
            if error is not None:
                request.future.set_exception(error)
            else:
                request.future.set_result(result)
        except Exception:  # set twice by two threads at once: the first answer stands
            pass

    # ------------------------------------------------------------------ events

    def _listen(self, address: str) -> None:
        """Consume a worker's event stream while its device is in the pipeline;
        reconnect with backoff."""
        delay = 0.1
        while not self._closed.is_set():
            with self._lock:
                w = next((w for w in self.workers if w.stage.device.address == address), None)
            if w is None or self._taken_over:
                return  # no longer in the pipeline, or no longer ours
            try:
                # No deadline: the stream lasts as long as the pipeline; keepalives and
                # health checks tell when its device is gone.
                for event in w.stub.Subscribe(
                        pb.SubscribeRequest(coordinator_id=self.coordinator_id)):
                    self._refused_streams.pop(address, None)
                    delay = 0.1
                    self._on_event(event)
            except grpc.RpcError as e:
                if self._closed.is_set():
                    return
                code = e.code()
                if code == grpc.StatusCode.ABORTED:
                    # The worker ends the stream of the coordinator it was taken from.
                    self._taken(w, e.details())
                    return
                if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                grpc.StatusCode.DEADLINE_EXCEEDED) \
                        and self._refused_streams.get(address) != code:
                    # Refused (too many streams, a token): results from it cannot arrive
                    # until it accepts one. Said once until a stream is accepted again.
                    self._refused_streams[address] = code
                    log.warning("%s refused this coordinator's event stream: %s: %s; its "
                                "results cannot arrive until it accepts one (retrying)",
                                w.label, code.name, e.details())
                self._stream_broke(w, f"{code.name}: {e.details()}")
            if self._closed.wait(delay):
                return
            delay = min(delay * 2, 2.0)

    def _on_event(self, event: pb.Event) -> None:
        kind = event.WhichOneof("kind")
        if kind == "result":
            # Whatever the epoch: a result that went through every stage is right.
            self._resolve(event.result.request_id, result=event.result)
            return
        if kind != "failure":
            return
        f = event.failure
        with self._lock:
            if f.epoch != self.epoch:
                return  # about an older wiring: the request was sent again since
            request = self._in_flight.get(f.request_id)
            workers = list(self.workers)
        code = grpc.StatusCode(_code(f.code))
        message = f.message
        next_stage = workers[f.stage + 1] if f.stage + 1 < len(workers) else None
        if self.failover and code in _RETRY and request is not None:
            target = next_stage if code == grpc.StatusCode.UNAVAILABLE and next_stage \
                else workers[min(f.stage, len(workers) - 1)]
            self._retry_later(request, f.epoch, target, code, message)
            return
        if code == grpc.StatusCode.UNAVAILABLE and next_stage is not None:
            message += self._why(next_stage)  # a stage could not reach the next one
        self._resolve(f.request_id, error=InferError(code, message))

    def _stream_broke(self, w: WorkerHandle, why: str) -> None:
        if self.failover:
            self._suspect(w.stage.device.address, why)
            return
        # Without failover everything in flight through it cannot complete.
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

    # ------------------------------------------------------------------ failover

    def _suspect(self, address: str, why: str) -> None:
        with self._lock:
            probe = self._probes.setdefault(address, _Probe())
            if not probe.suspect:
                probe.suspect = why
                probe.since = probe.since or time.monotonic()
        self._wake.set()

    def _link(self, device: Device) -> Link:
        """The channel to ``device``, opened once and kept across plans."""
        if device.address not in self._channels:
            self._channels[device.address] = Link.open(device.address, self.security)
        return self._channels[device.address]

    def _handle(self, stage: Stage) -> WorkerHandle:
        return self._link(stage.device).handle(stage)

    def _probe(self) -> set[str]:
        """Health-check every device; returns the addresses that count as up."""
        checks = {}
        for d in self.replanner.devices:
            checks[d.address] = self._link(d).health.Check.future(
                health_pb2.HealthCheckRequest(service="edge.v1.Worker"),
                timeout=min(self.deadlines.control, max(0.2, 4 * self.health_interval)))
        up = set()
        with self._lock:
            current = {w.stage.device.address: w for w in self.workers}
        for address, future in checks.items():
            try:
                ok = future.result().status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                ok = False
            with self._lock:
                probe = self._probes.setdefault(address, _Probe())
                if ok:
                    probe.misses = 0
                    if not probe.suspect:
                        probe.since = 0.0
                else:
                    probe.misses += 1
                    probe.since = probe.since or time.monotonic()
                allowed = 1 if probe.suspect else self.misses
                is_up = probe.misses < allowed
                suspect = probe.suspect
            if ok and suspect and address in current:
                # Its stream broke but it answers: did it restart and forget its stage?
                try:
                    status = current[address].stub.GetStatus(pb.StatusRequest(),
                                                             timeout=self.deadlines.control)
                    if status.coordinator_id and status.coordinator_id != self.coordinator_id:
                        self._taken(current[address], (
                            f"it now belongs to coordinator {status.coordinator_id} (plan "
                            f"{status.plan_id}, epoch {status.epoch})"))
                        return up
                    if not (status.configured and status.epoch == self.epoch):
                        self._stale = True  # up, but its stage must be deployed again
                except grpc.RpcError:
                    is_up = False
                with self._lock:
                    self._probes[address].suspect = ""
            if is_up:
                up.add(address)
        return up

    def _watch(self) -> None:
        """The monitor: probe, move work when the devices that answer change, resend."""
        while not self._closed.is_set():
            self._wake.wait(self.health_interval)
            self._wake.clear()
            if self._closed.is_set() or self._taken_over:
                return  # taken over: another coordinator serves; do not fight it
            try:
                up = self._probe()
                if self._closed.is_set() or self._taken_over:
                    return
                up -= self._left_out()
                with self._lock:
                    current = tuple(w.stage.device.address for w in self.workers)
                    unavailable = self._unavailable
                placed, _ = self.replanner.layout(up)
                wanted = tuple(d.address for d in placed)
                if unavailable:
                    # Try again only once the devices that answer have changed.
                    if wanted != self._failed_layout:
                        self._recover(up, current, wanted)
                elif wanted != current or self._stale:
                    self._recover(up, current, wanted)
                self._resend_due()
            except Exception:  # the monitor must outlive any one bad round
                log.exception("failover monitor round failed")

    def _recover(self, up: set[str], before: tuple[str, ...], wanted: tuple[str, ...]) -> None:
        start = time.monotonic()
        self._stale = False
        names = {d.address: d.name for d in self.replanner.devices}
        lost = tuple(names[a] for a in before if a not in up)
        with self._lock:
            signs = [self._probes[a].since for a in before if a not in up
                     and self._probes[a].since]
        noticed = start - min(signs) if signs else 0.0
        self._serving.clear()
        try:
            deployment = self.replanner.deployment(up)
        except NoCapacity as e:
            self._give_up(f"{e}{self._left_out_note()}", lost, start, wanted, noticed)
            return
        joined = tuple(d.name for d in deployment.plan.devices if d.address not in before)
        log.info("failover: %s; deploying %s plan onto %s", ", ".join(
            [f"lost {', '.join(lost)}"] * bool(lost) + [f"{', '.join(joined)} joined"] * bool(joined))
            or "a worker restarted", deployment.how,
            ", ".join(d.name for d in deployment.plan.devices))
        try:
            uploaded = self._switch(deployment, None)
        except DeployError as e:
            if self._taken_over:
                return
            if not e.address:  # not one device's fault (a shard file missing here)
                self._give_up(str(e), lost, start, wanted, noticed)
                return
            # That device is left out of the next layouts for a while (it is up, so health
            # checks alone would put it straight back), and the next round, at once, finds
            # a layout over the rest.
            self._leave_out(e)
            if set(e.configured) & set(before):
                self._stale = True  # the running pipeline was partly re-wired: redo it
            elif before and all(a in up for a in before):
                self._serving.set()  # the running pipeline is untouched and whole
            self._wake.set()
            return
        with self._lock:
            pending = [r for r in self._in_flight.values() if not r.future.done()]
            if lost or not joined:  # a device lost, or a worker that restarted empty
                for r in pending:
                    r.losses += 1
        resent = 0
        for r in pending:
            if r.losses > self.max_losses:
                self._resolve(r.request_id, error=InferError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"request {r.request_id} was in flight through {r.losses} device losses; "
                    "giving up on it (it may be what brings them down)"))
            else:
                self._send(r)
                resent += 1
        self._record(Recovery(lost=lost, joined=joined, how=deployment.how,
                              devices=tuple(d.name for d in deployment.plan.devices),
                              seconds=time.monotonic() - start, noticed_s=noticed,
                              uploaded_bytes=uploaded,
                              resent=resent))

    def _give_up(self, why: str, lost: tuple[str, ...], start: float,
                 layout: tuple[str, ...], noticed: float) -> None:
        """Nothing fits: fail what is in flight and refuse new requests until the devices
        that answer change."""
        with self._lock:
            self._unavailable = why
            self._failed_layout = layout
            pending = [r for r in self._in_flight.values() if not r.future.done()]
        self._serving.set()  # waiting requests wake up and see _unavailable
        self._tell_serving(why)
        for r in pending:
            self._resolve(r.request_id, error=InferError(grpc.StatusCode.UNAVAILABLE, why))
        self._record(Recovery(lost=lost, joined=(), how="unavailable", devices=(),
                              seconds=time.monotonic() - start, noticed_s=noticed,
                              message=why))

    def _record(self, recovery: Recovery) -> None:
        self.recoveries.append(recovery)
        # Said once: to on_change if someone listens (edge coordinator prints it), else
        # to the log.
        level = (logging.INFO if self.on_change else
                 logging.ERROR if recovery.how == "unavailable" else logging.WARNING)
        log.log(level, "failover: %s", recovery.describe())
        if self.on_change:
            try:
                self.on_change(recovery)
            except Exception:
                log.exception("on_change failed")

    def _switch(self, deployment: Deployment, progress: Progress | None,
                take_over: bool = False) -> int:
        """Deploy under a new epoch and make it the current one. Returns bytes uploaded."""
        handles = [self._handle(s) for s in deployment.plan.stages]
        epoch = max(time.time_ns() // 1000, self.epoch + 1)
        deadlines = self.deadlines
        if self.workers:  # a recovery: every device answered a health check just now
            deadlines = dataclasses.replace(deadlines, ready=min(deadlines.ready, 5.0))
        with self._lock:
            serving = frozenset(w.stage.device.address for w in self.workers)
        uploaded = deploy(deployment.plan, deployment.plan_dir, handles, epoch, deadlines,
                          progress, coordinator_id=self.coordinator_id, take_over=take_over,
                          serving=serving)
        with self._lock:
            if self._taken_over:  # taken over while deploying: do not undo it
                raise DeployError(self._unavailable, grpc.StatusCode.ABORTED)
            self.plan, self.plan_dir = deployment.plan, deployment.plan_dir
            self.workers, self.epoch = handles, epoch
            self._unavailable = ""
            for w in handles:
                probe = self._probes.setdefault(w.stage.device.address, _Probe())
                probe.suspect, probe.since = "", 0.0
                self._excluded.pop(w.stage.device.address, None)
        self._tell_serving("")
        for w in handles:
            address = w.stage.device.address
            t = self._listeners.get(address)
            if t is None or not t.is_alive():
                t = threading.Thread(target=self._listen, args=(address,), daemon=True,
                                     name=f"edge-events-{w.stage.device.name}")
                self._listeners[address] = t
                t.start()
        self._serving.set()
        return uploaded

    def _leave_out(self, e: DeployError) -> None:
        """Leave the device ``e`` names out of the layouts, for longer each time in a row."""
        with self._lock:
            b = self._excluded.setdefault(e.address, _Backoff())
            b.failures += 1
            delay = min(BACKOFF_MAX_S, self.backoff_s * 2 ** (b.failures - 1))
            b.until, b.why = time.monotonic() + delay, f"{e.kind}: {e}"
        # Once per backoff, not once per monitor round.
        log.warning("failover: leaving device %s (%s) out for %.0f s (failure %d in a row), "
                    "re-planning over the rest: it %s its stage: %s",
                    e.device, e.address, delay, b.failures,
                    "refused" if e.kind == "refused" else "did not take", e)

    def _left_out(self) -> set[str]:
        """Addresses still in their backoff."""
        now = time.monotonic()
        with self._lock:
            return {a for a, b in self._excluded.items() if b.until > now}

    def _left_out_note(self) -> str:
        now = time.monotonic()
        names = {d.address: d.name for d in self.replanner.devices}
        with self._lock:
            out = [f"{names.get(a, a)} (tried again in {b.until - now:.0f} s; {b.why})"
                   for a, b in self._excluded.items() if b.until > now]
        return f"; left out after failing to take a stage: {'; '.join(out)}" if out else ""

    def _taken(self, w: WorkerHandle, why: str) -> None:
        """Another coordinator took our workers: say so once, stop serving, fail what is in
        flight, and do not fight back (no re-deploy)."""
        message = (f"this coordinator ({self.coordinator_id}) was taken over by another "
                   f"one: {w.label} says: {why}. It no longer serves requests: send them to "
                   "the coordinator that took over, or stop that one and restart this one")
        with self._lock:
            if self._taken_over:
                return
            self._taken_over = why
            self._unavailable = message
            pending = [r for r in self._in_flight.values() if not r.future.done()]
        log.error("%s", message)
        self._serving.set()  # waiting requests wake up and see _unavailable
        self._wake.set()
        self._tell_serving(message)
        for r in pending:
            self._resolve(r.request_id, error=InferError(grpc.StatusCode.UNAVAILABLE, message,
                                                         retryable=False))

    @property
    def taken_over(self) -> str:
        """Why another coordinator owns the workers now ("" while they are ours)."""
        return self._taken_over

    def watch_serving(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(why)`` now and each time the pipeline stops serving (why it
        cannot) or serves again (""); ``edge coordinator`` sets its health service by it.

        Args:
            callback: takes the reason, "" when serving.
        """
        self._serving_watchers.append(callback)
        callback(self._unavailable)

    def _tell_serving(self, why: str) -> None:
        for callback in list(self._serving_watchers):
            try:
                callback(why)
            except Exception:
                log.exception("a serving watcher failed")

    def _resend_due(self) -> None:
        """Send again the requests whose retry time has come or that were sent under an
        older epoch."""
        if not self._serving.is_set() or self._unavailable:
            return
        now = time.monotonic()
        with self._lock:
            due = [r for r in self._in_flight.values() if not r.future.done() and (
                (r.sent_epoch != -1 and r.sent_epoch != self.epoch)
                or (r.retry_at and r.retry_at <= now))]
            for r in due:
                r.retry_at = 0.0
        for r in due:
            self._send(r)

    # ------------------------------------------------------------------ status

    def status(self) -> pb.ClusterStatus:
        out = pb.ClusterStatus(plan_id=self.plan.plan_id, requests_done=self.requests_done,
                               requests_failed=self.requests_failed, in_flight=self.in_flight,
                               model_inputs=[encode_spec(t) for t in self.plan.model.inputs],
                               bindings=self.plan.model.bindings, model=self.plan.model.name,
                               coordinator_id=self.coordinator_id)
        for w in self.workers:
            s = out.stages.add(stage=w.stage.index, device=w.stage.device.name,
                               address=w.stage.device.address,
                               planned_memory_mb=w.stage.predicted.memory_mb)
            try:
                s.worker.CopyFrom(w.stub.GetStatus(pb.StatusRequest(),
                                                   timeout=self.deadlines.control))
                # Answering is not enough: it must serve this coordinator's stage.
                s.healthy = (s.worker.coordinator_id == self.coordinator_id
                             and s.worker.epoch == self.epoch)
                owner = s.worker.coordinator_id
                if owner and owner != self.coordinator_id:
                    self._taken(w, f"it now belongs to coordinator {owner} (plan "
                                   f"{s.worker.plan_id}, epoch {s.worker.epoch})")
            except grpc.RpcError as e:
                # Said, not swallowed: a caller reading this worker's memory gets nothing.
                log.warning("status of stage %d on %s (%s) failed: %s: %s", w.stage.index,
                            w.stage.device.name, w.stage.device.address, e.code().name,
                            e.details())
                s.healthy = False
        out.not_serving = self._unavailable or (
            "" if self._serving.is_set() else "recovering from a lost device")
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
