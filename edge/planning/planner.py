"""The planner: split a model's nodes into contiguous stages, one per device.

A pure function of plain arrays (per-node flops and live bytes, per-cut bytes, which node
uses which initializer) and the devices, so it is tested like a sorting routine against
brute force (``brute_force``) on small random inputs.

Objective: among splits where every stage fits its device's memory, minimise the slowest
stage's time (the pipeline's period); break ties on total latency (sum of stage times).

Every stage also gets a mode (``edge.planning.plan.MODES``): the first of fp32, fp32-lean,
int8 whose predicted memory fits its device. Precision comes first: the planner looks for a
split in fp32 alone, then with fp32-lean allowed, then with int8, and keeps the first that
fits, so a faster int8 stage never displaces an fp32 plan that fits. A range that fits in no
allowed mode is infeasible on that device. Within one set of allowed modes the mode is a
function of (device, range) alone, so the stage's time is too:

    stage time   = MODE_TABLE[mode].compute_factor * flops[i:j] / (gflops * 1e9)
                   + cut_bytes[j] / (bandwidth_mbps * 1e6 / 8)
    stage memory = see edge.planning.memory.stage_memory_mb (weights, peak live
                   activations, and the bytes the stage receives and sends: cut_bytes[i]
                   + cut_bytes[j])

The last stage's transfer is the model's outputs going back to the coordinator
(``cut_bytes[n]``). int8 can be vetoed on node ranges (``int8_vetoed``: where quantizing
costs too much accuracy, ``edge.shards.accuracy``): on a vetoed range, and on every range
holding one, a stage may take only the other modes.

A decoder planned for generation (``edge.planning.generation``) adds three things, read
from optional cost arrays: each stage's memory holds its layers' KV caches at the plan's
context and sequences (``kv_bytes``, in the plan's KV dtype whatever the stage's mode); no
cut falls inside a layer's cache (``cut_ok``: the cache stays on one stage); and the stage
time is that of one decode step (``decode_flops``, ``decode_cut_bytes``), so the objective
is the decode period, the slowest stage's time per generated token. The prefill's time is recorded beside it.

Exact for contiguous splits under that per-stage rule: two dynamic
programs over (device, end position), each vectorised over the start position. The first
finds the optimal bottleneck B*; the second minimises total latency subject to every stage
taking <= B*. (A single lexicographic DP is not exact: a prefix with a worse bottleneck but
lower latency can win once a later, slower stage dominates the bottleneck.)
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Collection, Iterator, Optional, Protocol, Sequence

import numpy as np

from edge.errors import NoFitError, PlanError
from edge.planning import memory
from edge.planning.plan import Device, StagePrediction
from edge.spec import MODE_TABLE, MODES, quantized_modes

__all__ = [
    "StageCosts",
    "CostArrays",
    "Split",
    "partition",
    "brute_force",
    "evaluate",
    "stage_mode",
    "int8_vetoed_on",
]

log = logging.getLogger(__name__)

# Relative slack when comparing a stage time to the optimal bottleneck in the second pass,
# so float rounding in a different summation order never makes the optimum infeasible.
_REL_TOL = 1e-12

# A stage's compute time in a mode is MODE_TABLE[mode].compute_factor times fp32's
# (edge.spec).


class StageCosts(Protocol):
    """What the planner needs to know about a graph (GraphCosts satisfies it).

    Optional, read with getattr: ``init_table_uses`` (per initializer, the positions of
    ``init_uses`` where it is only a Gather table; default none), ``init_int8_bytes``
    (per initializer, bytes once quantized; default ``init_bytes``) and
    ``prepack_bytes`` / ``prepack_int8_bytes`` (per node, the weight a MatMul or Gemm
    prepacks at load; default none).
    """

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
    init_table_uses: tuple[np.ndarray, ...] = ()
    init_int8_bytes: Optional[np.ndarray] = None
    prepack_bytes: Optional[np.ndarray] = None
    prepack_int8_bytes: Optional[np.ndarray] = None


@dataclass(frozen=True)
class Split:
    """The planner's answer: per device, a ``[start, end)`` node range, a mode and a
    prediction (in that mode)."""

    ranges: tuple[tuple[int, int], ...]
    predictions: tuple[StagePrediction, ...]
    bottleneck_ms: float
    latency_ms: float
    modes: tuple[str, ...] = ()


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


# Weight channels: bytes read whole and bytes of Gather tables, at fp32 and at int8 sizes.
_W32, _T32, _W8, _T8 = range(4)


def _weight_items(costs: StageCosts) -> tuple[np.ndarray, list[np.ndarray]]:
    """Each initializer as up to two items, with (4,) sizes over the channels and uses.

    An initializer's table uses (only a Gather's input 0) and its other uses are separate
    items: a range holding only table uses pays the table cost, one holding other uses
    pays the whole cost (plus the table cost when it holds both: a tied embedding).
    """
    sizes = np.asarray(costs.init_bytes, dtype=np.float64)
    int8 = getattr(costs, "init_int8_bytes", None)
    int8 = sizes if int8 is None else np.asarray(int8, dtype=np.float64)
    tables = getattr(costs, "init_table_uses", ()) or ()
    rows, uses = [], []
    for k, u in enumerate(costs.init_uses):
        u = np.unique(np.asarray(u, dtype=np.int64))
        t = np.unique(np.asarray(tables[k], dtype=np.int64)) if k < len(tables) else u[:0]
        whole = np.setdiff1d(u, t)
        if len(whole):
            rows.append((sizes[k], 0.0, int8[k], 0.0))
            uses.append(whole)
        if len(t):
            rows.append((0.0, sizes[k], 0.0, int8[k]))
            uses.append(t)
    return np.array(rows, dtype=np.float64).reshape(-1, 4), uses


def _weights_brute(costs: StageCosts, i: int, j: int) -> np.ndarray:
    """(4,) channel bytes of nodes ``[i, j)``, by a direct scan."""
    sizes, uses = _weight_items(costs)
    out = np.zeros(4)
    for row, u in zip(sizes, uses):
        if np.any((u >= i) & (u < j)):
            out += row
    return out


def _mode_weights(w, mode: str):
    """(bytes read whole, bytes of Gather tables) in ``mode``'s representation, from the
    4 channels of ``w`` (first axis)."""
    return (w[_W8], w[_T8]) if MODE_TABLE[mode].quantized else (w[_W32], w[_T32])


def _mode_memory(w, a, io, floor, mode: str, pk=(0.0, 0.0), kv=0.0):
    """Stage memory in ``mode`` from channel bytes ``w`` (first axis: the 4 channels), peak
    live activations ``a``, bytes received plus sent ``io``, the largest prepacked
    weight ``pk`` (fp32 bytes, int8 bytes) and the KV caches ``kv`` (bytes as stored,
    the same in every mode: only weights are quantized)."""
    whole, table = _mode_weights(w, mode)
    return memory.stage_memory_mb(whole, a, floor, table_bytes=table, mode=mode, io_bytes=io,
                                  prepack_bytes=pk[1] if MODE_TABLE[mode].quantized else pk[0]
                                  ) + kv / memory.MiB


# A decoder served with KV caches (optional, read with getattr like the prepack arrays):
# ``kv_bytes`` (n,) per node, the bytes of the caches it writes at the plan's context and
# sequences; ``cut_ok`` (n + 1,) False where a cut would split a layer's cache from its
# layer; ``decode_flops`` (n,) and ``decode_cut_bytes`` (n + 1,) the costs of one decode
# step. With the decode arrays, the objective is the decode step's period (the slowest
# stage's per-token time), since generating is that step repeated; the prefill's time
# is still recorded (``StagePrediction.time_ms``).
def _kv_range(costs: StageCosts, i: int, j: int) -> float:
    kv = getattr(costs, "kv_bytes", None)
    return 0.0 if kv is None else float(np.sum(kv[i:j], dtype=np.float64))


def _time_arrays(costs: StageCosts) -> tuple[np.ndarray, np.ndarray]:
    """(flops, cut bytes) the objective's stage times are computed from."""
    f = getattr(costs, "decode_flops", None)
    c = getattr(costs, "decode_cut_bytes", None)
    if f is None or c is None:
        return np.asarray(costs.flops, dtype=np.float64), np.asarray(costs.cut_bytes,
                                                                     dtype=np.float64)
    return np.asarray(f, dtype=np.float64), np.asarray(c, dtype=np.float64)


