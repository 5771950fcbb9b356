"""The planner: split a model's nodes into contiguous stages, one per device.

A pure function of plain arrays (per-node flops and live bytes, per-cut bytes, which node
uses which initializer) and the devices, so it is tested like a sorting routine against
brute force (``brute_force``) on small random inputs.

Objective: among splits where every stage fits its device's memory, minimise the slowest
stage's time (the pipeline's period); break ties on total latency (sum of stage times).

    stage time   = flops[i:j] / (gflops * 1e9)  +  cut_bytes[j] / (bandwidth_mbps * 1e6 / 8)
    stage memory = see edge.planning.memory.stage_memory_mb

The last stage's transfer is the model's outputs going back to the coordinator
(``cut_bytes[n]``). Exact for contiguous splits: two dynamic programs over (device, end
position), each vectorised over the start position. The first finds the optimal bottleneck
B*; the second minimises total latency subject to every stage taking <= B*. (A single
lexicographic DP is not exact: a prefix with a worse bottleneck but lower latency can win
once a later, slower stage dominates the bottleneck.)
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence

import numpy as np

from edge.errors import NoFitError, PlanError
from edge.planning import memory
from edge.planning.plan import Device, StagePrediction

__all__ = [
    "StageCosts",
    "CostArrays",
    "Split",
    "partition",
    "brute_force",
    "evaluate",
]

log = logging.getLogger(__name__)

# Relative slack when comparing a stage time to the optimal bottleneck in the second pass,
# so float rounding in a different summation order never makes the optimum infeasible.
_REL_TOL = 1e-12


class StageCosts(Protocol):
    """What the planner needs to know about a graph (GraphCosts satisfies it)."""

    flops: np.ndarray        # (n,) per node
    live_bytes: np.ndarray   # (n,) bytes live while node p runs
    cut_bytes: np.ndarray    # (n+1,) bytes crossing the cut before node p
    init_bytes: np.ndarray   # (m,) size of each initializer
    init_uses: Sequence[np.ndarray]  # (m,) sorted node positions using each initializer


@dataclass(frozen=True)
class CostArrays:
    """Plain arrays satisfying StageCosts, for tests and synthetic models."""

    flops: np.ndarray
    live_bytes: np.ndarray
    cut_bytes: np.ndarray
    init_bytes: np.ndarray = field(default_factory=lambda: np.zeros(0))
    init_uses: tuple[np.ndarray, ...] = ()


@dataclass(frozen=True)
class Split:
    """The planner's answer: one ``[start, end)`` node range and prediction per device."""

    ranges: tuple[tuple[int, int], ...]
    predictions: tuple[StagePrediction, ...]
    bottleneck_ms: float
    latency_ms: float


# --------------------------------------------------------------------------- stage costs


def _n(costs: StageCosts) -> int:
    n = len(costs.flops)
    if len(costs.live_bytes) != n or len(costs.cut_bytes) != n + 1:
        raise PlanError(
            f"cost arrays disagree: flops has {n} nodes, live_bytes {len(costs.live_bytes)}, "
            f"cut_bytes {len(costs.cut_bytes)} (expected n + 1 = {n + 1})")
    return n


def _transfer_ms(nbytes, dev: Device):
    return nbytes * 8.0 / (dev.bandwidth_mbps * 1e6) * 1e3


def _compute_ms(flops, dev: Device):
    return flops / (dev.gflops * 1e9) * 1e3


def _weights_brute(costs: StageCosts, i: int, j: int) -> float:
    return float(sum(b for b, u in zip(costs.init_bytes, costs.init_uses)
                     if np.any((np.asarray(u) >= i) & (np.asarray(u) < j))))


