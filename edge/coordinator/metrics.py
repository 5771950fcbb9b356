"""The coordinator's Prometheus metrics (``edge_*``), in prometheus_client's default registry.

Events are counted where they happen: a request (``kind`` "infer" or "generate") when it
comes, its error under its status code, its end-to-end seconds once answered; prompt and
generated tokens, the time to the first token and between tokens by the token loop; each
failover by how it was resolved. Levels are read at scrape time by
:class:`CoordinatorCollector` from the live pipelines and generators: requests in flight,
sequences generating and waiting, whether the pipeline serves, and each device's memory
(RSS, its budget, its planned memory, its KV caches) from the workers' status, asked at
most once every :data:`STATUS_MAX_AGE_S` however often Prometheus scrapes.

Served at ``/metrics`` by ``edge coordinator --metrics-port`` (or by any HTTP server that
exposes ``prometheus_client.REGISTRY``).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import grpc
from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from edge.coordinator.inflight import InferError

if TYPE_CHECKING:
    from edge.coordinator.generate import Generator
    from edge.coordinator.pipeline import Pipeline

__all__ = ["KINDS", "FAILOVER_KINDS", "count_request", "count_error", "tracked",
           "count_failover", "count_prompt", "first_token", "token", "CoordinatorCollector",
           "watch_pipeline", "unwatch_pipeline", "watch_generator",
           "STATUS_MAX_AGE_S"]

log = logging.getLogger(__name__)

KINDS = ("infer", "generate")
# Recovery.how: the original plan back, a standby in the lost device's place, a re-plan
# over the devices that answer, or nothing fits.
FAILOVER_KINDS = ("original", "standby", "re-planned", "unavailable")

# A device's status is asked again only when the one held is older than this.
STATUS_MAX_AGE_S = 5.0
MiB = 1 << 20

# 1 ms to 5 minutes: a tiny model on a desktop to a long generation on Pi Zeros.
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)

REQUESTS = Counter("edge_requests", "Requests received, by kind (infer, generate)", ["kind"])
ERRORS = Counter("edge_request_errors", "Requests answered with an error, by kind and gRPC "
                 "status code", ["kind", "code"])
LATENCY = Histogram("edge_request_seconds", "End-to-end time of the requests answered "
                    "without error (a generation: its whole stream)", ["kind"],
                    buckets=SECONDS_BUCKETS)
PROMPT_TOKENS = Counter("edge_prompt_tokens", "Prompt tokens of the generations started")
GENERATED_TOKENS = Counter("edge_generated_tokens", "Tokens generated (an end-of-sequence "
                           "token not included)")
TTFT = Histogram("edge_time_to_first_token_seconds", "From a generation's request (its wait "
                 "for a free sequence included) to its first token", buckets=SECONDS_BUCKETS)
TPOT = Histogram("edge_time_per_output_token_seconds", "Time between two tokens of a "
                 "generation", buckets=TOKEN_BUCKETS)
FAILOVERS = Counter("edge_failovers", "Changes of the pipeline's devices after a device was "
                    "lost or came back, by how: original, standby, re-planned, unavailable",
                    ["how"])
INFER_BATCHES = Counter("edge_infer_batches", "Infer requests sent as batches of more "
                        "than one (those that waited for a slot)")
INFER_BATCHED = Counter("edge_infer_batched_requests", "Infer requests sent in batches of "
                        "more than one")

# The children used per request, looked up once; every label value exported from the
# start, so that rate() sees the first event.
_REQUESTS = {k: REQUESTS.labels(k) for k in KINDS}
_LATENCY = {k: LATENCY.labels(k) for k in KINDS}
_FAILOVERS = {k: FAILOVERS.labels(k) for k in FAILOVER_KINDS}


def count_request(kind: str) -> None:
    """One request of ``kind`` ("infer" or "generate") came."""
    _REQUESTS[kind].inc()


def count_batch(requests: int) -> None:
    """A batch of ``requests`` Infer requests was sent as one."""
    INFER_BATCHES.inc()
    INFER_BATCHED.inc(requests)


def count_error(kind: str, code: grpc.StatusCode) -> None:
    """One request of ``kind`` was answered with ``code``."""
    ERRORS.labels(kind, code.name).inc()


@contextmanager
def tracked(kind: str, count: bool = True) -> Iterator[None]:
    """Count a request of ``kind`` (unless ``count`` is False: counted already), its
    error by status code, or its end-to-end seconds if it ends without one.

    A generator closed before its end (a client that went away) counts as CANCELLED; any
    other exception than :class:`InferError` as INTERNAL.
    """
    if count:
        count_request(kind)
    start = time.perf_counter()
    try:
        yield
    except InferError as e:
        count_error(kind, e.code)
        raise
    except GeneratorExit:
        count_error(kind, grpc.StatusCode.CANCELLED)
        raise
    except Exception:
        count_error(kind, grpc.StatusCode.INTERNAL)
        raise
    _LATENCY[kind].observe(time.perf_counter() - start)


def count_failover(how: str) -> None:
    """One recovery, resolved ``how`` (a :data:`FAILOVER_KINDS`)."""
    (_FAILOVERS.get(how) or FAILOVERS.labels(how)).inc()


def count_prompt(tokens: int) -> None:
    PROMPT_TOKENS.inc(tokens)


def first_token(seconds: float) -> None:
    """A generation's first result came ``seconds`` after its request."""
    TTFT.observe(seconds)