def _cut_ok(costs: StageCosts, n: int) -> np.ndarray:
    ok = getattr(costs, "cut_ok", None)
    return np.ones(n + 1, dtype=bool) if ok is None else np.asarray(ok, dtype=bool)


def _prepack(costs: StageCosts) -> tuple[np.ndarray, np.ndarray]:
    """(n,) arrays: per node, the bytes of the weight it prepacks, fp32 and int8 (zeros for
    costs that do not say: ``prepack_bytes``, ``prepack_int8_bytes``)."""
    n = len(costs.flops)
    p32 = getattr(costs, "prepack_bytes", None)
    p32 = np.zeros(n) if p32 is None else np.asarray(p32, dtype=np.float64)
    p8 = getattr(costs, "prepack_int8_bytes", None)
    return p32, (p32 if p8 is None else np.asarray(p8, dtype=np.float64))


def _prepack_range(costs: StageCosts, i: int, j: int) -> tuple[float, float]:
    p32, p8 = _prepack(costs)
    return float(p32[i:j].max(initial=0.0)), float(p8[i:j].max(initial=0.0))


def _io_bytes(costs: StageCosts, i: int, j: int) -> float:
    """Bytes a stage of nodes ``[i, j)`` receives and sends per request."""
    return float(costs.cut_bytes[i]) + float(costs.cut_bytes[j])


