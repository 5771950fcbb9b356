"""Live memory report: planned against measured memory per device, as a table, a JSON
file, a CSV time series and a plot.

The input is a plain dict (built from the workers' gRPC replies by
:func:`edge.coordinator.live_profile.collect`)::

    {"model": "bert-base", "plan_id": "ab12...", "requests": 50, "errors": 0,
     "latency_ms": {"mean": .., "p50": .., "p95": ..}, "throughput_rps": ..,
     "devices": [{"stage": 0, "device": "pi-1", "address": "127.0.0.1:5001",
                  "profile": "rpi4b-2gb", "shard": "shards/stage-0.onnx",
                  "planned_mb": 357.0, "budget_mb": 1550.0, "rss_at_load_mb": 300.1,
                  "samples": [{"time": 1763900000.1, "rss_mb": .., "anon_mb": ..,
                               "file_mb": .., "peak_mb": .., "heap_mb": ..,
                               "cpu_percent": .., "requests_done": ..,
                               "queue_depth": ..}, ...],
                  "planned_kv_mb": 0.0, "kv_cache_mb": 0.0, "sequences": 0}]}

The last three are a plan for generation's (absent or 0 for other plans): the KV caches
the plan holds room for, the largest the worker reported while generations ran, and the
sequences it then held.

Sample fields other than ``time`` may be missing or None (a worker on a kernel without
``RssAnon`` reports no split); every function here tolerates that.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Mapping

from edge._extras import missing_package

__all__ = [
    "TOLERANCE_PCT",
    "SAMPLE_FIELDS",
    "summarize",
    "render_live",
    "write_live",
    "plot_memory",
]

# The memory model (edge/planning/memory.py) is fitted to within -4%..+14%; a device
# outside +-15% means the model, not noise, is wrong for it.
TOLERANCE_PCT = 15.0

SAMPLE_FIELDS = ("rss_mb", "anon_mb", "file_mb", "peak_mb", "heap_mb", "cpu_percent",
                 "requests_done", "queue_depth")

# A budget line further than this above the highest value shown would squash the usage
# curve into the bottom of the plot; it is annotated instead.
_BUDGET_SHOWN_RATIO = 1.5



def matplotlib_agg(path) -> tuple:
    """matplotlib's ``Figure`` and ``FigureCanvasAgg`` (a bare figure on an Agg canvas, not
    pyplot: no display, no global state), or a MissingPackageError naming the pip command."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise (missing_package(e.name or "matplotlib", f"drawing {path}")
               or e) from None
    return Figure, FigureCanvasAgg

def _num(x: Any) -> float | None:
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _samples(dev: Mapping) -> list[dict]:
    """The device's samples sorted by time (workers may reply out of order)."""
    return sorted((s for s in dev.get("samples") or [] if _num(s.get("time")) is not None),
                  key=lambda s: float(s["time"]))


def _t0(report: Mapping) -> float | None:
    times = [float(s["time"]) for d in report.get("devices") or [] for s in _samples(d)]
    return min(times) if times else None


