"""`edge bench` results as files: ``bench.json`` (everything), ``bench.md`` (tables for
people and for BENCHMARKS.md) and ``scaling.png``. ``timeline.png`` is drawn by the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from edge._extras import missing_package

__all__ = ["summary_rows", "markdown", "plot_scaling", "write_results"]

_COLUMNS = ("comparison", "edge", "baseline", "ratio / value", "target", "met")


def _met(flag) -> str:
    return "—" if flag is None else ("yes" if flag else "**no**")


def _mib(v) -> str:
    """A peak in MiB; None was not measured (a worker's status failed), never 0."""
    return "not measured" if v is None else f"{v:.0f}"


def _rss_row(b: Mapping) -> tuple[str, ...]:
    name = "b. peak RSS per device ÷ torch's (worst stage)"
    target = f"≤ {b['targets']['peak_rss_ratio_max']:g}×"
    torch = f"{max(s['torch_peak_rss_mib'] for s in b['stages']):.0f} MiB max"
    missing = b.get("rss_not_measured") or [s["stage"] for s in b["stages"]
                                            if s["edge_peak_rss_mib"] is None]
    if missing:
        # Not measured is a failed check, with the reason, never a ratio of 0.
        return (name, "not measured", torch,
                f"stage(s) {', '.join(map(str, missing))}: worker status failed", target,
                _met(False))
    return (name, f"{max(s['edge_peak_rss_mib'] for s in b['stages']):.0f} MiB max", torch,
            f"{b['peak_rss_ratio_max']:.2f}×", target, _met(b["met_rss"]))


def _lab_rows(a: Mapping, n: int) -> list[tuple[str, ...]]:
    lab = a.get("lab") or {}
    name = "a. throughput, {} stages ÷ one device, measured in the emulated lab"
    if lab.get("status") != "measured":
        return [(name.format(n), "not measured", "", lab.get("reason", ""),
                 f"≥ {a['target_ratio']:g}×", "—")]
    one, rows = lab["one_device"], []
    where = f"coordinator on {lab['coordinator_device']}"
    if lab.get("requests", "").startswith("direct"):
        where += ", requests from a direct client"
    for k, p in lab["pipelines"].items():
        met = (a.get("met_lab") or {}).get(k, {})
        rows += [
            (f"{name.format(k)} (steady state, {where}, CPU quotas of the profile)",
             f"{p['rps']:.3f} req/s", f"{one['rps']:.3f} req/s", f"{p['speedup']:.2f}×",
             f"≥ {met.get('target', a['target_ratio']):g}×", _met(met.get("speedup"))),
            (f"a. coordinator CPU per request ÷ one stage's compute, {k} stages, lab",
             f"{p['coordinator_cpu_ms_per_request']:.2f} ms", "",
             f"{p['coordinator_cpu_share_of_stage']:.1%}", "≤ 5%",
             _met(met.get("coordinator_cpu"))),
            (f"a. latency, one request at a time, {k} stages ÷ one device, lab",
             f"{p['latency_ms']:.0f} ms", f"{one['latency_ms']:.0f} ms",
             f"{p['latency_ratio']:.2f}×", "≤ 1.1×", _met(met.get("latency")))]
    return rows


def summary_rows(r: Mapping) -> list[tuple[str, ...]]:
    """The targets table: one row per compared figure, in ``_COLUMNS`` order."""
    a, b, c = r["a_one_device"], r["b_torch"], r["c_hop"]
    n = a["pipeline"]["devices"]
    one, pipe = a["one_device"], a["pipeline"]
    rows = [
        (f"a. throughput, {n} stages ÷ one device, measured on loopback",
         f"{pipe['throughput_rps']:.2f} req/s", f"{one['throughput_rps']:.2f} req/s",
         f"{a['measured_throughput_ratio']:.2f}×", f"≥ {a['target_ratio']:g}×",
         _met(a["met_measured"])),
        *_lab_rows(a, n),
        (f"a. throughput, {n} stages ÷ one device, *modelled* for {r['profile']['name']}",
         f"{pipe['modelled']['throughput_rps']:.2f} req/s",
         f"{one['modelled']['throughput_rps']:.2f} req/s",
         f"{a['modelled_throughput_ratio']:.2f}×", f"≥ {a['target_ratio']:g}×",
         _met(a["met_modelled"])),
        ("a. latency, one request at a time (median)",
         f"{pipe['latency_ms']['median']:.1f} ms", f"{one['latency_ms']['median']:.1f} ms",
         f"{pipe['latency_ms']['median'] / one['latency_ms']['median']:.2f}×", "—", "—"),
        _rss_row(b),
        (f"b. throughput ÷ torch's ({b['torch_microbatches']} microbatches)",
         f"{b['edge_throughput_rps']:.2f} req/s", f"{b['torch_throughput_rps']:.2f} req/s",
         f"{b['throughput_ratio']:.2f}×", f"≥ {b['targets']['throughput_ratio']:g}×",
         _met(b["met_throughput"])),
        ("b. latency ÷ torch's (median)", f"{b['edge_latency_ms']['median']:.1f} ms",
         f"{b['torch_latency_ms']['median']:.1f} ms",
         f"{b['edge_latency_ms']['median'] / b['torch_latency_ms']['median']:.2f}×", "—", "—"),
        ("b. max \\|edge − torch\\| over the outputs", "", "",
         f"{b['max_abs_diff_vs_edge']:.1e}", "≤ 1e-4",
         _met(b["max_abs_diff_vs_edge"] <= 1e-4)),
        (f"c. one hop, {c['activation_bytes'] // 1024} KiB, loopback (median)",
         f"{c['loopback']['hop_ms']['median']:.2f} ms", "", "", "—", "—"),
    ]
    g = c["gige"]
    if g.get("status") == "measured":
        rows.append((f"c. one hop, {c['activation_bytes'] // 1024} KiB, gigabit shaped by "
                     "edge.lab (median)", f"{g['hop_ms']['median']:.2f} ms",
                     f"wire alone {c['wire_ms_at_940_mbps']:.1f} ms", "",
                     f"≤ {c['target_gige_ms']:g} ms", _met(c["met_gige"])))
    else:
        rows.append(("c. one hop on a gigabit link", "not measured", "", g.get("reason", ""),
                     f"≤ {c['target_gige_ms']:g} ms", "—"))
    return rows


def _table(header: tuple[str, ...], rows) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return out


def markdown(r: Mapping) -> str:
    """The results as Markdown: targets, then one section per comparison."""
    lines = [*_md_header(r), *_md_one_device(r), *_md_torch(r), *_md_hop(r),
             *_md_scaling_and_timeline(r)]
    return "\n".join(lines)


def _md_header(r: Mapping) -> list[str]:
    """The title, the machine, how the run measured, and the summary table."""
    m = r["machine"]
    n = r["a_one_device"]["pipeline"]["devices"]
    return [
        f"# edge bench: {r['model']} over {n} × {r['profile']['name']}",
        "",
        f"Command: `{r['command'] or 'edge bench'}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['system']}; "
        f"onnxruntime {m['onnxruntime']}, torch {m['torch']}; this host measured "
        f"{m['host_gflops']} GFLOP/s (fp32, all cores; median of "
        f"{', '.join(map(str, m['host_gflops_per_round']))}, one per round). Batch 1, "
        f"sequence {r['sequence']}, "
        f"{r['config']['requests']} requests per measurement, {r['config']['rounds']} "
        "round(s); in each round latency is measured request by request across every "
        "configuration in turn, then throughput in one block each, in an order that "
        f"rotates every round. Run took {r.get('duration_s', 0):.0f} s.",
        "",
        "Everything below ran on this machine: workers and torch ranks on loopback share "
        "its cores. Figures marked *modelled* scale the stage times measured here to the "
        f"profile ({r['profile']['gflops']:g} GFLOP/s, {r['profile']['bandwidth_mbps']:g} "
        "Mbit/s); none was measured on a Pi.",
        "",
        *_table(_COLUMNS, summary_rows(r)),
        "",
    ]


def _md_one_device(r: Mapping) -> list[str]:
    """Section a: one device against the pipeline, stage by stage."""
    a = r["a_one_device"]
    n = a["pipeline"]["devices"]
    return [
        f"## a. One device vs {n} stages",
        "",
        f"Baseline: {a['baseline']}, {a['one_device']['in_flight']} requests in flight. "
        f"Pipeline: {a['pipeline']['in_flight']} in flight. Modelled: {a['modelled_means']}",
        "",
        *_table(("stage", "holds", "mode", "compute ms (here)", "modelled stage ms",
                 "planned MiB", "peak RSS MiB"),
                [(s["stage"], s["holds"], s["mode"], f"{s['compute_ms']:.1f}",
                  f"{ms:.0f}", f"{s['planned_mib']:.0f}", _mib(s["peak_rss_mib"]))
                 for s, ms in zip(a["pipeline"]["stages"],
                                  a["pipeline"]["modelled"]["stage_ms"])]),
        "",
        f"One device: compute {a['one_device']['stages'][0]['compute_ms']:.1f} ms here, "
        f"modelled {a['one_device']['modelled']['period_ms']:.0f} ms per request on the "
        f"device; peak RSS {_mib(a['one_device']['stages'][0]['peak_rss_mib'])} MiB.",
        "",
    ]


def _md_torch(r: Mapping) -> list[str]:
    """Section b: edge against torch.distributed.pipelining."""
    a, b = r["a_one_device"], r["b_torch"]
    return [
        "## b. torch.distributed.pipelining",
        "",
        f"Peer: {b['peer']}. {b['split_note'].capitalize()}. Latency: one microbatch per "
        "step, from rank 0 starting to the last rank holding the outputs (edge's latency "
        "also includes the coordinator's two hops). Throughput: one GPipe step of "
        f"{b['torch_microbatches']} microbatches (edge: the same requests, "
        f"{a['pipeline']['in_flight']} in flight).",
        "",
        *_table(("stage", "edge holds", "torch holds", "edge peak MiB", "torch peak MiB",
                 "edge ÷ torch", "torch after imports MiB"),
                [(s["stage"], s["edge_holds"], s["holds"], _mib(s["edge_peak_rss_mib"]),
                  f"{s['torch_peak_rss_mib']:.0f}",
                  "—" if s["rss_ratio"] is None else f"{s['rss_ratio']:.2f}",
                  f"{s['torch_rss_after_imports_mib']:.0f}") for s in b["stages"]]),
        "",
    ]


def _md_hop(r: Mapping) -> list[str]:
    """Section c: the cost of one hop, on loopback and on a shaped link."""
    c = r["c_hop"]
    return [
        "## c. One hop",
        "",
        f"A {c['activation_bytes']:,}-byte float32 activation: a chain of Adds served "
        "whole by one worker and cut in two over two workers, requests alternating; hop = "
        "(2-stage latency − compute) − (1-stage latency − compute).",
        "",
        *_table(("link", "hop ms (median)", "p10", "p90", "1-stage ms", "2-stage ms",
                 "encode ms", "receive→compute ms"),
                [_hop_row(c[k]) for k in ("loopback", "gige")]),
        "",
    ]


def _md_scaling_and_timeline(r: Mapping) -> list[str]:
    """Sections d and e: speedup by device count, and the timeline figure."""
    d, e = r["d_scaling"], r["e_timeline"]
    n = r["a_one_device"]["pipeline"]["devices"]
    return [
        "## d. Scaling",
        "",
        *_table(("devices", "latency ms", "throughput req/s", "speedup", "modelled latency ms",
                 "modelled req/s", "modelled speedup"),
                [(p["devices"], f"{p['latency_ms']:.1f}", f"{p['throughput_rps']:.2f}",
                  f"{p['speedup']:.2f}×", f"{p['modelled_latency_ms']:.0f}",
                  f"{p['modelled_throughput_rps']:.3f}", f"{p['modelled_speedup']:.2f}×")
                 for p in d["points"]]),
        "",
        "![scaling](scaling.png)",
        "",
        "## e. Timeline",
        "",
        f"![timeline]({e['png']})",
        "",
        f"{e['requests']} requests through {n} stages, {e['source']}; the largest overlap "
        f"of two compute bars on one stage is {e['max_compute_overlap_ms']} ms (0 for an "
        f"exact timeline). {e['needed_for_exact']}",
        "",
    ]


def _hop_row(h: Mapping) -> tuple:
    if h.get("status", "measured") != "measured":
        return (h["link"], "not measured: " + h.get("reason", ""), "", "", "", "", "", "")
    link = h["link"] + (f" ({', '.join(f'{x:g}' for x in h['rate_mbps'])} Mbit/s, edge.lab)"
                        if "rate_mbps" in h else "")
    return (link, f"{h['hop_ms']['median']:.2f}", f"{h['hop_ms']['p10']:.2f}",
            f"{h['hop_ms']['p90']:.2f}", f"{h['one_stage_ms']['median']:.2f}",
            f"{h['two_stage_ms']['median']:.2f}", f"{h['encode_ms']['median']:.2f}",
            f"{h['receive_to_compute_ms']['median']:.2f}")


def plot_scaling(r: Mapping, path: str | Path) -> Path:
    """Throughput against device count, measured on loopback and modelled, to a PNG.

    Args:
        r: the results.
        path: the ``.png`` to write.
    """
    try:  # matplotlib: an optional extra, needed only to draw
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise (missing_package(e.name or "matplotlib", f"drawing {path}")
               or e) from None

    points = r["d_scaling"]["points"]
    xs = [p["devices"] for p in points]
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    left.plot(xs, [p["speedup"] for p in points], "o-", label="measured (loopback)")
    left.plot(xs, [p["modelled_speedup"] for p in points], "s--",
              label=f"modelled ({r['profile']['name']})")
    left.plot(xs, xs, ":", color="gray", label="linear")
    left.set_xlabel("devices")
    left.set_ylabel("throughput ÷ one device")
    left.legend(fontsize=8)
    right.plot(xs, [p["latency_ms"] for p in points], "o-", label="measured (loopback)")
    right.set_xlabel("devices")
    right.set_ylabel("latency ms (measured)")
    twin = right.twinx()
    twin.plot(xs, [p["modelled_latency_ms"] for p in points], "s--", color="tab:orange",
              label="modelled")
    twin.set_ylabel("latency ms (modelled)")
    for ax in (left, right, twin):
        ax.set_xticks(xs)
        top = max(y for line in ax.get_lines() for y in line.get_ydata())
        ax.set_ylim(0, top * 1.15)
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    right.legend(right.get_lines() + twin.get_lines(),
                 [ln.get_label() for ln in right.get_lines() + twin.get_lines()],
                 fontsize=8, loc="lower right")
    fig.suptitle(f"{r['model']}: scaling over {r['profile']['name']} devices", fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def write_results(r: Mapping, out_dir: Path) -> dict[str, Path]:
    """Write ``bench.json``, ``bench.md`` and ``scaling.png`` into ``out_dir``.

    Returns:
        Paths by kind (``json``, ``markdown``, ``scaling``, ``timeline``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "bench.json", "markdown": out_dir / "bench.md",
             "scaling": out_dir / "scaling.png",
             "timeline": out_dir / r["e_timeline"]["png"]}
    plot_scaling(r, paths["scaling"])
    paths["markdown"].write_text(markdown(r))
    files = {k: str(v) for k, v in paths.items()}
    paths["json"].write_text(json.dumps({**r, "files": files}, indent=2, default=_plain) + "\n")
    return paths


def _plain(x):
    """numpy scalars and the like, as JSON numbers."""
    try:
        return x.item()
    except AttributeError:
        raise TypeError(f"cannot write {type(x).__name__} to JSON") from None
