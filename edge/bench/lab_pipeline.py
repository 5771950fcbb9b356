"""Four emulated devices against one, measured in the device lab.

On loopback the pipeline's workers share this machine's cores, so a measured pipeline
cannot show what separate boards do. In ``edge lab`` each device gets a CPU quota of its
profile's share of this host, so N+1 emulated devices (N running the planner's split, one
holding the whole model) compute side by side at their emulated speed without taking
cores from each other. Rounds alternate between the two. A CPU quota emulates a board's
throughput, not its per-operation latency: the figures are "measured in the emulated
lab", never "measured on a Pi".
"""

from __future__ import annotations

import logging
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from edge.build import make_plan
from edge.console import measured_peak_mib
from edge.coordinator.pipeline import Pipeline
from edge.lab.devices import DeviceSpec
from edge.lab.lab import Lab
from edge.lab.system import LabError
from edge.planning.cluster import load_cluster

__all__ = ["lab_pipeline_vs_one"]

log = logging.getLogger(__name__)


def _round(mib: float | None) -> float | None:
    return None if mib is None else round(mib, 1)  # None: not measured


def _throughput(pipeline, inputs, in_flight: int) -> float:
    t = time.perf_counter()
    with ThreadPoolExecutor(in_flight) as pool:
        list(pool.map(pipeline.infer, inputs))
    return len(inputs) / (time.perf_counter() - t)


def _latency_ms(pipeline, inputs) -> list[float]:
    out = []
    for x in inputs:
        t = time.perf_counter()
        pipeline.infer(x)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def lab_pipeline_vs_one(model: Path, inputs: Sequence[Mapping[str, np.ndarray]],
                        bindings: dict[str, int], profile: str, devices: int, rounds: int,
                        workdir: Path, in_flight: int | None = None,
                        say: Callable[[str], None] = lambda _: None) -> dict:
    """Throughput and latency of ``devices`` lab devices running the planner's split
    against one lab device holding the whole model, alternating rounds.

    Args:
        model: the ONNX model.
        inputs: the requests of one throughput block (filling and draining included: a
            block of N over S stages reaches at most N / (N + S - 1) of the steady state).
        bindings: the sizes to plan for.
        profile: every device's profile (its memory cap and CPU share apply).
        devices: stages of the pipeline.
        rounds: throughput blocks of each.
        workdir: for the plans and the lab's state and caches.
        in_flight: the pipeline's requests in flight (default two per stage); the single
            device gets 2.

    Returns:
        The measurement, or ``{"status": "unavailable", "reason": ...}`` when the lab
        cannot run here (not root, a lab already up, ...).
    """
    in_flight = in_flight or 2 * devices
    try:
        lab = Lab.up([DeviceSpec(profile)] * (devices + 1), state_dir=workdir / "lab",
                     cache_dir=workdir / "lab-cache", cluster_file=workdir / "cluster.yaml")
    except LabError as e:
        return {"status": "unavailable", "reason": str(e)}
    try:
        devs = list(load_cluster(workdir / "cluster.yaml").devices)
        many = make_plan(model, devs[:devices], workdir / "many", bindings=bindings)
        one = make_plan(model, devs[devices:], workdir / "one", bindings=bindings)
        security = lab.security()  # lab workers run with mutual TLS, as devices do
        p_many = Pipeline(many, workdir / "many", diagnose=lab.diagnose, security=security)
        p_one = Pipeline(one, workdir / "one", diagnose=lab.diagnose, security=security)
        with p_many, p_one:
            p_many.start()
            p_one.start()
            for p in (p_many, p_one):  # warm up
                p.infer(inputs[0])
            lat: dict[str, list[float]] = {"one": [], "many": []}
            tput: dict[str, list[float]] = {"one": [], "many": []}
            for r in range(rounds):
                order = [("one", p_one), ("many", p_many)]
                for name, p in (order if r % 2 == 0 else order[::-1]):
                    lat[name] += _latency_ms(p, inputs[:2])
                    tput[name].append(_throughput(p, inputs,
                                                  in_flight if name == "many" else 2))
                    say(f"lab round {r}: {name} {tput[name][-1]:.3f} req/s")
            status = {"one": p_one.status(), "many": p_many.status()}
    finally:
        lab.down()
    one_rps, many_rps = statistics.median(tput["one"]), statistics.median(tput["many"])
    return {
        "status": "measured", "profile": profile, "devices": devices,
        "requests": len(inputs), "rounds": rounds, "in_flight": in_flight,
        "host_gflops": round(lab.host_gflops, 1),
        "modes": {"one": [s.mode for s in one.stages], "many": [s.mode for s in many.stages]},
        "one_device_rps": round(one_rps, 3), "pipeline_rps": round(many_rps, 3),
        "one_device_rps_per_round": [round(x, 3) for x in tput["one"]],
        "pipeline_rps_per_round": [round(x, 3) for x in tput["many"]],
        "throughput_ratio": round(many_rps / one_rps, 3),
        "one_device_latency_ms": round(statistics.median(lat["one"]), 1),
        "pipeline_latency_ms": round(statistics.median(lat["many"]), 1),
        "peak_rss_mib": {k: [_round(measured_peak_mib(s)) for s in v.stages]
                         for k, v in status.items()},
        "note": "measured in edge lab: CPU quotas scaled to the profile's GFLOP/s emulate "
                "a board's throughput, not its per-operation latency; not measured on a Pi",
    }