def summarize(report: Mapping) -> list[dict]:
    """Planned against measured memory for each device.

    Args:
        report: the live report dict (see module docstring).

    Returns:
        One dict per device, in stage order, with ``stage``, ``device``, ``address``,
        ``profile``, ``shard``, ``planned_mb``, ``budget_mb``, ``rss_at_load_mb``,
        ``samples`` (how many), ``measured_peak_mb`` (max of the samples' ``peak_mb``, and
        of their ``rss_mb`` when a peak is missing, at least ``rss_at_load_mb``),
        ``error_pct`` ((planned - measured) / measured * 100; positive means the plan
        over-estimated), ``headroom_mb`` (budget - measured peak),
        ``within_tolerance`` (``|error_pct| <= TOLERANCE_PCT``), ``peak_anon_mb`` and
        ``peak_file_mb`` (the split at the sample with the highest RSS),
        ``cpu_percent_mean``, and for a plan for generation ``planned_kv_mb``,
        ``kv_cache_mb`` and ``sequences``. Values that cannot be computed are None.
    """
    out = []
    for dev in sorted(report.get("devices") or [], key=lambda d: d.get("stage", 0)):
        samples = _samples(dev)
        peaks = [v for v in (_num(s.get("peak_mb")) for s in samples) if v is not None]
        peaks += [v for v in (_num(s.get("rss_mb")) for s in samples) if v is not None]
        load = _num(dev.get("rss_at_load_mb"))
        if load is not None:
            peaks.append(load)
        measured = max(peaks) if peaks else None
        planned = _num(dev.get("planned_mb"))
        budget = _num(dev.get("budget_mb"))
        error = (None if planned is None or not measured
                 else (planned - measured) / measured * 100.0)
        top = max((s for s in samples if _num(s.get("rss_mb")) is not None),
                  key=lambda s: float(s["rss_mb"]), default=None)
        cpus = [v for v in (_num(s.get("cpu_percent")) for s in samples) if v is not None]
        out.append({
            "stage": dev.get("stage"),
            "device": dev.get("device"),
            "address": dev.get("address"),
            "profile": dev.get("profile"),
            "shard": dev.get("shard"),
            "planned_mb": planned,
            "budget_mb": budget,
            "rss_at_load_mb": load,
            "samples": len(samples),
            "measured_peak_mb": measured,
            "error_pct": error,
            "headroom_mb": None if budget is None or measured is None else budget - measured,
            "within_tolerance": None if error is None else abs(error) <= TOLERANCE_PCT,
            "peak_anon_mb": _num(top.get("anon_mb")) if top else None,
            "peak_file_mb": _num(top.get("file_mb")) if top else None,
            "cpu_percent_mean": sum(cpus) / len(cpus) if cpus else None,
            "planned_kv_mb": _num(dev.get("planned_kv_mb")),
            "kv_cache_mb": _num(dev.get("kv_cache_mb")),
            "sequences": dev.get("sequences"),
        })
    return out


def _f(v: float | None, fmt: str = "{:.1f}") -> str:
    return "—" if v is None else fmt.format(v)


def render_live(report: Mapping, console) -> None:
    """Print the per-device planned-vs-measured table and the request statistics.

    Errors outside ±TOLERANCE_PCT are red when the plan under-estimated (the device may
    run out of memory) and yellow when it over-estimated (memory left unused); negative
    headroom is red.

    Args:
        report: the live report dict (see module docstring).
        console: a ``rich.console.Console``.
    """
    from rich.table import Table

    lat = report.get("latency_ms") or {}
    plan = str(report.get("plan_id") or "")[:12]
    t = Table(title=f"{report.get('model', 'model')} (plan {plan or '?'}): "
                    f"{report.get('requests', 0)} requests, {report.get('errors', 0)} errors; "
                    f"latency p50 {_f(_num(lat.get('p50')))} ms, "
                    f"p95 {_f(_num(lat.get('p95')))} ms; "
                    f"{_f(_num(report.get('throughput_rps')), '{:.2f}')} req/s",
              title_justify="left",
              caption=f"error % = (planned − measured) / measured; "
                      f"tolerance ±{TOLERANCE_PCT:g}%",
              caption_justify="left")
    t.add_column("stage", justify="right")
    t.add_column("device")
    t.add_column("shard")
    t.add_column("planned MiB", justify="right")
    t.add_column("measured peak MiB", justify="right")
    t.add_column("error %", justify="right")
    t.add_column("headroom MiB", justify="right")
    t.add_column("anon / file MiB", justify="right")
    t.add_column("CPU % mean", justify="right")
    rows = summarize(report)
    # A plan for generation: each device's KV caches, measured while generations ran.
    kv = any((row["planned_kv_mb"] or 0) > 0 for row in rows)
    if kv:
        t.add_column("KV MiB measured / planned", justify="right")
    for row in rows:
        err = row["error_pct"]
        if err is None or row["within_tolerance"]:
            err_s = _f(err, "{:+.1f}")
            if err is not None:
                err_s = f"[green]{err_s}[/]"
        else:
            err_s = f"[{'red' if err < 0 else 'yellow'}]{err:+.1f}[/]"
        head = row["headroom_mb"]
        head_s = _f(head, "{:.0f}")
        if head is not None and head < 0:
            head_s = f"[red]{head_s}[/]"
        split = ("—" if row["peak_anon_mb"] is None and row["peak_file_mb"] is None
                 else f"{_f(row['peak_anon_mb'], '{:.0f}')} / "
                      f"{_f(row['peak_file_mb'], '{:.0f}')}")
        cells = [str(row["stage"]), str(row["device"]), Path(str(row["shard"] or "—")).name,
                 _f(row["planned_mb"]), _f(row["measured_peak_mb"]), err_s, head_s, split,
                 _f(row["cpu_percent_mean"], "{:.0f}")]
        if kv:
            cells.append(f"{_f(row['kv_cache_mb'], '{:.2f}')} ({row['sequences'] or 0} seq) "
                         f"/ {_f(row['planned_kv_mb'], '{:.1f}')}")
        t.add_row(*cells)
    console.print(t)


