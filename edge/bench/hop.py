"""What one worker-to-worker hop costs for a BERT-base-sized activation (384 KiB).

A model of a few cheap elementwise nodes on a float32 [1, 128, 768] tensor is served two
ways at once: whole by one worker, and cut in two over two workers, so that the only
crossing tensor is that activation. Requests alternate between the two; per pair,

    hop = (latency of the 2-stage pipeline - its compute) - (latency of the 1-stage - its compute)

is one extra hop: encoding, the Forward call, the transfer, decoding and the hand-over to
the next stage's compute thread. Measured on loopback, and over a gigabit link shaped by
``edge.lab`` when the lab can run here.
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge.bench.measure import Deployment, start_workers, summary
from edge.build import make_plan
from edge.lab.devices import DeviceSpec, load_profile
from edge.lab.lab import Lab
from edge.lab.system import LabError
from edge.planning.cluster import cluster_from_profile

__all__ = ["ACTIVATION_SHAPE", "activation_bytes", "chain_model", "measure_hop",
           "loopback_hop", "lab_hop"]

log = logging.getLogger(__name__)

ACTIVATION_SHAPE = (1, 128, 768)


def activation_bytes() -> int:
    """Bytes of the float32 activation that crosses the cut: 393,216 (384 KiB)."""
    return int(np.prod(ACTIVATION_SHAPE)) * 4


def chain_model(path: Path, nodes: int = 4) -> Path:
    """A chain of ``nodes`` Adds of a constant on a float32 [1, 128, 768] input, as ONNX.

    (A constant of 0 would be removed by onnxruntime's no-op elimination.)

    Args:
        path: the ``.onnx`` to write.
        nodes: how many Adds.
    """
    names = ["x"] + [f"t{i}" for i in range(1, nodes)] + ["y"]
    graph = helper.make_graph(
        [helper.make_node("Add", [names[i], "c"], [names[i + 1]], name=f"add_{i}")
         for i in range(nodes)],
        "hop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(ACTIVATION_SHAPE))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(ACTIVATION_SHAPE))],
        [numpy_helper.from_array(np.array(0.5, dtype=np.float32), "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def measure_hop(one: Deployment, two: Deployment, rounds: int) -> dict:
    """Alternate requests between a 1-stage and a 2-stage deployment of ``chain_model``.

    Args:
        one: the model whole on one worker.
        two: the model over two workers.
        rounds: request pairs.

    Returns:
        ``hop_ms`` (the extra hop, see the module docstring), ``one_stage_ms`` and
        ``two_stage_ms`` (latencies), ``encode_ms`` (stage 0 of ``two`` encoding the
        activation) and ``receive_to_compute_ms`` (stage 1: from the Forward call's arrival
        to its compute: decoding, checking, queueing), all as ``summary`` dicts.
    """
    x = {"x": np.random.default_rng(0).standard_normal(ACTIVATION_SHAPE).astype(np.float32)}
    for _ in range(3):  # first-call allocations on both sides
        one.run_sequential([x])
        two.run_sequential([x])
    one.sequential.clear()
    two.sequential.clear()
    hops, l1, l2, enc, recv = [], [], [], [], []
    for i in range(rounds):
        pair = (one, two) if i % 2 else (two, one)  # neither always goes first
        recs = {d.name: d.run_sequential([x])[0] for d in pair}
        a, b = recs[one.name], recs[two.name]
        compute_a = sum(c for _, _, c, _ in a.timings)
        compute_b = sum(c for _, _, c, _ in b.timings)
        hops.append((b.latency_ms - compute_b) - (a.latency_ms - compute_a))
        l1.append(a.latency_ms)
        l2.append(b.latency_ms)
        timings = sorted(b.timings)
        enc.append(timings[0][3])
        recv.append(timings[1][1])
    return {"hop_ms": summary(hops), "one_stage_ms": summary(l1), "two_stage_ms": summary(l2),
            "encode_ms": summary(enc), "receive_to_compute_ms": summary(recv),
            "hop_mean_ms": round(statistics.fmean(hops), 3)}


def _deploy_pair(model: Path, workdir: Path, devices: list, workers: list,
                 security=None) -> tuple:
    """Plans and deployments: ``devices[0]`` serves the whole model, ``devices[1:3]`` the
    two halves. ``workers`` are stopped by the second deployment's close; ``security``
    reaches them (default: plaintext on loopback)."""
    plan1 = make_plan(model, devices[:1], workdir / "one")
    plan2 = make_plan(model, devices[1:3], workdir / "two")
    crossing = sum(int(np.prod([d if isinstance(d, int) else 1 for d in t.shape]))
                   * np.dtype(t.dtype).itemsize for t in plan2.stages[0].outputs)
    one = Deployment("hop-1", plan1, workdir / "one", security=security)
    two = Deployment("hop-2", plan2, workdir / "two", workers, security=security)
    return one, two, crossing


def loopback_hop(workdir: Path, profile: str, rounds: int) -> dict:
    """``measure_hop`` over three local workers on loopback.

    Args:
        workdir: for the model, plans and workers.
        profile: the workers' device profile.
        rounds: request pairs.
    """
    model = chain_model(workdir / "chain.onnx")
    workers = start_workers(3, workdir / "workers", profile, prefix="hop")
    try:
        devices = list(cluster_from_profile(profile, 3, [w.address for w in workers]).devices)
        one, two, crossing = _deploy_pair(model, workdir, devices, workers)
    except BaseException:
        for w in workers:
            w.stop()
        raise
    return {"link": "loopback", "crossing_bytes": crossing, **_run_pair(one, two, rounds)}


def _run_pair(one, two, rounds: int) -> dict:
    """Deploy the 1-stage and 2-stage pipelines, measure the hop, close both."""
    try:
        one.start()
        two.start()
        return measure_hop(one, two, rounds)
    finally:
        one.close()
        two.close()


def lab_hop(workdir: Path, profile: str, rounds: int, link: str = "gige",
            lab_factory: Callable | None = None) -> dict:
    """``measure_hop`` over three emulated devices of ``edge.lab`` on a shaped link.

    The devices get this host's full CPU (no quota): the hop is measured with the link
    shaped and nothing else emulated, so that a board's slower CPU does not hide in it.

    Args:
        workdir: for the model, plans and the lab's state and caches.
        profile: the devices' profile (its memory cap applies).
        rounds: request pairs.
        link: ``gige`` (1000 Mbit/s) or ``wifi``.
        lab_factory: ``edge.lab.Lab.up`` (for tests).

    Returns:
        The measurement, or ``{"link": link, "status": "unavailable", "reason": ...}``
        when the lab cannot run here (not root, no tc, a lab already up, ...).
    """
    up = lab_factory or Lab.up
    model = chain_model(workdir / "chain.onnx")
    try:
        # gflops = the profile's own speed gives each device all of this host's cores.
        lab = up([DeviceSpec(profile)] * 3, link=link, state_dir=workdir / "lab",
                 cache_dir=workdir / "lab-cache", gflops=load_profile(profile).gflops,
                 ready_timeout=60.0)
    except LabError as e:
        return {"link": link, "status": "unavailable", "reason": str(e)}
    try:
        devices = list(lab.cluster().devices)
        # Lab workers run with mutual TLS as devices do, so the hop includes TLS.
        one, two, crossing = _deploy_pair(model, workdir, devices, [], lab.security())
        result = _run_pair(one, two, rounds)
        rates = sorted({d.bandwidth_mbps for d in lab.devices})
    finally:
        lab.down()
    return {"link": link, "status": "measured", "rate_mbps": rates, "crossing_bytes": crossing,
            "cpu": "host speed (no CPU quota): the link alone is emulated", **result}