def evaluate(costs: StageCosts, dev: Device, i: int, j: int) -> StagePrediction:
    """Predicted memory and time of nodes ``[i, j)`` on ``dev`` (scalar, direct formulas).

    Args:
        costs: the graph's cost arrays.
        dev: the device running the stage.
        i, j: the node range, ``0 <= i < j <= n``.
    """
    w = _weights_brute(costs, i, j)
    a = float(np.max(costs.live_bytes[i:j]))
    f = float(np.sum(costs.flops[i:j], dtype=np.float64))
    c = _compute_ms(f, dev)
    t = _transfer_ms(float(costs.cut_bytes[j]), dev)
    mem = memory.stage_memory_mb(w, a, dev.runtime_floor_mb)
    return StagePrediction(
        weights_mb=memory.WEIGHT_FACTOR * w / memory.MiB,
        activations_mb=memory.ACTIVATION_FACTOR * a / memory.MiB,
        runtime_floor_mb=mem - memory.WEIGHT_FACTOR * w / memory.MiB
        - memory.ACTIVATION_FACTOR * a / memory.MiB,
        memory_mb=mem, gflops=f / 1e9, compute_ms=c, transfer_ms=t, time_ms=c + t)


def _weight_sweep(costs: StageCosts, n: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (j, w) for j = 1..n, ``w[i]`` = unique initializer bytes of ``[i, j)``.

    An initializer is in ``[i, j)`` iff its last use before ``j`` is ``>= i``: keep, per
    position, the bytes whose last use so far is there, then reverse-cumsum. O(n) per j.
    """
    events: list[list[int]] = [[] for _ in range(n)]
    for k, uses in enumerate(costs.init_uses):
        for p in sorted(set(int(x) for x in uses)):
            if not 0 <= p < n:
                raise PlanError(f"initializer {k} used at node {p}, outside [0, {n})")
            events[p].append(k)
    sizes = np.asarray(costs.init_bytes, dtype=np.float64)
    last = np.full(len(sizes), -1, dtype=np.int64)
    at = np.zeros(n, dtype=np.float64)
    for j in range(1, n + 1):
        p = j - 1
        for k in events[p]:
            if last[k] >= 0:
                at[last[k]] -= sizes[k]
            at[p] += sizes[k]
            last[k] = p
        yield j, np.cumsum(at[:j][::-1])[::-1]


@dataclass
class _Vectors:
    """For one end position j, per start i < j: stage memory and time on each device."""

    mem: np.ndarray    # (D, j) MiB
    time: np.ndarray   # (D, j) ms


def _sweep(costs: StageCosts, devices: Sequence[Device], n: int) -> Iterator[tuple[int, _Vectors]]:
    pf = np.concatenate([[0.0], np.cumsum(np.asarray(costs.flops, dtype=np.float64))])
    live = np.asarray(costs.live_bytes, dtype=np.float64)
    cut = np.asarray(costs.cut_bytes, dtype=np.float64)
    floor = np.array([d.runtime_floor_mb for d in devices])[:, None]
    rate = np.array([d.gflops * 1e9 for d in devices])[:, None]
    bw = np.array([d.bandwidth_mbps * 1e6 / 8.0 for d in devices])[:, None]
    for j, w in _weight_sweep(costs, n):
        act = np.maximum.accumulate(live[:j][::-1])[::-1]
        flops = pf[j] - pf[:j]
        mem = memory.stage_memory_mb(w[None, :], act[None, :], floor)
        time = flops[None, :] / rate * 1e3 + cut[j] / bw * 1e3
        yield j, _Vectors(mem=mem, time=time)


# --------------------------------------------------------------------------- dynamic programs


def _dp(costs: StageCosts, devices: Sequence[Device], n: int, mode: str,
        limit: float = np.inf) -> tuple[float, list[tuple[int, int]] | None]:
    """One DP over (device, end). Returns (optimal value, ranges) or (inf, None).

    mode:
        "bottleneck": min over fitting splits of max stage time.
        "latency": min over fitting splits with every stage time <= limit of total time.
        "overshoot": min over all splits of max (stage memory - device memory).
        "memory": min over all splits of max stage memory.
    """
    D = len(devices)
    has = np.array([d.memory_mb for d in devices])
    best = np.full((D, n + 1), np.inf)
    arg = np.full((D, n + 1), -1, dtype=np.int64)
    cap = limit * (1 + _REL_TOL) + 1e-300 if np.isfinite(limit) else np.inf
    for j, v in _sweep(costs, devices, n):
        for d in range(D):
            # Device d's stage ends at j, starts at i; devices before it need >= d nodes, and
            # the ones after it need >= D - 1 - d.
            if j < d + 1 or j > n - (D - 1 - d):
                continue
            if d == 0:
                prev = np.full(j, np.inf)
                prev[0] = 0.0
            else:
                prev = best[d - 1, :j].copy()
            if mode in ("bottleneck", "latency"):
                fits = v.mem[d] <= has[d]
                stage = v.time[d]
                if mode == "latency":
                    fits &= stage <= cap
                    cand = np.where(fits, prev + stage, np.inf)
                else:
                    cand = np.where(fits, np.maximum(prev, stage), np.inf)
            elif mode == "overshoot":
                cand = np.maximum(prev, v.mem[d] - has[d])
            elif mode == "memory":
                cand = np.maximum(prev, v.mem[d])
            else:
                raise ValueError(mode)
            if d == 0:
                cand[1:] = np.inf
            i = int(np.argmin(cand))
            if np.isfinite(cand[i]):
                best[d, j] = cand[i]
                arg[d, j] = i
    value = float(best[D - 1, n])
    if not np.isfinite(value):
        return value, None
    ranges = []
    j = n
    for d in range(D - 1, -1, -1):
        i = int(arg[d, j])
        ranges.append((i, j))
        j = i
    ranges.reverse()
    return value, ranges


def _check_inputs(costs: StageCosts, devices: Sequence[Device]) -> int:
    n = _n(costs)
    if not devices:
        raise PlanError("no devices to plan for")
    if len(devices) > n:
        raise PlanError(
            f"{len(devices)} devices but the model has only {n} nodes: every device needs at "
            "least one node; use fewer devices")
    for d in devices:
        if d.gflops <= 0 or d.bandwidth_mbps <= 0:
            raise PlanError(f"device {d.name}: gflops and bandwidth_mbps must be > 0, got "
                            f"{d.gflops} and {d.bandwidth_mbps}")
    return n


def _make_split(costs: StageCosts, devices: Sequence[Device],
                ranges: Sequence[tuple[int, int]]) -> Split:
    preds = tuple(evaluate(costs, dev, i, j) for dev, (i, j) in zip(devices, ranges))
    return Split(ranges=tuple((int(i), int(j)) for i, j in ranges), predictions=preds,
                 bottleneck_ms=max(p.time_ms for p in preds),
                 latency_ms=sum(p.time_ms for p in preds))


def _no_fit(costs: StageCosts, devices: Sequence[Device], closest: Sequence[tuple[int, int]],
            min_memory_mb: float) -> NoFitError:
    needs, has, lines = {}, {}, []
    for dev, (i, j) in zip(devices, closest):
        p = evaluate(costs, dev, i, j)
        needs[dev.name] = p.memory_mb
        has[dev.name] = dev.memory_mb
        verdict = "OVER" if p.memory_mb > dev.memory_mb else "ok"
        lines.append(
            f"  {dev.name}: needs {p.memory_mb:.0f} MiB, has {dev.memory_mb:.0f} MiB "
            f"[{verdict}] (nodes [{i}, {j}): weights {p.weights_mb:.0f} + activations "
            f"{p.activations_mb:.0f} + runtime {p.runtime_floor_mb:.0f} MiB)")
    msg = (f"no split of the model's {len(costs.flops)} nodes over {len(devices)} devices "
           "fits in memory; the closest split (smallest worst overshoot) needs:\n"
           + "\n".join(lines)
           + f"\nevery device would need at least {min_memory_mb:.0f} MiB (the smallest "
           "memory that, given to every device in this order, lets some split fit); "
           "or add devices")
    return NoFitError(msg, needs=needs, has=has, min_memory_mb=min_memory_mb)


def partition(costs: StageCosts, devices: Sequence[Device]) -> Split:
    """Split nodes ``[0, n)`` into one contiguous, non-empty range per device, in order.

    Args:
        costs: per-node / per-cut cost arrays (a GraphCosts or a CostArrays).
        devices: the pipeline's devices, in pipeline order (standbys excluded).

    Returns:
        The split whose slowest stage is fastest among those that fit every device's
        memory; ties broken on total latency.

    Raises:
        NoFitError: no split fits; says what each device would need and the smallest
            per-device memory that would make one fit.
        PlanError: more devices than nodes, or malformed inputs.
    """
    n = _check_inputs(costs, devices)
    bottleneck, _ = _dp(costs, devices, n, "bottleneck")
    if not np.isfinite(bottleneck):
        _, closest = _dp(costs, devices, n, "overshoot")
        min_mem, _ = _dp(costs, devices, n, "memory")
        err = _no_fit(costs, devices, closest, min_mem)
        log.info("%s", err)
        raise err
    _, ranges = _dp(costs, devices, n, "latency", limit=bottleneck)
    if ranges is None:  # cannot happen unless rounding is pathological
        raise PlanError("planner failed to recover the optimal split; please report this")
    split = _make_split(costs, devices, ranges)
    _log_split(costs, devices, split)
    return split


def _log_split(costs: StageCosts, devices: Sequence[Device], split: Split) -> None:
    n = len(costs.flops)
    total = float(np.sum(costs.flops))
    for k, (dev, (i, j), p) in enumerate(zip(devices, split.ranges, split.predictions)):
        why = []
        if p.time_ms >= split.bottleneck_ms * (1 - 1e-9):
            why.append("bottleneck stage")
        if j < n and evaluate(costs, dev, i, j + 1).memory_mb > dev.memory_mb:
            why.append("memory-bound: one more node would not fit")
        if p.transfer_ms > p.compute_ms:
            why.append(f"link-bound: sending {costs.cut_bytes[j] / 1e6:.2f} MB costs more "
                       "than computing")
        log.info(
            "stage %d on %s (%.1f GFLOP/s, %.0f MiB, %.0f Mbit/s): nodes [%d, %d) = %.0f%% of "
            "the flops; %.1f ms compute + %.1f ms send = %.1f ms; memory %.0f of %.0f MiB "
            "(weights %.0f + activations %.0f + runtime %.0f)%s",
            k, dev.name, dev.gflops, dev.memory_mb, dev.bandwidth_mbps, i, j,
            100.0 * p.gflops * 1e9 / total if total else 0.0, p.compute_ms, p.transfer_ms,
            p.time_ms, p.memory_mb, dev.memory_mb, p.weights_mb, p.activations_mb,
            p.runtime_floor_mb, f"; {', '.join(why)}" if why else "")
    log.info("pipeline period %.1f ms (slowest stage), latency %.1f ms",
             split.bottleneck_ms, split.latency_ms)


# --------------------------------------------------------------------------- brute force


def brute_force(costs: StageCosts, devices: Sequence[Device]) -> Split:
    """Same contract as ``partition``, by enumerating every cut combination.

    Exponential: for tests on small inputs only. Uses the scalar ``evaluate``, which shares
    no code with the DP's vectorised sweep.

    Args:
        costs: per-node / per-cut cost arrays.
        devices: the pipeline's devices, in order.
    """
    n = _check_inputs(costs, devices)
    D = len(devices)
    best_key, best_ranges = None, None
    min_mem, closest, closest_over = np.inf, None, np.inf
    for cuts in itertools.combinations(range(1, n), D - 1):
        bounds = (0, *cuts, n)
        ranges = list(zip(bounds[:-1], bounds[1:]))
        preds = [evaluate(costs, dev, i, j) for dev, (i, j) in zip(devices, ranges)]
        worst_mem = max(p.memory_mb for p in preds)
        over = max(p.memory_mb - dev.memory_mb for p, dev in zip(preds, devices))
        min_mem = min(min_mem, worst_mem)
        if over < closest_over:
            closest_over, closest = over, ranges
        if over > 0:
            continue
        key = (max(p.time_ms for p in preds), sum(p.time_ms for p in preds))
        if best_key is None or key[0] < best_key[0] * (1 - 1e-12) or (
                key[0] <= best_key[0] * (1 + 1e-12) and key[1] < best_key[1]):
            best_key, best_ranges = key, ranges
    if best_ranges is None:
        raise _no_fit(costs, devices, closest, float(min_mem))
    return _make_split(costs, devices, best_ranges)
