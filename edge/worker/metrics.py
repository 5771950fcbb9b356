"""A worker's Prometheus metrics (``edge_worker_*``), in prometheus_client's default registry.

Counted and timed where they happen, without a lock held across compute: a request
counted by the servicer (and, refused, under its status code), the queue, compute and send
seconds of each request by the engine's threads. What is a level, not an event (queue
depths, sequences and KV-cache bytes held, RSS and the budget), is read at scrape time by
:class:`WorkerCollector` from the live servicers, so the hot path pays nothing for it.

Labels: ``stage`` (the stage served, "none" before a Configure) and ``device`` (the
worker's ``--device`` profile). ``edge worker --metrics-port`` serves them over HTTP.
"""

from __future__ import annotations

import functools
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import grpc
from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from edge.profiling.memory import peak_rss_bytes, rss_bytes

if TYPE_CHECKING:
    from edge.worker.server import WorkerServicer

__all__ = ["StageMetrics", "stage_metrics", "count_forward", "count_failure",
           "WorkerCollector", "watch", "SECONDS_BUCKETS", "NO_STAGE"]

NO_STAGE = "none"

# 1 ms to 2 minutes: a tiny stage on a desktop to a BERT-base stage on a Pi Zero.
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 120.0)

_LABELS = ("stage", "device")

REQUESTS = Counter("edge_worker_requests", "Forward calls received", _LABELS)
ERRORS = Counter("edge_worker_errors",
                 "Requests that failed, by gRPC status code and where: refused by Forward "
                 "(phase=forward) or failed on the compute or send thread", _LABELS + (
                     "code", "phase"))
QUEUE = Histogram("edge_worker_queue_seconds", "Time a request waited for compute",
                  _LABELS, buckets=SECONDS_BUCKETS)
COMPUTE = Histogram("edge_worker_compute_seconds", "Time a request's stage computed",
                    _LABELS, buckets=SECONDS_BUCKETS)
SEND = Histogram("edge_worker_send_seconds",
                 "Time to encode a request's outputs and hand them to the next stage (the "
                 "last stage: publish the result)", _LABELS, buckets=SECONDS_BUCKETS)


@dataclass(frozen=True)
class StageMetrics:
    """The labelled children of one (stage, device): looked up once, observed per request."""

    requests: Counter
    queue: Histogram
    compute: Histogram
    send: Histogram


@functools.lru_cache(maxsize=256)
def stage_metrics(stage: int | str, device: str) -> StageMetrics:
    """The metrics of ``stage`` (an index, or :data:`NO_STAGE`) on ``device``."""
    labels = (str(stage), device)
    return StageMetrics(REQUESTS.labels(*labels), QUEUE.labels(*labels),
                        COMPUTE.labels(*labels), SEND.labels(*labels))


def count_forward(stage: int | str, device: str) -> None:
    """One Forward call received."""
    stage_metrics(stage, device).requests.inc()


def count_failure(stage: int | str, device: str, code: grpc.StatusCode, phase: str) -> None:
    """One request failed with ``code`` in ``phase`` ("forward", "compute" or "send")."""
    ERRORS.labels(str(stage), device, code.name, phase).inc()


class WorkerCollector(Collector):
    """Levels read at scrape time from the servicers of this process (one in a worker
    process; several in a test that runs workers in threads)."""

    def __init__(self):
        self._servicers: weakref.WeakSet = weakref.WeakSet()
        self._lock = threading.Lock()

    def add(self, servicer: "WorkerServicer") -> None:
        with self._lock:
            self._servicers.add(servicer)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = list(_LABELS)
        families = {
            "queue": GaugeMetricFamily("edge_worker_queue_depth",
                                       "Requests waiting, by queue: for compute or for sending",
                                       labels=labels + ["queue"]),
            "sequences": GaugeMetricFamily("edge_worker_sequences",
                                           "Generated sequences whose KV caches are held",
                                           labels=labels),
            "kv": GaugeMetricFamily("edge_worker_kv_cache_bytes",
                                    "Bytes of the KV caches held", labels=labels),
            "rss": GaugeMetricFamily("edge_worker_rss_bytes", "Resident memory of the worker",
                                     labels=labels),
            "peak": GaugeMetricFamily("edge_worker_peak_rss_bytes",
                                      "Peak resident memory of the worker", labels=labels),
            "budget": GaugeMetricFamily("edge_worker_memory_budget_bytes",
                                        "Memory the worker may use (0: no budget given)",
                                        labels=labels),
            "epoch": GaugeMetricFamily("edge_worker_epoch",
                                       "Pipeline epoch of the stage served (0: none)",
                                       labels=labels),
            "direct": CounterMetricFamily("edge_worker_direct_results",
                                          "Direct clients' results this stage answered: "
                                          "delivered to the client's stream, or dropped "
                                          "(it had none; the client sends it again)",
                                          labels=labels + ["outcome"]),
        }
        with self._lock:
            servicers = list(self._servicers)
        rss, peak = (rss_bytes(), peak_rss_bytes()) if servicers else (0, 0)
        seen: set[tuple[str, str]] = set()
        for s in servicers:
            runner = s.engine.runner
            key = (str(runner.spec.stage) if runner else NO_STAGE, s.config.device)
            if key in seen:  # two in one process serving the same: the first one's levels
                continue
            seen.add(key)
            computing, sending = s.engine.queue_depths()
            sequences, kv = s.engine.sessions.stats()
            families["queue"].add_metric(list(key) + ["compute"], computing)
            families["queue"].add_metric(list(key) + ["send"], sending)
            families["sequences"].add_metric(list(key), sequences)
            families["kv"].add_metric(list(key), kv)
            families["rss"].add_metric(list(key), rss)
            families["peak"].add_metric(list(key), peak)
            families["budget"].add_metric(list(key), s.config.memory_budget_mb * (1 << 20))
            families["epoch"].add_metric(list(key), runner.spec.epoch if runner else 0)
            families["direct"].add_metric(list(key) + ["delivered"], s.events.delivered)
            families["direct"].add_metric(list(key) + ["dropped"], s.events.undelivered)
        yield from families.values()

    def describe(self) -> list:
        return []  # collected live: nothing to check for clashes at registration


_COLLECTOR: WorkerCollector | None = None
_COLLECTOR_LOCK = threading.Lock()


def watch(servicer: "WorkerServicer") -> None:
    """Report ``servicer``'s levels (queues, caches, memory) in the default registry."""
    global _COLLECTOR
    with _COLLECTOR_LOCK:
        if _COLLECTOR is None:
            _COLLECTOR = WorkerCollector()
            REGISTRY.register(_COLLECTOR)
    _COLLECTOR.add(servicer)