# A range holding a vetoed one is vetoed too: quantizing more nodes adds quantization noise
# on top, so it is assumed to keep no better accuracy. That errs towards fp32, and lets a
# vector per end position say which starts are vetoed.
def _veto_reach(vetoed: Collection[tuple[int, int]], n: int) -> np.ndarray:
    """(n + 1,) array: ``reach[j]`` is the largest start ``a`` of a vetoed range
    ``[a, b)`` with ``b <= j`` (-1 if none), so int8 is vetoed on ``[i, j)`` iff
    ``i <= reach[j]``."""
    reach = np.full(n + 1, -1, dtype=np.int64)
    for a, b in vetoed:
        a, b = int(a), int(b)
        if not 0 <= a < b <= n:
            raise PlanError(f"int8_vetoed: expected ranges [a, b) with 0 <= a < b <= {n}, "
                            f"got [{a}, {b})")
        reach[b] = max(reach[b], a)
    return np.maximum.accumulate(reach)


def int8_vetoed_on(vetoed: Collection[tuple[int, int]], i: int, j: int) -> bool:
    """Whether int8 is vetoed on nodes ``[i, j)``: it holds a range of ``vetoed``."""
    return any(i <= a and b <= j for a, b in vetoed)


def _range_modes(modes: Sequence[str], i: int, j: int,
                 vetoed: Collection[tuple[int, int]]) -> tuple[str, ...]:
    """``modes`` allowed on nodes ``[i, j)``: without int8 where it is vetoed."""
    if quantized_modes(modes) and int8_vetoed_on(vetoed, i, j):
        return tuple(m for m in modes if not MODE_TABLE[m].quantized)
    return tuple(modes)


def stage_mode(costs: StageCosts, dev: Device, i: int, j: int,
               modes: Sequence[str] = MODES) -> str | None:
    """The first of ``modes`` in which nodes ``[i, j)`` fit ``dev``'s memory, or None."""
    w = _weights_brute(costs, i, j)
    a = float(np.max(costs.live_bytes[i:j]))
    io = _io_bytes(costs, i, j)
    pk = _prepack_range(costs, i, j)
    kv = _kv_range(costs, i, j)
    for mode in modes:
        if _mode_memory(w, a, io, dev.runtime_floor_mb, mode, pk, kv) <= dev.memory_mb:
            return mode
    return None


