"""Failover orchestration: deploy, and when the devices that answer change, recover.

Each round of the monitor thread asks :class:`~edge.coordinator.monitor.Monitor` which
devices are up, asks :class:`~edge.coordinator.failover.Replanner` for the pipeline's
layout over them, and when it differs from the one that serves (or a worker forgot its
stage) deploys the cheapest plan for it under a new epoch (:meth:`Failover.switch`) and
sends every request in flight again. When nothing fits, it gives up: what is in flight
fails and new requests are refused at once until the devices that answer change. A
device that refuses its stage is backed off and the rest re-planned at once. Another
coordinator taking the workers over stops this one for good: it does not fight back.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import grpc

from edge.coordinator.deploy import DeployError, Progress, deploy, let_go
from edge.coordinator.events import Listeners
from edge.coordinator.failover import Deployment, NoCapacity, Replanner
from edge.coordinator.inflight import InferError, InFlight
from edge.coordinator.metrics import count_failover
from edge.coordinator.monitor import Monitor
from edge.coordinator.state import Current
from edge.coordinator.workers import StageWorker, WorkerPool
from edge.transport.channels import Deadlines

__all__ = ["Failover", "Recovery"]

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class _Change:
    """A recovery under way: what it started from."""

    up: frozenset[str]
    before: tuple[str, ...]   # addresses of the pipeline that served
    wanted: tuple[str, ...]   # addresses of the layout over the devices that answer
    lost: tuple[str, ...]     # names of the devices of ``before`` that do not answer
    start: float
    noticed: float


class Failover:
    """Deploys plans and keeps the pipeline served when devices come and go.

    Args:
        current: the deployment that serves.
        replanner: picks the deployment for the devices that answer.
        monitor: which devices are up.
        requests: the in-flight table (resent after a switch, failed on give-up).
        listeners: the workers' event streams (started for a new deployment's workers).
        pool: the clients of the workers, by address.
        deadlines: per-call deadlines of a deployment.
        max_losses: device losses a request may be in flight through and still be resent.
        on_change: told each :class:`Recovery`.
    """

    def __init__(self, current: Current, replanner: Replanner, monitor: Monitor,
                 requests: InFlight, listeners: Listeners, pool: WorkerPool,
                 deadlines: Deadlines, max_losses: int,
                 on_change: Callable[[Recovery], None] | None):
        self.current = current
        self.replanner = replanner
        self.monitor = monitor
        self.requests = requests
        self.listeners = listeners
        self.pool = pool
        self.deadlines = deadlines
        self.max_losses = max_losses
        self.on_change = on_change
        self.recoveries: list[Recovery] = []
        self._failed_layout: tuple[str, ...] = ()  # devices no plan fitted on
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Run the monitor rounds in a thread until the pipeline closes or is taken over."""
        self._thread = threading.Thread(target=self._watch, daemon=True, name="edge-monitor")
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Once the pipeline is closed: wait (up to ``timeout`` s) for the monitor thread
        to end (a deployment it runs stops before its next step and lets go of what it
        configured), then let go of the deployed workers, so that a coordinator started
        next (this one, restarted) may configure them at once."""
        cur = self.current
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if not cur.taken_over:
            with cur.lock:
                workers = list(cur.workers)
            let_go(workers, cur.coordinator_id, timeout)

    def _watch(self) -> None:
        cur = self.current
        while not cur.closed.is_set():
            cur.wake.wait(self.monitor.health_interval)
            cur.wake.clear()
            if cur.closed.is_set() or cur.taken_over:
                return  # taken over: another coordinator serves; do not fight it
            try:
                self.round()
            except Exception:  # the monitor must outlive any one bad round
                log.exception("failover monitor round failed")

    def round(self) -> None:
        """Probe; move work when the devices that answer change; resend what is due."""
        cur = self.current
        up = self.monitor.probe()
        if cur.closed.is_set() or cur.taken_over:
            return
        up -= self.monitor.left_out()
        with cur.lock:
            before = tuple(w.stage.device.address for w in cur.workers)
            unavailable = cur.unavailable
        placed, _ = self.replanner.layout(up)
        wanted = tuple(d.address for d in placed)
        if unavailable:
            # Try again only once the devices that answer have changed.
            if wanted != self._failed_layout:
                self.recover(up, before, wanted)
        elif wanted != before or self.monitor.stale:
            self.recover(up, before, wanted)
        self.requests.resend_due()

    def recover(self, up: set[str], before: tuple[str, ...], wanted: tuple[str, ...]) -> None:
        """Deploy the cheapest plan over the devices at ``up`` and resend what is in flight
        (or give up, or back off a device that refused its stage)."""
        start = time.monotonic()
        self.monitor.stale = False
        names = {d.address: d.name for d in self.replanner.devices}
        gone = [a for a in before if a not in up]
        sign = self.monitor.first_sign(gone)
        change = _Change(frozenset(up), before, wanted, tuple(names[a] for a in gone), start,
                         start - sign if sign else 0.0)
        self.current.serving.clear()
        try:
            deployment = self.replanner.deployment(up)
        except NoCapacity as e:
            self.give_up(f"{e}{self.monitor.left_out_note()}", change)
            return
        joined = tuple(d.name for d in deployment.plan.devices if d.address not in before)
        log.info("failover: %s; deploying %s plan onto %s", ", ".join(
            [f"lost {', '.join(change.lost)}"] * bool(change.lost)
            + [f"{', '.join(joined)} joined"] * bool(joined)) or "a worker restarted",
            deployment.how, ", ".join(d.name for d in deployment.plan.devices))
        try:
            uploaded = self.switch(deployment, None)
        except DeployError as e:
            self._deploy_failed(e, change)
            return
        resent = self._resend(lost_one=bool(change.lost) or not joined)
        self._record(Recovery(lost=change.lost, joined=joined, how=deployment.how,
                              devices=tuple(d.name for d in deployment.plan.devices),
                              seconds=time.monotonic() - start, noticed_s=change.noticed,
                              uploaded_bytes=uploaded, resent=resent))

    def _deploy_failed(self, e: DeployError, change: _Change) -> None:
        if self.current.taken_over or self.current.closed.is_set():
            return
        if not e.address:  # not one device's fault (a shard file missing here)
            self.give_up(str(e), change)
            return
        # That device is left out of the next layouts for a while (it is up, so health
        # checks alone would put it straight back), and the next round, at once, finds a
        # layout over the rest.
        self.monitor.leave_out(e)
        if set(e.configured) & set(change.before):
            self.monitor.stale = True  # the running pipeline was partly re-wired: redo it
        elif change.before and all(a in change.up for a in change.before):
            self.current.serving.set()  # the running pipeline is untouched and whole
        self.current.wake.set()

    def _resend(self, lost_one: bool) -> int:
        """Send what is in flight again under the new epoch; a request that was in flight
        through more than ``max_losses`` losses fails instead. Returns how many were sent."""
        # A device lost, or a worker that restarted empty: a loss each was in flight through.
        pending = self.requests.pending(count_loss=lost_one)
        resent = 0
        for r in pending:
            if r.losses > self.max_losses:
                self.requests.resolve(r.request_id, error=InferError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"request {r.request_id} was in flight through {r.losses} device losses; "
                    "giving up on it (it may be what brings them down)"))
            else:
                self.requests.send(r)
                resent += 1
        return resent

    def give_up(self, why: str, change: _Change) -> None:
        """Nothing fits: fail what is in flight and refuse new requests until the devices
        that answer change."""
        cur = self.current
        with cur.lock:
            cur.unavailable = why
            self._failed_layout = change.wanted
        cur.serving.set()  # waiting requests wake up and see unavailable
        cur.tell(why)
        self.requests.fail_all(lambda r: InferError(grpc.StatusCode.UNAVAILABLE, why))
        self._record(Recovery(lost=change.lost, joined=(), how="unavailable", devices=(),
                              seconds=time.monotonic() - change.start,
                              noticed_s=change.noticed, message=why))

    def _record(self, recovery: Recovery) -> None:
        self.recoveries.append(recovery)
        count_failover(recovery.how)
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

    def switch(self, deployment: Deployment, progress: Progress | None,
               take_over: bool = False) -> int:
        """Deploy under a new epoch and make it the current one. Returns bytes uploaded."""
        cur = self.current
        handles = [self.pool.place(s) for s in deployment.plan.stages]
        epoch = max(time.time_ns() // 1000, cur.epoch + 1)
        deadlines = self.deadlines
        if cur.workers:  # a recovery: every device answered a health check just now
            deadlines = dataclasses.replace(deadlines, ready=min(deadlines.ready, 5.0))
        serving = frozenset(cur.addresses())
        uploaded = deploy(deployment.plan, deployment.plan_dir, handles, epoch, deadlines,
                          progress, coordinator_id=cur.coordinator_id, take_over=take_over,
                          serving=serving, stop=cur.closed)
        with cur.lock:
            if cur.taken_over:  # taken over while deploying: do not undo it
                raise DeployError(cur.unavailable, grpc.StatusCode.ABORTED)
            cur.plan, cur.plan_dir = deployment.plan, deployment.plan_dir
            cur.workers, cur.epoch = handles, epoch
            cur.unavailable = ""
            self.monitor.deployed([w.stage.device.address for w in handles])
        cur.tell("")
        self.listeners.listen(handles)
        cur.serving.set()
        return uploaded

    def taken(self, w: StageWorker, why: str) -> None:
        """Another coordinator took our workers: say so once, stop serving, fail what is in
        flight, and do not fight back (no re-deploy)."""
        cur = self.current
        message = (f"this coordinator ({cur.coordinator_id}) was taken over by another "
                   f"one: {w.label} says: {why}. It no longer serves requests: send them to "
                   "the coordinator that took over, or stop that one and restart this one")
        with cur.lock:
            if cur.taken_over:
                return
            cur.taken_over = why
            cur.unavailable = message
        log.error("%s", message)
        cur.serving.set()  # waiting requests wake up and see unavailable
        cur.wake.set()
        cur.tell(message)
        self.requests.fail_all(lambda r: InferError(grpc.StatusCode.UNAVAILABLE, message,
                                                    retryable=False))