def token(since_last: float | None) -> None:
    """A token generated, ``since_last`` seconds after the one before (None: the first)."""
    GENERATED_TOKENS.inc()
    if since_last is not None:
        TPOT.observe(since_last)


class _Statuses:
    """The latest status of each worker of a pipeline, asked again once it is older than
    :data:`STATUS_MAX_AGE_S`."""

    def __init__(self):
        self.at = 0.0
        self.items: list[tuple[Any, Any]] = []  # (StageWorker, WorkerStatus or None)
        self.lock = threading.Lock()

    def get(self, pipeline: "Pipeline") -> list[tuple[Any, Any]]:
        with self.lock:
            if time.monotonic() - self.at < STATUS_MAX_AGE_S:
                return self.items
            timeout = min(1.0, pipeline.deadlines.control)
            items = []
            for w in pipeline.workers:
                try:
                    items.append((w, w.client.status(timeout)))
                except grpc.RpcError as e:
                    log.info("metrics: no status from %s: %s", w.label, e.code().name)
                    items.append((w, None))
            self.items, self.at = items, time.monotonic()
            return items


def _families() -> dict[str, GaugeMetricFamily]:
    dev = ["stage", "device"]
    g = GaugeMetricFamily
    return {
        "in_flight": g("edge_in_flight_requests", "Requests in flight (a generation's "
                       "current step counts as one)"),
        "sequences": g("edge_generate_sequences", "Generated sequences, by state: active "
                       "(holding caches) or waiting for a free one", labels=["state"]),
        "serving": g("edge_pipeline_serving", "1 while the pipeline serves requests, 0 "
                     "while it recovers or cannot serve"),
        "epoch": g("edge_pipeline_epoch", "Epoch of the deployment that serves"),
        "up": g("edge_device_up", "1 if the stage's worker answered its last status call",
                labels=dev),
        "rss": g("edge_device_rss_bytes", "Resident memory of the stage's worker", labels=dev),
        "peak": g("edge_device_peak_rss_bytes", "Peak resident memory of the stage's worker",
                  labels=dev),
        "budget": g("edge_device_memory_budget_bytes", "Memory budget of the stage's device "
                    "(cluster.yaml)", labels=dev),
        "planned": g("edge_device_planned_memory_bytes", "Memory the plan predicts for the "
                     "stage", labels=dev),
        "kv": g("edge_device_kv_cache_bytes", "Bytes of KV caches the stage holds",
                labels=dev),
        "kv_planned": g("edge_device_planned_kv_cache_bytes", "KV-cache bytes the plan "
                        "reserves for the stage", labels=dev),
        "held": g("edge_device_sequences", "Sequences whose caches the stage holds",
                  labels=dev),
        "queue": g("edge_device_queue_depth", "Requests waiting for compute on the stage",
                   labels=dev),
    }