def _frugal_mode(costs: StageCosts, dev: Device, i: int, j: int,
                 modes: Sequence[str] = MODES) -> str:
    w = _weights_brute(costs, i, j)
    a = float(np.max(costs.live_bytes[i:j]))
    io = _io_bytes(costs, i, j)
    pk = _prepack_range(costs, i, j)
    kv = _kv_range(costs, i, j)
    return min(modes, key=lambda m: _mode_memory(w, a, io, dev.runtime_floor_mb, m, pk, kv))


def evaluate(costs: StageCosts, dev: Device, i: int, j: int,
             mode: str | None = None) -> StagePrediction:
    """Predicted memory and time of nodes ``[i, j)`` on ``dev`` (scalar, direct formulas).

    Args:
        costs: the graph's cost arrays.
        dev: the device running the stage.
        i, j: the node range, ``0 <= i < j <= n``.
        mode: the stage's mode; None for the one the planner would choose
            (``stage_mode``), or the most frugal one when none fits.
    """
    if mode is None:
        mode = stage_mode(costs, dev, i, j) or _frugal_mode(costs, dev, i, j)
    c = MODE_TABLE[mode].memory
    w = _weights_brute(costs, i, j)
    whole, table = _mode_weights(w, mode)
    a = float(np.max(costs.live_bytes[i:j]))
    f = float(np.sum(costs.flops[i:j], dtype=np.float64))
    cm = MODE_TABLE[mode].compute_factor * _compute_ms(f, dev)
    t = _transfer_ms(float(costs.cut_bytes[j]), dev)
    io = _io_bytes(costs, i, j)
    kv = _kv_range(costs, i, j)
    mem = float(_mode_memory(w, a, io, dev.runtime_floor_mb, mode,
                             _prepack_range(costs, i, j), kv))
    weights_mb = (c.weight_factor * whole + c.table_factor * table) / memory.MiB
    kept = kv * getattr(costs, "kv_stored_fraction", 1.0)
    # A decode batch's transient copies of the caches count as activations.
    act_mb = (c.activation_factor * a + c.io_factor * io + kv - kept) / memory.MiB
    decode_ms = 0.0
    if getattr(costs, "decode_flops", None) is not None:
        df, dc = _time_arrays(costs)
        decode_ms = (MODE_TABLE[mode].compute_factor * _compute_ms(float(np.sum(df[i:j])), dev)
                     + _transfer_ms(float(dc[j]), dev))
    return StagePrediction(
        weights_mb=weights_mb, activations_mb=act_mb,
        runtime_floor_mb=mem - weights_mb - act_mb - kept / memory.MiB,
        memory_mb=mem, gflops=f / 1e9, compute_ms=cm, transfer_ms=t, time_ms=cm + t,
        kv_cache_mb=kept / memory.MiB, decode_ms=decode_ms)


