"""What the coordinator serves now: the deployed plan, the workers of its stages and its
epoch, and whether requests can be served (and if not, why).

The parts of the coordinator (the in-flight table, the event listeners, the monitor and
the failover) share one :class:`Current` and its lock: a request is sent to the first
stage of the epoch it reads, and a re-deployment replaces plan, workers and epoch at once.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

from edge.coordinator.workers import StageWorker
from edge.planning.plan import Plan
from edge.proto import edge_pb2 as pb

__all__ = ["Current"]

log = logging.getLogger(__name__)


class Current:
    """The deployment that serves, and the pipeline's serving state.

    Attributes:
        lock: guards every attribute below and the in-flight table's entries.
        plan, plan_dir: the plan deployed now and its folder.
        workers: its stages on their workers, in order (empty before the first deploy).
        epoch: the wiring generation of ``workers``.
        unavailable: why requests cannot be served now ("" if they can).
        taken_over: why another coordinator owns the workers now ("" while ours).
        serving: set while requests may be sent; cleared during a recovery. Also set to
            wake waiting requests so that they see ``unavailable``.
        closed: set by ``Pipeline.close``.
        wake: asks the monitor for a round now.
    """

    def __init__(self, plan: Plan, plan_dir: Path, coordinator_id: str):
        self.lock = threading.Lock()
        self.plan, self.plan_dir = plan, Path(plan_dir)
        self.coordinator_id = coordinator_id
        self.workers: list[StageWorker] = []
        self.epoch = 0
        self.unavailable = ""
        self.taken_over = ""
        self.serving = threading.Event()
        self.closed = threading.Event()
        self.wake = threading.Event()
        self._watchers: list[Callable[[str], None]] = []

    def route(self) -> tuple[StageWorker, int] | None:
        """The first stage and the epoch to send a request under (None: nothing deployed)."""
        with self.lock:
            return (self.workers[0], self.epoch) if self.workers else None

    def direct_route(self) -> pb.Route:
        """Where a direct client sends requests now (see ``edge.coordinator.direct``)."""
        with self.lock:
            workers, epoch = list(self.workers), self.epoch
        why = self.not_serving() or self.taken_over
        if not workers:
            return pb.Route(epoch=epoch, unavailable=why or "nothing is deployed yet")
        return pb.Route(epoch=epoch, first_address=workers[0].stage.device.address,
                        last_address=workers[-1].stage.device.address,
                        stages=len(workers), unavailable=why)

    def worker_at(self, address: str) -> StageWorker | None:
        with self.lock:
            return next((w for w in self.workers if w.stage.device.address == address), None)

    def addresses(self) -> tuple[str, ...]:
        with self.lock:
            return tuple(w.stage.device.address for w in self.workers)

    def note(self) -> str:
        """``"; why requests wait or fail"`` for an error message, "" when serving."""
        if self.unavailable:
            return f"; {self.unavailable}"
        if not self.serving.is_set():
            return "; the pipeline is recovering from a lost device"
        return ""

    def not_serving(self) -> str:
        """Why no request is served now ("" if they are), for the cluster status."""
        return self.unavailable or ("" if self.serving.is_set()
                                    else "recovering from a lost device")

    def watch(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(why)`` now and at each change of serving (see
        ``Pipeline.watch_serving``)."""
        self._watchers.append(callback)
        callback(self.unavailable)

    def unwatch(self, callback: Callable[[str], None]) -> None:
        """Stop calling ``callback`` (a watcher that is gone)."""
        with self.lock:
            if callback in self._watchers:
                self._watchers.remove(callback)

    def tell(self, why: str) -> None:
        """Tell the serving watchers: ``why`` it stopped, or "" when it serves again."""
        for callback in list(self._watchers):
            try:
                callback(why)
            except Exception:
                log.exception("a serving watcher failed")
