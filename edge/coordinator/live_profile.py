"""Live profile: drive requests through a running pipeline and gather every device's
memory samples, as a plain dict that :mod:`edge.profiling.report` renders.

For a plan of a decoder with KV caches (its stages report a planned ``kv_cache_mb``) the
requests are generations of ``GENERATE_TOKENS`` tokens from a prompt of
``GENERATE_PROMPT`` token ids, and each device's KV caches are read from its status while
they run (a sequence's caches are freed when it ends): the largest seen, and the number of
sequences then held.

A client of the coordinator, so it lives here: ``edge.profiling`` (measuring a process, a
device, a model offline) is imported by the transport and the worker, and so must import
neither them nor the coordinator.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping

import grpc
import numpy as np

from edge.coordinator.client import InferClient
from edge.proto import edge_pb2 as pb
from edge.transport.channels import Security
from edge.transport.codec import decode_spec

__all__ = ["synthetic_inputs", "collect"]

MiB = float(1 << 20)
GENERATE_PROMPT = 16
GENERATE_TOKENS = 16


def synthetic_inputs(status: pb.ClusterStatus, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs shaped like the plan's model inputs at the sizes it was costed for.

    Integers are ones (a valid token id and an all-ones attention mask), floats are
    standard normal, booleans true. Pass real inputs where values change memory use.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for msg in status.model_inputs:
        spec = decode_spec(msg)
        shape = tuple(d if isinstance(d, int) else status.bindings.get(d, 1) if isinstance(d, str)
                      else 1 for d in spec.shape)
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            out[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            out[spec.name] = np.ones(shape, dtype)
        else:
            out[spec.name] = np.ones(shape, dtype)
    return out


def _sample(s: pb.MemorySample) -> dict:
    return dict(time=s.time, rss_mb=s.rss_bytes / MiB, anon_mb=s.rss_anon_bytes / MiB,
                file_mb=s.rss_file_bytes / MiB, peak_mb=s.peak_rss_bytes / MiB,
                heap_mb=s.heap_bytes / MiB, cpu_percent=s.cpu_percent,
                requests_done=s.requests_done, queue_depth=s.queue_depth)


def _sample_kv(client: InferClient, into: dict[int, tuple[int, int]]) -> None:
    """Keep each stage's largest KV caches (bytes, sequences) seen in one status call."""
    for st in client.status().stages:
        if st.HasField("worker") and st.worker.kv_cache_bytes >= into.get(st.stage, (0, 0))[0]:
            into[st.stage] = (st.worker.kv_cache_bytes, st.worker.sequences)


def _request(client: InferClient, status: pb.ClusterStatus,
             inputs: Mapping[str, np.ndarray] | None, kv: dict[int, tuple[int, int]]):
    """One request of the load: an Infer, or for a plan for generation a short greedy
    generation whose caches are sampled once its first token came."""
    if not any(st.planned_kv_cache_mb > 0 for st in status.stages):
        x = dict(inputs) if inputs is not None else synthetic_inputs(status)
        return lambda: client.infer_raw(x)

    def generate() -> None:
        for i, _ in enumerate(client.generate_raw(prompt_tokens=[1] * GENERATE_PROMPT,
                                                  max_tokens=GENERATE_TOKENS)):
            if i == 0:
                _sample_kv(client, kv)

    return generate


def _device(st: pb.StageProfile, status: pb.ClusterStatus,
            kv: dict[int, tuple[int, int]]) -> dict:
    d = st.profile_data
    planned_kv = {s.stage: s.planned_kv_cache_mb for s in status.stages}
    kv_bytes, sequences = kv.get(st.stage, (0, 0))
    return dict(
        stage=st.stage, device=st.device, address=st.address, profile=st.profile,
        shard=st.shard, planned_mb=st.planned_memory_mb, budget_mb=st.budget_mb,
        rss_at_load_mb=d.rss_at_load_bytes / MiB, error=st.error,
        planned_kv_mb=planned_kv.get(st.stage, 0.0), kv_cache_mb=kv_bytes / MiB,
        sequences=sequences, samples=[_sample(s) for s in d.samples])


def collect(address: str, requests: int = 50, concurrency: int = 4,
            inputs: Mapping[str, np.ndarray] | None = None,
            security: Security = Security()) -> dict:
    """Send ``requests`` through the coordinator at ``address`` and gather the profile.

    Args:
        address: the coordinator's ``host:port``.
        requests: how many requests to send.
        concurrency: how many in flight at once.
        inputs: one request's inputs (default: :func:`synthetic_inputs`; unused for a
            plan for generation, which is sent token prompts).
        security: how to reach the coordinator (its bundle, or plaintext on loopback).

    Returns:
        The report dict (see :func:`edge.profiling.report.write_live`).
    """
    with InferClient(address, security=security) as client:
        status = client.status()
        kv: dict[int, tuple[int, int]] = {}
        send = _request(client, status, inputs, kv)
        start = time.time() - 1.0  # include the samples from just before the load
        latencies: list[float] = []
        errors: list[str] = []

        def one(_: int) -> None:
            t = time.perf_counter()
            try:
                send()
                latencies.append((time.perf_counter() - t) * 1e3)
            except grpc.RpcError as e:
                errors.append(f"{e.code().name}: {e.details()}")

        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(requests)))
        elapsed = time.perf_counter() - t0
        time.sleep(0.3)  # let each worker take a sample after the last request
        profile = client.profile(since=start)
    devices = [_device(st, status, kv) for st in profile.stages]
    lat = sorted(latencies)
    return dict(
        model=status.model, plan_id=status.plan_id, requests=requests, errors=len(errors),
        error_messages=sorted(set(errors))[:10],
        latency_ms=dict(mean=statistics.fmean(lat) if lat else 0.0,
                        p50=lat[len(lat) // 2] if lat else 0.0,
                        p95=lat[min(len(lat) - 1, int(len(lat) * 0.95))] if lat else 0.0),
        throughput_rps=len(latencies) / elapsed if elapsed else 0.0,
        devices=devices)
