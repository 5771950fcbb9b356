"""A pipeline timeline: one Gantt row per stage, one bar per request and stage.

Each worker reports, per request, when it arrived on the worker's clock
(``StageTiming.received_unix_ns``) and how long it queued, computed and took to encode and
hand on: :func:`from_timestamps` draws that exactly when the workers share a clock (on
loopback and in ``edge lab``). For workers that do not report arrival times,
:func:`reconstruct` places the durations between the bench's own send and receive times,
spreading the unreported time (network hops, the coordinator's decode) evenly over each
request's hops; :func:`overlap_ms` measures how close that is (one stage computes one
request at a time, so any overlap of its compute bars is reconstruction error).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from edge.profiling.report import matplotlib_agg

__all__ = ["Bar", "from_timestamps", "reconstruct", "overlap_ms", "render", "NEEDED_FOR_EXACT"]

NEEDED_FOR_EXACT = (
    "StageTiming carries durations only (queue_ms, compute_ms, send_ms). For exact bars "
    "each worker would add absolute times of the same request: received, compute start, "
    "compute end, handed to the next hop (e.g. fixed64 received_unix_ns = 5, "
    "compute_start_unix_ns = 6, compute_end_unix_ns = 7, sent_unix_ns = 8 from "
    "time.time_ns(), set in edge/worker/engine.py where queue_ms/compute_ms/send_ms are "
    "measured). On loopback all workers share one clock; across boards the coordinator "
    "would also need each worker's clock offset (e.g. from a timed GetStatus round trip).")


@dataclass(frozen=True)
class Bar:
    """One segment of one request on one stage, in ms since the first request started.

    Attributes:
        request: request number, in order of submission.
        stage: the stage.
        kind: ``queue`` (received, waiting for compute), ``compute`` or ``send``
            (encoding the outputs and handing them on).
        start_ms, end_ms: the segment.
    """

    request: int
    stage: int
    kind: str
    start_ms: float
    end_ms: float


def from_timestamps(records: Sequence) -> list[Bar] | None:
    """Exact bars from the workers' own clocks: each stage reports when the request arrived
    (``StageTiming.received_unix_ns``) and how long it queued, computed and sent.

    All workers must share one clock (true on loopback and in ``edge lab``; across boards
    their offsets would have to be measured first). Returns None when any timing lacks
    its timestamp (an older worker): use :func:`reconstruct` then.
    """
    if not records or any(not r.received_ns or 0 in r.received_ns
                          or len(r.received_ns) != len(r.timings) for r in records):
        return None
    order = sorted(records, key=lambda r: min(r.received_ns))
    origin = min(order[0].received_ns)
    bars: list[Bar] = []
    for i, r in enumerate(order):
        for (stage, q, c, s), ns in zip(r.timings, r.received_ns):
            t = (ns - origin) / 1e6
            bars.append(Bar(i, stage, "queue", t, t + q))
            bars.append(Bar(i, stage, "compute", t + q, t + q + c))
            bars.append(Bar(i, stage, "send", t + q + c, t + q + c + s))
    return bars


def reconstruct(records: Sequence, num_stages: int) -> list[Bar]:
    """Bars from the bench's request records (``edge.bench.measure.RequestRecord``).

    Args:
        records: requests with ``start_s``, ``end_s`` (one clock) and ``timings``
            ``(stage, queue_ms, compute_ms, send_ms)`` per stage.
        num_stages: stages of the pipeline.
    """
    if not records:
        return []
    order = sorted(records, key=lambda r: r.start_s)
    t_origin = order[0].start_s
    bars: list[Bar] = []
    for i, r in enumerate(order):
        timings = sorted(r.timings)
        busy = sum(q + c + s for _, q, c, s in timings)
        total = (r.end_s - r.start_s) * 1e3
        # Coordinator -> stage 0, each stage -> the next, last stage -> coordinator.
        gap = max(0.0, total - busy) / (num_stages + 1)
        t = (r.start_s - t_origin) * 1e3 + gap
        for stage, q, c, s in timings:
            bars.append(Bar(i, stage, "queue", t, t + q))
            bars.append(Bar(i, stage, "compute", t + q, t + q + c))
            bars.append(Bar(i, stage, "send", t + q + c, t + q + c + s))
            t += q + c + s + gap
    return bars


def overlap_ms(bars: Sequence[Bar]) -> float:
    """The largest overlap between two compute bars of one stage: 0 for a consistent
    reconstruction (a stage computes one request at a time)."""
    worst = 0.0
    by_stage: dict[int, list[Bar]] = {}
    for b in bars:
        if b.kind == "compute":
            by_stage.setdefault(b.stage, []).append(b)
    for stage_bars in by_stage.values():
        stage_bars.sort(key=lambda b: b.start_ms)
        for a, b in zip(stage_bars, stage_bars[1:]):
            worst = max(worst, a.end_ms - b.start_ms)
    return max(0.0, worst)


def render(bars: Sequence[Bar], num_stages: int, path: str | Path, title: str,
           note: str = "") -> Path:
    """Draw the timeline to a PNG.

    Args:
        bars: ``reconstruct`` output.
        num_stages: rows.
        path: the ``.png`` to write.
        title: the chart's title.
        note: a line under the chart (how the bars were obtained).

    Returns:
        ``path``.
    """
    Figure, FigureCanvasAgg = matplotlib_agg(path)
    from matplotlib.patches import Patch  # optional extra: matplotlib_agg checked it is there

    # A bare Figure on an Agg canvas, not pyplot: no display and no global state.
    fig = Figure(figsize=(12, 1.6 + 0.75 * num_stages), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    requests = sorted({b.request for b in bars})
    colors = [_color(i) for i in range(max(requests, default=0) + 1)]
    for b in bars:
        y = num_stages - 1 - b.stage  # stage 0 on top
        width = b.end_ms - b.start_ms
        if b.kind == "compute":
            ax.broken_barh([(b.start_ms, width)], (y - 0.36, 0.72),
                           facecolors=colors[b.request], edgecolors="black", linewidth=0.4)
            if width > 0:
                ax.text(b.start_ms + width / 2, y, str(b.request), ha="center",
                        va="center", fontsize=6, clip_on=True)
        elif b.kind == "queue":
            # Under the row, not over it: a request waits while another one computes.
            ax.broken_barh([(b.start_ms, width)], (y - 0.48, 0.1), facecolors="#969696")
        else:
            ax.broken_barh([(b.start_ms, width)], (y - 0.36, 0.72), facecolors="black")
    ax.set_yticks(range(num_stages), [f"stage {num_stages - 1 - k}" for k in range(num_stages)])
    ax.set_ylim(-0.6, num_stages - 0.5)
    ax.set_xlabel("ms since the first request was sent")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(handles=[Patch(facecolor=_color(0), edgecolor="black",
                             label="compute (number: request)"),
                       Patch(facecolor="#969696", label="queued (under the row)"),
                       Patch(facecolor="black", label="encode + hand on")],
              loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8, ncols=3,
              frameon=False)
    ax.set_title(title, fontsize=10, loc="left")
    if note:
        fig.supxlabel(note, fontsize=7, x=0.01, ha="left")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _color(i: int):
    from matplotlib import colormaps  # optional extra, loaded only to draw

    return colormaps["tab20"](i % 20)