def _write_csv(report: Mapping, path: Path) -> None:
    t0 = _t0(report)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["stage", "device", "t_s", "time", *SAMPLE_FIELDS])
        for dev in sorted(report.get("devices") or [], key=lambda d: d.get("stage", 0)):
            for s in _samples(dev):
                # Relative to the first sample of any device: the workers' clocks are the
                # coordinator's on loopback and NTP-synced on a LAN, so rows line up.
                w.writerow([dev.get("stage"), dev.get("device"),
                            f"{float(s['time']) - t0:.3f}", f"{float(s['time']):.3f}",
                            *("" if s.get(k) is None else s.get(k) for k in SAMPLE_FIELDS)])


def plot_memory(report: Mapping, path: str | Path) -> Path:
    """Plot RSS over time per device (one subplot each, shared time axis) to a PNG.

    Each subplot shows the anon/file split as a light stacked area, RSS as a line, the
    planned peak dotted, the budget dashed when it is within 1.5x of the highest value
    shown (otherwise an annotation at the top says where it is), and the measured peak
    as a marker; the subplot's title gives the numbers.

    Args:
        report: the live report dict (see module docstring).
        path: the ``.png`` to write.

    Returns:
        ``path``.
    """
    Figure, FigureCanvasAgg = matplotlib_agg(path)

    devices = sorted(report.get("devices") or [], key=lambda d: d.get("stage", 0))
    summary = summarize(report)
    t0 = _t0(report) or 0.0
    n = max(len(devices), 1)
    # A bare Figure on an Agg canvas, not pyplot: no display, no global state, and the
    # caller's backend is left alone.
    fig = Figure(figsize=(10, 1.2 + 2.3 * n), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    handles: dict[str, Any] = {}

    for ax, dev, row in zip(axes, devices, summary):
        _plot_device(ax, dev, row, t0, handles)
    if not devices:
        axes[0].text(0.5, 0.5, "no devices", ha="center", va="center",
                     transform=axes[0].transAxes)
    axes[-1].set_xlabel("time since first sample (s)")
    _legend_and_title(fig, report, handles)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def _plot_device(ax: Any, dev: Mapping, row: Mapping, t0: float,
                 handles: dict[str, Any]) -> None:
    """One device's subplot: anon/file areas, RSS, planned and measured peaks, budget.

    The first artist of each kind goes into ``handles``, for the figure's one legend.
    """
    samples = _samples(dev)
    ts = [float(s["time"]) - t0 for s in samples]
    rss = [_num(s.get("rss_mb")) for s in samples]
    anon = [_num(s.get("anon_mb")) for s in samples]
    file_ = [_num(s.get("file_mb")) for s in samples]
    shown = [v for v in rss if v is not None]
    if samples and all(v is not None for v in anon + file_):
        areas = ax.stackplot(ts, anon, file_, colors=["#c6dbef", "#fdd0a2"], alpha=0.8,
                             labels=["anonymous", "file-backed"])
        handles.setdefault("anonymous", areas[0])
        handles.setdefault("file-backed", areas[1])
    if shown:
        (line,) = ax.plot(ts, [v if v is not None else float("nan") for v in rss],
                          color="#08306b", lw=1.8, label="RSS")
        handles.setdefault("RSS", line)
    planned, budget = row["planned_mb"], row["budget_mb"]
    measured = row["measured_peak_mb"]
    if planned is not None:
        shown.append(planned)
        hl = ax.axhline(planned, color="black", ls=":", lw=1.4, label="planned peak")
        handles.setdefault("planned peak", hl)
    if measured is not None:
        shown.append(measured)
        tx = _peak_time(ts, samples, rss, measured)
        mk = ax.plot([tx], [measured], marker="v", ms=9, color="crimson", ls="none",
                     label="measured peak")[0]
        handles.setdefault("measured peak", mk)
    top = max(shown) if shown else 1.0
    if budget is not None and budget <= _BUDGET_SHOWN_RATIO * top:
        bl = ax.axhline(budget, color="firebrick", ls="--", lw=1.4, label="budget")
        handles.setdefault("budget", bl)
        top = max(top, budget)
    elif budget is not None:
        ax.text(0.995, 0.97, f"budget {budget:.0f} MiB ↑", transform=ax.transAxes,
                ha="right", va="top", fontsize=8, color="firebrick")
    ax.set_ylim(0, top * 1.18)
    ax.set_title(_device_title(row), fontsize=9, loc="left")
    ax.set_ylabel("MiB")
    ax.grid(True, alpha=0.3)


def _peak_time(ts: list[float], samples: list, rss: list, measured: float) -> float:
    """When the measured peak happened: the first sample that reached it.

    A peak reached before sampling started (the load) is drawn at the first sample.
    """
    peak_ts = [t for t, s in zip(ts, samples)
               if _num(s.get("peak_mb")) is not None
               and float(s["peak_mb"]) >= measured - 1e-9] or [
        t for t, v in zip(ts, rss) if v is not None and v >= measured - 1e-9]
    return peak_ts[0] if peak_ts else (ts[0] if ts else 0.0)


def _device_title(row: Mapping) -> str:
    """A subplot's title: stage, device, shard, planned and measured peaks, the error."""
    planned, measured, err = row["planned_mb"], row["measured_peak_mb"], row["error_pct"]
    nums = f"planned {_f(planned, '{:.0f}')}, peak {_f(measured, '{:.0f}')} MiB"
    if err is not None:
        nums += f", error {err:+.1f}%" + ("" if row["within_tolerance"] else " (!)")
    return (f"stage {row['stage']}: {row['device']} ({row['profile'] or '?'}), "
            f"{Path(str(row['shard'] or '')).name}: {nums}")


def _legend_and_title(fig: Any, report: Mapping, handles: dict[str, Any]) -> None:
    """One legend below the subplots, in a fixed order, and the figure's title."""
    order = [h for h in ("RSS", "anonymous", "file-backed", "planned peak", "measured peak",
                         "budget") if h in handles]
    if order:
        fig.legend([handles[h] for h in order], order, loc="outside lower center",
                   ncols=len(order), fontsize=8, frameon=False)
    fig.suptitle(f"{report.get('model', 'model')}: memory per device "
                 f"({report.get('requests', 0)} requests)", x=0.01, ha="left",
                 fontsize=11)


def write_live(report: Mapping, out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``samples.csv`` and ``memory.png`` into ``out_dir``.

    ``report.json`` is the input plus ``"summary"`` (:func:`summarize`); ``samples.csv``
    has one row per device per sample, with ``t_s`` in seconds since the first sample of
    any device.

    Args:
        report: the live report dict (see module docstring).
        out_dir: directory, created if missing.

    Returns:
        ``{"json": ..., "csv": ..., "png": ...}`` paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "csv": out / "samples.csv",
             "png": out / "memory.png"}
    doc = dict(report)
    doc["summary"] = summarize(report)
    paths["json"].write_text(json.dumps(doc, indent=2, default=str) + "\n")
    _write_csv(report, paths["csv"])
    plot_memory(report, paths["png"])
    return paths
