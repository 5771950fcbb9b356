"""Which devices count as up: health probes, suspects, and backoff of refused devices.

Every round the monitor health-checks every device the coordinator may use, except, while
requests flow, the devices of the deployment: a request answered within the last
``misses`` rounds passed through every one of them, which says more than a health check
and costs the coordinator nothing (the checks of eight workers twice a second took about
9 ms of its CPU a second, as much of an emulated Pi 4's share as the requests' own
handling). A device that dies under load is suspected at once anyway: its event stream
breaks, and the stage before it reports it unreachable. A device counts as lost after
``misses`` missed checks in a row, or at its first miss once it is suspect (its event
stream broke, or a stage reported it unreachable). A suspect that
still answers is asked its status: a worker that restarted and forgot its stage makes
the deployment stale, and one that another coordinator now owns means this one was taken
over. A device that failed to take a stage is left out of the layouts for a while
(doubling with each failure in a row), so that the rest are re-planned instead of the
same refusal being asked for every round.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import grpc

from edge.coordinator.deploy import DeployError
from edge.coordinator.state import Current
from edge.coordinator.workers import SERVING, StageWorker, WorkerClient
from edge.planning.plan import Device

__all__ = ["Monitor", "BACKOFF_S", "BACKOFF_MAX_S"]

log = logging.getLogger(__name__)

# A device that failed to take a stage is left out of the layouts for this long, doubling
# with each failure in a row, up to the cap: re-plan over the rest meanwhile, and do not
# hammer a device that keeps saying no (a full disk, a budget below cluster.yaml's).
BACKOFF_S = 1.0
BACKOFF_MAX_S = 60.0


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


class Monitor:
    """Tells which devices are up.

    Args:
        current: the deployment that serves.
        devices: every device the coordinator may use.
        client: the client of the worker at an address.
        control_timeout: deadline of a status call.
        health_interval: seconds between rounds (health checks time out after 4 of them,
            within ``control_timeout``).
        misses: checks in a row a device may miss before it counts as lost.
        backoff_s: first time a device that failed to take a stage is left out.
        on_taken: told ``(worker, why)`` when a worker belongs to another coordinator.
        progress: how many requests have been answered so far (a count that grows while
            requests flow; default: none, so every device is checked every round).

    Attributes:
        stale: a worker of the deployment restarted and forgot its stage: deploy again.
    """

    def __init__(self, current: Current, devices: Sequence[Device],
                 client: Callable[[str], WorkerClient], control_timeout: float,
                 health_interval: float, misses: int, backoff_s: float,
                 on_taken: Callable[[StageWorker, str], None],
                 progress: Callable[[], int] = lambda: 0):
        self.current = current
        self.devices = tuple(devices)
        self.client = client
        self.control_timeout = control_timeout
        self.health_interval = health_interval
        self.misses = misses
        self.backoff_s = backoff_s
        self.on_taken = on_taken
        self.progress = progress
        self._progress_seen: tuple[int, int] = (-1, 0)  # (epoch, answered) at the last round
        self._progress_at = 0.0  # monotonic time a round last saw more requests answered
        self.stale = False
        self._probes: dict[str, _Probe] = {d.address: _Probe() for d in self.devices}
        self._excluded: dict[str, _Backoff] = {}

    def suspect(self, address: str, why: str) -> None:
        """A sign that the device at ``address`` is gone: probe it now, and count it lost
        at its first missed check."""
        with self.current.lock:
            probe = self._probes.setdefault(address, _Probe())
            if not probe.suspect:
                probe.suspect = why
                probe.since = probe.since or time.monotonic()
        self.current.wake.set()

    def first_sign(self, addresses: Sequence[str]) -> float:
        """Monotonic time of the earliest sign of trouble among ``addresses`` (0: none)."""
        with self.current.lock:
            signs = [self._probes[a].since for a in addresses
                     if a in self._probes and self._probes[a].since]
        return min(signs) if signs else 0.0

    def deployed(self, addresses: Sequence[str]) -> None:
        """The devices at ``addresses`` took their stages: nothing is suspected of them, and
        their backoff ends. Call with ``current.lock`` held."""
        for address in addresses:
            probe = self._probes.setdefault(address, _Probe())
            probe.suspect, probe.since = "", 0.0
            self._excluded.pop(address, None)

    def probe(self) -> set[str]:
        """Health-check every device; returns the addresses that count as up."""
        timeout = min(self.control_timeout, max(0.2, 4 * self.health_interval))
        passed = self._passed_through()
        checks = {d.address: self.client(d.address).health(timeout) for d in self.devices
                  if d.address not in passed}
        up = set(passed)
        with self.current.lock:
            current = {w.stage.device.address: w for w in self.current.workers}
        for address, future in checks.items():
            try:
                ok = future.result() == SERVING
            except grpc.RpcError:
                ok = False
            is_up, suspect = self._count(address, ok)
            if ok and suspect and address in current:
                # Its stream broke but it answers: did it restart and forget its stage?
                answer = self._check_stage(current[address])
                if answer is None:
                    return up  # taken over
                is_up = answer
            if is_up:
                up.add(address)
        return up

    def _passed_through(self) -> set[str]:
        """The deployment's devices, unless suspect, if a request was answered under this
        epoch within the last ``misses`` rounds (each counted as one check answered); else
        none. (A request every few rounds, as a pipeline of Pi 4s answers, still counts.)"""
        cur = self.current
        with cur.lock:
            now, seen = (cur.epoch, self.progress()), self._progress_seen
            self._progress_seen = now
            if now[0] != seen[0]:
                self._progress_at = 0.0
            elif now[1] != seen[1]:
                self._progress_at = time.monotonic()
            if time.monotonic() - self._progress_at > self.misses * self.health_interval:
                return set()
            addresses = {w.stage.device.address for w in cur.workers}
            passed = {a for a in addresses
                      if not self._probes.setdefault(a, _Probe()).suspect}
        for a in passed:
            self._count(a, True)
        return passed

    def _count(self, address: str, ok: bool) -> tuple[bool, str]:
        """Record one check; returns (counts as up, why it is suspect)."""
        with self.current.lock:
            probe = self._probes.setdefault(address, _Probe())
            if ok:
                probe.misses = 0
                if not probe.suspect:
                    probe.since = 0.0
            else:
                probe.misses += 1
                probe.since = probe.since or time.monotonic()
            allowed = 1 if probe.suspect else self.misses
            return probe.misses < allowed, probe.suspect

    def _check_stage(self, w: StageWorker) -> bool | None:
        """Whether suspect ``w``, which answers health checks, is up (it may need its stage
        again: then ``stale``); None when another coordinator owns it."""
        cur = self.current
        try:
            status = w.client.status(self.control_timeout)
        except grpc.RpcError:
            is_up = False
        else:
            if status.coordinator_id and status.coordinator_id != cur.coordinator_id:
                self.on_taken(w, f"it now belongs to coordinator {status.coordinator_id} "
                                 f"(plan {status.plan_id}, epoch {status.epoch})")
                return None
            if not (status.configured and status.epoch == cur.epoch):
                self.stale = True  # up, but its stage must be deployed again
            is_up = True
        with cur.lock:
            self._probes[w.stage.device.address].suspect = ""
        return is_up

    # ------------------------------------------------------------------ backoff

    def leave_out(self, e: DeployError) -> None:
        """Leave the device ``e`` names out of the layouts, for longer each time in a row."""
        with self.current.lock:
            b = self._excluded.setdefault(e.address, _Backoff())
            b.failures += 1
            delay = min(BACKOFF_MAX_S, self.backoff_s * 2 ** (b.failures - 1))
            b.until, b.why = time.monotonic() + delay, f"{e.kind}: {e}"
        # Once per backoff, not once per monitor round.
        log.warning("failover: leaving device %s (%s) out for %.0f s (failure %d in a row), "
                    "re-planning over the rest: it %s its stage: %s",
                    e.device, e.address, delay, b.failures,
                    "refused" if e.kind == "refused" else "did not take", e)

    def left_out(self) -> set[str]:
        """Addresses still in their backoff."""
        now = time.monotonic()
        with self.current.lock:
            return {a for a, b in self._excluded.items() if b.until > now}

    def left_out_note(self) -> str:
        """Which devices are left out and why, for an error message ("" if none)."""
        now = time.monotonic()
        names = {d.address: d.name for d in self.devices}
        with self.current.lock:
            out = [f"{names.get(a, a)} (tried again in {b.until - now:.0f} s; {b.why})"
                   for a, b in self._excluded.items() if b.until > now]
        return f"; left out after failing to take a stage: {'; '.join(out)}" if out else ""
