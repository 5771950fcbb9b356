"""Modelled figures: what measured stage times would become on the devices of a profile.

Loopback workers on this machine share its cores, so a pipeline cannot run faster here
than one process using all of them. On real boards each stage has a board to itself. This
module scales each stage's compute time, measured here one request at a time, by the ratio
of this host's GFLOP/s to the device's, and adds sending the stage's outputs at the
device's link rate (the planner's ``transfer_ms``). The pipeline's period is its slowest
stage. These are models built from measurements, never measurements on a board.

Pure functions of numbers; no I/O.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["modelled_pipeline"]


def modelled_pipeline(compute_ms: Sequence[float], transfer_ms: Sequence[float],
                      host_gflops: float, device_gflops: Sequence[float]) -> dict:
    """Model a pipeline on its devices from per-stage times measured on this host.

    Args:
        compute_ms: per stage, compute time measured on this host (one request at a time,
            so each stage had the host's cores to itself).
        transfer_ms: per stage, time to send its outputs at its device's link rate.
        host_gflops: this host's fp32 GFLOP/s over all its cores (``measure_gflops``).
        device_gflops: per stage, its device's GFLOP/s (the profile's ``gflops``).

    Returns:
        ``stage_ms`` (per stage: scaled compute + transfer), ``period_ms`` (the slowest
        stage), ``latency_ms`` (their sum), ``throughput_rps`` (1000 / period) and
        ``scale`` (per stage, host GFLOP/s ÷ device GFLOP/s).

    Raises:
        ValueError: lengths differ or a speed is not positive.
    """
    n = len(compute_ms)
    if not (len(transfer_ms) == len(device_gflops) == n) or n == 0:
        raise ValueError(f"expected one compute time, transfer time and device speed per "
                         f"stage, got {len(compute_ms)}, {len(transfer_ms)} and "
                         f"{len(device_gflops)}")
    if host_gflops <= 0 or any(g <= 0 for g in device_gflops):
        raise ValueError(f"speeds must be > 0 GFLOP/s, got host {host_gflops} and devices "
                         f"{list(device_gflops)}")
    scale = [host_gflops / g for g in device_gflops]
    stage_ms = [c * s + t for c, s, t in zip(compute_ms, scale, transfer_ms)]
    period = max(stage_ms)
    return {"stage_ms": [round(x, 2) for x in stage_ms], "period_ms": round(period, 2),
            "latency_ms": round(sum(stage_ms), 2), "throughput_rps": round(1e3 / period, 3),
            "scale": [round(s, 3) for s in scale]}