def _weight_sweep(costs: StageCosts, n: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (j, w) for j = 1..n, ``w[c, i]`` = unique bytes of channel c in ``[i, j)``.

    An item is in ``[i, j)`` iff its last use before ``j`` is ``>= i``: keep, per position,
    the bytes whose last use so far is there, then reverse-cumsum. O(n) per j.
    """
    sizes, uses = _weight_items(costs)
    events: list[list[int]] = [[] for _ in range(n)]
    for k, u in enumerate(uses):
        for p in u:
            if not 0 <= p < n:
                raise PlanError(f"initializer used at node {int(p)}, outside [0, {n})")
            events[int(p)].append(k)
    last = np.full(len(sizes), -1, dtype=np.int64)
    at = np.zeros((4, n), dtype=np.float64)
    for j in range(1, n + 1):
        p = j - 1
        for k in events[p]:
            if last[k] >= 0:
                at[:, last[k]] -= sizes[k]
            at[:, p] += sizes[k]
            last[k] = p
        yield j, np.cumsum(at[:, :j][:, ::-1], axis=1)[:, ::-1]


@dataclass
class _Vectors:
    """For one end position j, per start i < j and device: the stage's time in the mode
    the rule picks (inf when no mode fits), and its memory in the most frugal mode."""

    time: np.ndarray     # (D, j) ms
    frugal: np.ndarray   # (D, j) MiB


def _sweep(costs: StageCosts, devices: Sequence[Device], n: int,
           modes: Sequence[str], vetoed: Collection[tuple[int, int]] = ()
           ) -> Iterator[tuple[int, _Vectors]]:
    tflops, tcut = _time_arrays(costs)
    pf = np.concatenate([[0.0], np.cumsum(tflops)])
    kvb = getattr(costs, "kv_bytes", None)
    pkv = np.concatenate([[0.0], np.cumsum(np.zeros(n) if kvb is None
                                           else np.asarray(kvb, dtype=np.float64))])
    live = np.asarray(costs.live_bytes, dtype=np.float64)
    cut = np.asarray(costs.cut_bytes, dtype=np.float64)
    floor = np.array([d.runtime_floor_mb for d in devices])[:, None]
    has = np.array([d.memory_mb for d in devices])[:, None]
    rate = np.array([d.gflops * 1e9 for d in devices])[:, None]
    bw = np.array([d.bandwidth_mbps * 1e6 / 8.0 for d in devices])[:, None]
    reach = _veto_reach(vetoed, n)
    p32, p8 = _prepack(costs)
    for j, w in _weight_sweep(costs, n):
        act = np.maximum.accumulate(live[:j][::-1])[::-1][None, :]
        pk = (np.maximum.accumulate(p32[:j][::-1])[::-1][None, :],
              np.maximum.accumulate(p8[:j][::-1])[::-1][None, :])
        io = (cut[:j] + cut[j])[None, :]
        compute = (pf[j] - pf[:j])[None, :] / rate * 1e3
        send = tcut[j] / bw * 1e3
        kv = (pkv[j] - pkv[:j])[None, :]
        time = np.full((len(devices), j), np.inf)
        frugal = np.full((len(devices), j), np.inf)
        chosen = np.zeros((len(devices), j), dtype=bool)
        for mode in modes:
            mem = _mode_memory(w[:, None, :], act, io, floor, mode, pk, kv)
            if MODE_TABLE[mode].quantized and reach[j] >= 0:  # vetoed starts: int8 fits nowhere
                mem = np.where(np.arange(j)[None, :] <= reach[j], np.inf, mem)
            take = (mem <= has) & ~chosen
            time = np.where(take, MODE_TABLE[mode].compute_factor * compute + send, time)
            chosen |= take
            frugal = np.minimum(frugal, mem)
        yield j, _Vectors(time=time, frugal=frugal)


# --------------------------------------------------------------------------- dynamic programs


def _dp(costs: StageCosts, devices: Sequence[Device], n: int, mode: str,
        modes: Sequence[str], limit: float = np.inf,
        vetoed: Collection[tuple[int, int]] = ()
        ) -> tuple[float, list[tuple[int, int]] | None]:
    """One DP over (device, end). Returns (optimal value, ranges) or (inf, None).

    mode:
        "bottleneck": min over fitting splits of max stage time.
        "latency": min over fitting splits with every stage time <= limit of total time.
        "overshoot": min over all splits of max (frugal stage memory - device memory).
        "memory": min over all splits of max frugal stage memory.
    A stage fits when some mode fits; its time is that of the first mode that fits.
    int8 is not a mode of a range that ``vetoed`` vetoes (``int8_vetoed_on``).
    """
    D = len(devices)
    has = np.array([d.memory_mb for d in devices])
    best = np.full((D, n + 1), np.inf)
    arg = np.full((D, n + 1), -1, dtype=np.int64)
    cap = limit * (1 + _REL_TOL) + 1e-300 if np.isfinite(limit) else np.inf
    ok = _cut_ok(costs, n)
    for j, v in _sweep(costs, devices, n, modes, vetoed):
        for d in range(D):
            # Device d's stage ends at j, starts at i; devices before it need >= d nodes, and
            # the ones after it need >= D - 1 - d.
            if j < d + 1 or j > n - (D - 1 - d):
                continue
            if d == 0:
                prev = np.full(j, np.inf)
                prev[0] = 0.0
            else:
                prev = np.where(ok[:j], best[d - 1, :j], np.inf)  # no cut inside a cache
            if mode in ("bottleneck", "latency"):
                stage = v.time[d]
                fits = np.isfinite(stage)
                if mode == "latency":
                    fits &= stage <= cap
                    cand = np.where(fits, prev + stage, np.inf)
                else:
                    cand = np.where(fits, np.maximum(prev, stage), np.inf)
            elif mode == "overshoot":
                cand = np.maximum(prev, v.frugal[d] - has[d])
            elif mode == "memory":
                cand = np.maximum(prev, v.frugal[d])
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


def _check_inputs(costs: StageCosts, devices: Sequence[Device],
                  modes: Sequence[str] = MODES) -> int:
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
    if not modes or any(m not in MODES for m in modes):
        raise PlanError(f"modes: expected a non-empty subset of {MODES}, got {tuple(modes)}")
    return n


def _make_split(costs: StageCosts, devices: Sequence[Device],
                ranges: Sequence[tuple[int, int]], modes: Sequence[str],
                vetoed: Collection[tuple[int, int]] = ()) -> Split:
    chosen = tuple(stage_mode(costs, dev, i, j, _range_modes(modes, i, j, vetoed))
                   for dev, (i, j) in zip(devices, ranges))
    if None in chosen:  # cannot happen: the DP only returns fitting stages
        raise PlanError("planner returned a stage that fits in no mode; please report this")
    preds = tuple(evaluate(costs, dev, i, j, m)
                  for dev, (i, j), m in zip(devices, ranges, chosen))
    return Split(ranges=tuple((int(i), int(j)) for i, j in ranges), predictions=preds,
                 bottleneck_ms=max(_objective_ms(costs, p) for p in preds),
                 latency_ms=sum(_objective_ms(costs, p) for p in preds), modes=chosen)


def _objective_ms(costs: StageCosts, p: StagePrediction) -> float:
    """The stage time the planner minimises: per decode step for a decoder with decode
    costs, else per request."""
    return p.decode_ms if getattr(costs, "decode_flops", None) is not None else p.time_ms


def _no_fit(costs: StageCosts, devices: Sequence[Device],
            closest: Sequence[tuple[int, int]] | None, min_memory_mb: float,
            modes: Sequence[str], vetoed: Collection[tuple[int, int]] = ()) -> NoFitError:
    if closest is None:  # only when int8 is the only mode and is vetoed on every split
        msg = (f"no split of the model's {len(costs.flops)} nodes over {len(devices)} "
               "devices fits: int8, the only mode allowed, is rejected for accuracy on a "
               "stage of every split; allow fp32 or add devices")
        return NoFitError(msg, needs={}, has={d.name: d.memory_mb for d in devices},
                          min_memory_mb=float("inf"))
    needs, has, lines = {}, {}, []
    for dev, (i, j) in zip(devices, closest):
        mode = _frugal_mode(costs, dev, i, j, _range_modes(modes, i, j, vetoed))
        p = evaluate(costs, dev, i, j, mode)
        needs[dev.name] = p.memory_mb
        has[dev.name] = dev.memory_mb
        verdict = "OVER" if p.memory_mb > dev.memory_mb else "ok"
        rejected = ("; int8 rejected for accuracy" if quantized_modes(modes)
                    and not MODE_TABLE[mode].quantized
                    and int8_vetoed_on(vetoed, i, j) else "")
        lines.append(
            f"  {dev.name}: needs {p.memory_mb:.0f} MiB, has {dev.memory_mb:.0f} MiB "
            f"[{verdict}] (nodes [{i}, {j}) in {mode}: weights {p.weights_mb:.0f} + "
            f"activations {p.activations_mb:.0f} + runtime {p.runtime_floor_mb:.0f} MiB"
            + (f" + KV cache {p.kv_cache_mb:.0f} MiB" if p.kv_cache_mb else "")
            + f"{rejected})")
    msg = (f"no split of the model's {len(costs.flops)} nodes over {len(devices)} devices "
           f"fits in memory, even in the most frugal mode ({', '.join(modes)} tried); the "
           "closest split (smallest worst overshoot) needs:\n"
           + "\n".join(lines)
           + f"\nevery device would need at least {min_memory_mb:.0f} MiB (the smallest "
           "memory that, given to every device in this order, lets some split fit); "
           "or add devices")
    return NoFitError(msg, needs=needs, has=has, min_memory_mb=min_memory_mb)


def partition(costs: StageCosts, devices: Sequence[Device],
              modes: Sequence[str] = MODES,
              int8_vetoed: Collection[tuple[int, int]] = ()) -> Split:
    """Split nodes ``[0, n)`` into one contiguous, non-empty range per device, in order.

    Args:
        costs: per-node / per-cut cost arrays (a GraphCosts or a CostArrays).
        devices: the pipeline's devices, in pipeline order (standbys excluded).
        modes: the modes a stage may take, in order of preference (default all of
            ``MODES``: fp32, then fp32-lean, then int8).
        int8_vetoed: node ranges ``(start, end)`` where int8 is rejected (it costs too
            much accuracy); a stage over one of them, or over a range holding one, takes
            only the other modes.

    Returns:
        The split whose slowest stage is fastest among those that fit every device's
        memory, each stage in the first mode that fits it; ties broken on total latency.

    Raises:
        NoFitError: no split fits even in the most frugal mode; says what each device
            would need and the smallest per-device memory that would make one fit.
        PlanError: more devices than nodes, or malformed inputs.
    """
    modes = tuple(modes)
    n = _check_inputs(costs, devices, modes)
    vetoed = tuple((int(a), int(b)) for a, b in int8_vetoed)
    # Precision first: a lower-precision mode is allowed only when no split fits without it.
    for k in range(1, len(modes) + 1):
        allowed = modes[:k]
        bottleneck, _ = _dp(costs, devices, n, "bottleneck", allowed, vetoed=vetoed)
        if np.isfinite(bottleneck):
            break
    else:
        _, closest = _dp(costs, devices, n, "overshoot", modes, vetoed=vetoed)
        min_mem, _ = _dp(costs, devices, n, "memory", modes, vetoed=vetoed)
        err = _no_fit(costs, devices, closest, min_mem, modes, vetoed)
        log.info("%s", err)
        raise err
    _, ranges = _dp(costs, devices, n, "latency", allowed, limit=bottleneck, vetoed=vetoed)
    if ranges is None:  # cannot happen unless rounding is pathological
        raise PlanError("planner failed to recover the optimal split; please report this")
    split = _make_split(costs, devices, ranges, allowed, vetoed)
    _log_split(costs, devices, split, modes, vetoed)
    return split


def _log_split(costs: StageCosts, devices: Sequence[Device], split: Split,
               modes: Sequence[str], vetoed: Collection[tuple[int, int]] = ()) -> None:
    n = len(costs.flops)
    total = float(np.sum(costs.flops))
    for k, (dev, (i, j), p, mode) in enumerate(zip(devices, split.ranges, split.predictions,
                                                  split.modes)):
        why = []
        if p.time_ms >= split.bottleneck_ms * (1 - 1e-9):
            why.append("bottleneck stage")
        if mode != modes[0]:
            why.append(f"{mode}: does not fit in {', '.join(modes[:modes.index(mode)])}")
        if quantized_modes(modes) and int8_vetoed_on(vetoed, i, j):
            why.append("int8 rejected for accuracy")
        if j < n and stage_mode(costs, dev, i, j + 1,
                                _range_modes(modes, i, j + 1, vetoed)) is None:
            why.append("memory-bound: one more node would not fit")
        if p.transfer_ms > p.compute_ms:
            why.append(f"link-bound: sending {costs.cut_bytes[j] / 1e6:.2f} MB costs more "
                       "than computing")
        log.info(
            "stage %d on %s (%.1f GFLOP/s, %.0f MiB, %.0f Mbit/s): nodes [%d, %d) = %.0f%% of "
            "the flops in %s; %.1f ms compute + %.1f ms send = %.1f ms; memory %.0f of %.0f "
            "MiB (weights %.0f + activations %.0f + runtime %.0f)%s",
            k, dev.name, dev.gflops, dev.memory_mb, dev.bandwidth_mbps, i, j,
            100.0 * p.gflops * 1e9 / total if total else 0.0, mode, p.compute_ms,
            p.transfer_ms, p.time_ms, p.memory_mb, dev.memory_mb, p.weights_mb,
            p.activations_mb, p.runtime_floor_mb, f"; {'; '.join(why)}" if why else "")
    log.info("pipeline period %.1f ms (slowest stage), latency %.1f ms",
             split.bottleneck_ms, split.latency_ms)


# --------------------------------------------------------------------------- brute force


def brute_force(costs: StageCosts, devices: Sequence[Device],
                modes: Sequence[str] = MODES,
                int8_vetoed: Collection[tuple[int, int]] = ()) -> Split:
    """Same contract as ``partition``, by enumerating every cut combination.

    Exponential: for tests on small inputs only. Uses the scalar ``stage_mode`` and
    ``evaluate``, which share no code with the DP's vectorised sweep but the memory formula.

    Args:
        costs: per-node / per-cut cost arrays.
        devices: the pipeline's devices, in order.
        modes: as for ``partition``.
        int8_vetoed: as for ``partition`` (checked per range with ``int8_vetoed_on``).
    """
    modes = tuple(modes)
    _check_inputs(costs, devices, modes)
    for k in range(1, len(modes)):
        try:
            return _brute(costs, devices, modes[:k], int8_vetoed)
        except NoFitError:
            pass
    return _brute(costs, devices, modes, int8_vetoed)


def _brute(costs: StageCosts, devices: Sequence[Device], modes: Sequence[str],
           vetoed: Collection[tuple[int, int]] = ()) -> Split:
    n = _check_inputs(costs, devices, modes)
    D = len(devices)
    best_key, best_ranges = None, None
    min_mem, closest, closest_over = np.inf, None, np.inf
    ok = _cut_ok(costs, n)
    for cuts in itertools.combinations(range(1, n), D - 1):
        if not all(ok[c] for c in cuts):
            continue
        bounds = (0, *cuts, n)
        ranges = list(zip(bounds[:-1], bounds[1:]))
        frugal = [min((evaluate(costs, dev, i, j, m).memory_mb
                       for m in _range_modes(modes, i, j, vetoed)), default=np.inf)
                  for dev, (i, j) in zip(devices, ranges)]
        worst_mem = max(frugal)
        over = max(f - dev.memory_mb for f, dev in zip(frugal, devices))
        min_mem = min(min_mem, worst_mem)
        if over < closest_over:
            closest_over, closest = over, ranges
        chosen = [stage_mode(costs, dev, i, j, _range_modes(modes, i, j, vetoed))
                  for dev, (i, j) in zip(devices, ranges)]
        if None in chosen:
            continue
        preds = [evaluate(costs, dev, i, j, m) for dev, (i, j), m in zip(devices, ranges, chosen)]
        key = (max(_objective_ms(costs, p) for p in preds),
               sum(_objective_ms(costs, p) for p in preds))
        if best_key is None or key[0] < best_key[0] * (1 - 1e-12) or (
                key[0] <= best_key[0] * (1 + 1e-12) and key[1] < best_key[1]):
            best_key, best_ranges = key, ranges
    if best_ranges is None:
        raise _no_fit(costs, devices, closest if np.isfinite(closest_over) else None,
                      float(min_mem), modes, vetoed)
    return _make_split(costs, devices, best_ranges, modes, vetoed)
