"""Live report rendering on a synthetic report: summary math, CSV rows, the PNG."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from rich.console import Console

from edge.profiling.report import TOLERANCE_PCT, render_live, summarize, write_live

T0 = 1763900000.0


def _samples(n: int, base: float, peak: float, dt: float = 0.5, offset: float = 0.0) -> list:
    out = []
    for k in range(n):
        rss = base + (peak - base) * (k / (n - 1))
        out.append({"time": T0 + offset + k * dt, "rss_mb": rss, "anon_mb": rss * 0.7,
                    "file_mb": rss * 0.3, "peak_mb": rss, "heap_mb": rss * 0.5,
                    "cpu_percent": 50.0 + k, "requests_done": k, "queue_depth": k % 3})
    return out


def _report() -> dict:
    return {
        "model": "bert-base", "plan_id": "ab12cd34ef56", "requests": 50, "errors": 0,
        "latency_ms": {"mean": 120.0, "p50": 110.0, "p95": 180.0}, "throughput_rps": 8.3,
        "devices": [
            # budget far above usage: annotated, not drawn
            {"stage": 0, "device": "pi-1", "address": "127.0.0.1:5001",
             "profile": "rpi4b-2gb", "shard": "shards/stage-0.onnx", "planned_mb": 357.0,
             "budget_mb": 1550.0, "rss_at_load_mb": 300.0,
             "samples": _samples(12, 290.0, 340.0)},
            # planned under-estimates by more than the tolerance; budget close to usage
            {"stage": 1, "device": "pi-2", "address": "127.0.0.1:5002",
             "profile": "rpi4b-1gb", "shard": "shards/stage-1.onnx", "planned_mb": 200.0,
             "budget_mb": 310.0, "rss_at_load_mb": 260.0,
             "samples": _samples(8, 240.0, 250.0, offset=0.2)},
            # peak reached at load, before any sample; no anon/file split
            {"stage": 2, "device": "pi-3", "address": "127.0.0.1:5003",
             "profile": "rpi4b-2gb", "shard": "shards/stage-2.onnx", "planned_mb": 150.0,
             "budget_mb": 1550.0, "rss_at_load_mb": 180.0,
             "samples": [{"time": T0 + 1 + k, "rss_mb": 170.0, "peak_mb": 175.0,
                          "cpu_percent": None} for k in range(5)]},
        ],
    }


def test_summary_math():
    rows = summarize(_report())
    assert [r["stage"] for r in rows] == [0, 1, 2]
    r0, r1, r2 = rows
    assert r0["measured_peak_mb"] == pytest.approx(340.0)
    assert r0["error_pct"] == pytest.approx((357.0 - 340.0) / 340.0 * 100)
    assert r0["headroom_mb"] == pytest.approx(1550.0 - 340.0)
    assert r0["within_tolerance"] is True
    assert r0["peak_anon_mb"] == pytest.approx(340.0 * 0.7)
    assert r0["cpu_percent_mean"] == pytest.approx(np.mean([50.0 + k for k in range(12)]))
    # the load peak (260) beats every sample (<= 250)
    assert r1["measured_peak_mb"] == pytest.approx(260.0)
    assert r1["error_pct"] == pytest.approx((200.0 - 260.0) / 260.0 * 100)
    assert abs(r1["error_pct"]) > TOLERANCE_PCT and r1["within_tolerance"] is False
    assert r1["headroom_mb"] == pytest.approx(50.0)
    assert r2["measured_peak_mb"] == pytest.approx(180.0)
    assert r2["peak_anon_mb"] is None and r2["cpu_percent_mean"] is None


def test_summary_without_samples_or_plan():
    rows = summarize({"devices": [{"stage": 0, "device": "d", "samples": []}]})
    assert rows[0]["measured_peak_mb"] is None and rows[0]["error_pct"] is None
    assert rows[0]["within_tolerance"] is None


def test_render_live_prints_every_device():
    buf = io.StringIO()
    render_live(_report(), Console(file=buf, width=160, color_system=None))
    text = buf.getvalue()
    for name in ("pi-1", "pi-2", "pi-3", "stage-1.onnx", "+5.0", "-23.1"):
        assert name in text


def test_write_live(tmp_path):
    report = _report()
    paths = write_live(report, tmp_path / "out")
    assert set(paths) == {"json", "csv", "png"}

    doc = json.loads(paths["json"].read_text())
    assert doc["model"] == "bert-base" and len(doc["summary"]) == 3
    assert doc["summary"][1]["within_tolerance"] is False

    with open(paths["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(len(d["samples"]) for d in report["devices"])
    assert min(float(r["t_s"]) for r in rows) == 0.0
    first_pi2 = next(r for r in rows if r["device"] == "pi-2")
    assert float(first_pi2["t_s"]) == pytest.approx(0.2)
    assert next(r for r in rows if r["device"] == "pi-3")["anon_mb"] == ""

    data = paths["png"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg

    img = mpimg.imread(paths["png"])
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 300


def test_write_live_no_devices(tmp_path):
    paths = write_live({"model": "m", "devices": []}, tmp_path)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths["csv"].read_text().count("\n") == 1  # the header only


def test_render_live_shows_kv_caches_for_a_generation_plan():
    report = _report()
    for dev, (planned, measured, seqs) in zip(report["devices"],
                                              [(11.2, 0.35, 1), (11.2, 0.35, 1), (0.0, 0.0, 0)]):
        dev.update(planned_kv_mb=planned, kv_cache_mb=measured, sequences=seqs)
    rows = summarize(report)
    assert [(r["planned_kv_mb"], r["kv_cache_mb"], r["sequences"]) for r in rows] == \
        [(11.2, 0.35, 1), (11.2, 0.35, 1), (0.0, 0.0, 0)]
    buf = io.StringIO()
    render_live(report, Console(file=buf, width=220, color_system=None))
    text = buf.getvalue()
    assert "KV MiB measured / planned" in text
    assert text.count("0.35 (1 seq) / 11.2") == 2 and "0.00 (0 seq) / 0.0" in text


def test_render_live_has_no_kv_column_for_other_plans():
    buf = io.StringIO()
    render_live(_report(), Console(file=buf, width=220, color_system=None))
    assert "KV MiB" not in buf.getvalue()
