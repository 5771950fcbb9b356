"""Deploying a plan on fresh local workers and timing requests through it.

A :class:`Deployment` owns its workers (started for it, so their peak RSS is its own) and
its coordinator-side :class:`~edge.coordinator.pipeline.Pipeline`. The bench keeps several
alive at once and alternates between them, so that a noisy moment on this shared machine
hits every configuration alike.
"""

from __future__ import annotations

import logging
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from edge.console import measured_peak_mib
from edge.coordinator.pipeline import Pipeline
from edge.transport.codec import decode_tensors
from edge.transport.security import Security
from edge.worker.launch import spawn_worker

__all__ = ["RequestRecord", "Deployment", "start_workers", "summary"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestRecord:
    """One request as the bench saw it.

    Attributes:
        start_s, end_s: ``time.perf_counter()`` around ``Pipeline.infer`` (input encoding
            included).
        timings: per stage ``(stage, queue_ms, compute_ms, send_ms)`` from the workers.
        received_ns: per stage, in the order of ``timings``, the worker's ``time.time_ns()``
            when the request arrived (0 from a worker that does not report it).
    """

    start_s: float
    end_s: float
    timings: tuple[tuple[int, float, float, float], ...]
    received_ns: tuple[int, ...] = ()

    @property
    def latency_ms(self) -> float:
        return (self.end_s - self.start_s) * 1e3


def start_workers(count: int, workdir: Path, profile: str, prefix: str = "worker") -> list:
    """Start ``count`` ``edge worker`` processes on loopback at once (not one by one).

    Args:
        count: how many.
        workdir: their logs, port files and caches.
        profile: their device profile (``--device``), which sets their memory budget.
        prefix: file-name prefix, to tell deployments apart.

    Returns:
        ``edge.worker.launch.WorkerProcess`` objects; stop them with ``.stop()``.
    """
    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(spawn_worker, Path(workdir), f"{prefix}-{i}", profile)
                   for i in range(count)]
    workers, errors = [], []
    for f in futures:
        try:
            workers.append(f.result())
        except Exception as e:  # stop the ones that did start before raising
            errors.append(e)
    if errors:
        for w in workers:
            w.stop()
        raise errors[0]
    return workers


class Deployment:
    """A plan served by its own workers on this machine.

    Args:
        name: a label (``edge-4``).
        plan: the plan; its devices' addresses must be the workers'.
        plan_dir: where ``plan.json`` and ``shards/`` are.
        workers: the worker processes (stopped on close), or () when someone else owns them.
        security: how to reach the workers (default plaintext: loopback only).

    Attributes:
        note: what is unusual about it, for the report ("" when nothing).
    """

    def __init__(self, name: str, plan, plan_dir: Path, workers: Sequence = (),
                 security=None):
        self.name = name
        self.plan = plan
        self.plan_dir = Path(plan_dir)
        self.workers = list(workers)
        self.pipeline = Pipeline(plan, plan_dir, security=security or Security())
        self.sequential: list[RequestRecord] = []
        self.concurrent: list[RequestRecord] = []
        self.throughputs: list[float] = []
        self.note = ""

    def start(self) -> "Deployment":
        self.pipeline.start()
        return self

    def close(self) -> None:
        """Close the pipeline and stop the workers (together: each takes a moment)."""
        self.pipeline.close()
        if self.workers:
            with ThreadPoolExecutor(len(self.workers)) as pool:
                list(pool.map(lambda w: w.stop(), self.workers))

    @property
    def num_stages(self) -> int:
        return len(self.plan.stages)

    def _one(self, inputs: Mapping[str, np.ndarray]) -> tuple[RequestRecord, dict]:
        t0 = time.perf_counter()
        result = self.pipeline.infer(inputs)
        t1 = time.perf_counter()
        timings = tuple((t.stage, t.queue_ms, t.compute_ms, t.send_ms) for t in result.timings)
        received = tuple(t.received_unix_ns for t in result.timings)
        return RequestRecord(t0, t1, timings, received), decode_tensors(result.outputs)

    def outputs(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model's outputs for one request."""
        return self._one(inputs)[1]

    def run_sequential(self, inputs: Sequence[Mapping[str, np.ndarray]]) -> list[RequestRecord]:
        """One request at a time (latency); records are kept in ``self.sequential``."""
        out = [self._one(x)[0] for x in inputs]
        self.sequential += out
        return out

    def run_concurrent(self, inputs: Sequence[Mapping[str, np.ndarray]],
                       in_flight: int) -> tuple[list[RequestRecord], float]:
        """All of ``inputs`` with ``in_flight`` requests outstanding (throughput).

        Returns:
            The records (also kept in ``self.concurrent``) and requests per second.
        """
        t0 = time.perf_counter()
        with ThreadPoolExecutor(in_flight) as pool:
            records = [r for r, _ in pool.map(self._one, inputs)]
        rps = len(inputs) / (time.perf_counter() - t0)
        self.concurrent += records
        self.throughputs.append(rps)
        return records, rps

    def peak_rss_mib(self) -> list[float | None]:
        """Each worker's peak RSS (VmHWM) so far, by stage, MiB; None for a worker whose
        status could not be read (logged by the pipeline): not measured, never 0."""
        return [measured_peak_mib(s) for s in self.pipeline.status().stages]

    def stage_compute_ms(self) -> list[float]:
        """Median compute time of each stage over the one-at-a-time requests."""
        by_stage: dict[int, list[float]] = {}
        for r in self.sequential:
            for stage, _q, compute, _s in r.timings:
                by_stage.setdefault(stage, []).append(compute)
        return [statistics.median(by_stage[k]) for k in range(self.num_stages)]


def summary(values: Sequence[float]) -> dict[str, float]:
    """``median``, ``p10``, ``p90``, ``n`` of a sample, rounded for a report."""
    v = np.asarray(values, dtype=float)
    return {"median": round(float(np.median(v)), 2), "p10": round(float(np.percentile(v, 10)), 2),
            "p90": round(float(np.percentile(v, 90)), 2), "n": int(v.size)}