class CoordinatorCollector(Collector):
    """Levels read at scrape time from the pipelines and generators of this process."""

    def __init__(self):
        self._pipelines: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._generators: weakref.WeakSet = weakref.WeakSet()
        self._lock = threading.Lock()

    def add_pipeline(self, pipeline: "Pipeline") -> None:
        with self._lock:
            self._pipelines[pipeline] = _Statuses()

    def remove_pipeline(self, pipeline: "Pipeline") -> None:
        with self._lock:
            self._pipelines.pop(pipeline, None)

    def add_generator(self, generator: "Generator") -> None:
        with self._lock:
            self._generators.add(generator)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        f = _families()
        with self._lock:
            pipelines = list(self._pipelines.items())
            generators = list(self._generators)
        f["in_flight"].add_metric([], sum(p.in_flight for p, _ in pipelines))
        sequences = [g.sequences() for g in generators]
        f["sequences"].add_metric(["active"], sum(busy for busy, _ in sequences))
        f["sequences"].add_metric(["waiting"], sum(waiting for _, waiting in sequences))
        if pipelines:  # the last one started (one per process, but in tests)
            f["serving"].add_metric([], int(not pipelines[-1][0].not_serving))
            f["epoch"].add_metric([], pipelines[-1][0].epoch)
        seen: set[tuple[str, str]] = set()
        for pipeline, statuses in pipelines:
            for w, status in statuses.get(pipeline):
                key = [str(w.stage.index), w.stage.device.name]
                if tuple(key) in seen:
                    continue
                seen.add(tuple(key))
                _add_device(f, key, w, status)
        yield from f.values()

    def describe(self) -> list:
        return []  # collected live: nothing to check for clashes at registration


def _add_device(f: dict[str, GaugeMetricFamily], key: list[str], w: Any, status: Any) -> None:
    """One stage's device gauges: the plan's numbers always, the worker's if it answered."""
    f["up"].add_metric(key, int(status is not None))
    f["budget"].add_metric(key, w.stage.device.memory_mb * MiB)
    f["planned"].add_metric(key, w.stage.predicted.memory_mb * MiB)
    f["kv_planned"].add_metric(key, w.stage.predicted.kv_cache_mb * MiB)
    if status is None:
        return
    f["rss"].add_metric(key, status.rss_bytes)
    f["peak"].add_metric(key, status.peak_rss_bytes)
    f["kv"].add_metric(key, status.kv_cache_bytes)
    f["held"].add_metric(key, status.sequences)
    f["queue"].add_metric(key, status.queue_depth)


_COLLECTOR: CoordinatorCollector | None = None
_COLLECTOR_LOCK = threading.Lock()


def _collector() -> CoordinatorCollector:
    global _COLLECTOR
    with _COLLECTOR_LOCK:
        if _COLLECTOR is None:
            _COLLECTOR = CoordinatorCollector()
            REGISTRY.register(_COLLECTOR)
        return _COLLECTOR


def watch_pipeline(pipeline: "Pipeline") -> None:
    """Report ``pipeline``'s levels (in flight, serving, its devices' memory) in the
    default registry, while it is open."""
    _collector().add_pipeline(pipeline)


def unwatch_pipeline(pipeline: "Pipeline") -> None:
    """Stop reporting ``pipeline`` (it closed)."""
    _collector().remove_pipeline(pipeline)


def watch_generator(generator: "Generator") -> None:
    """Report ``generator``'s sequences (active and waiting) in the default registry."""
    _collector().add_generator(generator)
