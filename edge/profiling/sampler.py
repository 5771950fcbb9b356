"""A worker samples its own memory and CPU while it serves, for `edge profile`."""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from edge.profiling.memory import heap_in_use, memory_breakdown

__all__ = ["Sample", "Sampler"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    time: float
    rss_bytes: int
    rss_anon_bytes: int
    rss_file_bytes: int
    peak_rss_bytes: int
    heap_bytes: int
    cpu_percent: float
    requests_done: int
    queue_depth: int


class Sampler:
    """Samples this process every ``interval_s`` into a bounded ring buffer.

    Args:
        interval_s: seconds between samples.
        keep: samples kept (the oldest are dropped).
        counters: returns (requests done, queue depth) for each sample.
        budget_mb: memory budget; 0 for none. Crossing ``warn_fraction`` of it logs a
            warning and sets :attr:`warning`.
        warn_fraction: how near the budget counts as near.
    """

    def __init__(self, interval_s: float = 0.1, keep: int = 36_000,
                 counters: Callable[[], tuple[int, int]] = lambda: (0, 0),
                 budget_mb: float = 0.0, warn_fraction: float = 0.9):
        self.interval_s = interval_s
        self.budget_mb = budget_mb
        self.warn_fraction = warn_fraction
        self.warning = ""
        self._counters = counters
        self._samples: collections.deque[Sample] = collections.deque(maxlen=keep)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # The process's CPU seconds and the time they were read, for cpu_percent: what
        # psutil.Process.cpu_percent computes, without its /proc parsing (a third of a
        # sample's cost on a loaded worker, four times a second).
        self._cpu_at = (time.process_time(), time.monotonic())
        self._thread = threading.Thread(target=self._run, name="edge-sampler", daemon=True)

    def start(self) -> "Sampler":
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def sample(self) -> Sample:
        mem = memory_breakdown()
        done, depth = self._counters()
        s = Sample(time=time.time(), rss_bytes=mem["rss"], rss_anon_bytes=mem["rss_anon"],
                   rss_file_bytes=mem["rss_file"], peak_rss_bytes=mem["peak_rss"],
                   heap_bytes=heap_in_use(), cpu_percent=self._cpu_percent(),
                   requests_done=done, queue_depth=depth)
        with self._lock:
            self._samples.append(s)
        self._check_budget(s)
        return s

    def _cpu_percent(self) -> float:
        """Percent of one core this process used since the last call (the first: since
        the sampler was made)."""
        cpu, now = time.process_time(), time.monotonic()
        last_cpu, last = self._cpu_at
        self._cpu_at = (cpu, now)
        return 100.0 * (cpu - last_cpu) / (now - last) if now > last else 0.0

    def since(self, t: float = 0.0) -> list[Sample]:
        with self._lock:
            return [s for s in self._samples if s.time > t]

    def _check_budget(self, s: Sample) -> None:
        if self.budget_mb <= 0:
            return
        used = s.rss_bytes / 2**20
        if used >= self.warn_fraction * self.budget_mb:
            warning = (f"RSS {used:.0f} MiB is {100 * used / self.budget_mb:.0f}% of the "
                       f"{self.budget_mb:.0f} MiB budget")
            if not self.warning:
                log.warning("memory near budget: %s", warning)
            self.warning = warning
        elif self.warning:
            log.info("memory back under %.0f%% of the budget", 100 * self.warn_fraction)
            self.warning = ""

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception:  # a sampler must never take the worker down
                log.exception("memory sample failed")
