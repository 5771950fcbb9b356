"""`edge profile --coordinator`: every worker's memory samples, gathered under load."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from edge.coordinator.pipeline import Pipeline
from edge.coordinator.server import start_coordinator
from edge.build import make_plan
from edge.planning.cluster import cluster_from_profile
from edge.worker.launch import LocalWorkers


def profile_live(pipeline, out, *args: str):
    """`edge profile --coordinator` against ``pipeline`` served on a loopback port: the
    finished process, and the report.json it wrote to ``out`` (checked to exit 0)."""
    server, port = start_coordinator(pipeline, "127.0.0.1:0")
    try:
        r = subprocess.run([sys.executable, "-m", "edge", "profile", "--coordinator",
                            f"127.0.0.1:{port}", *args, "--out", str(out)],
                           capture_output=True, text=True, timeout=120,
                           env={**os.environ, "COLUMNS": "240"})
    finally:
        server.stop(0)
    assert r.returncode == 0, r.stdout + r.stderr
    return r, json.loads((out / "report.json").read_text())


def test_live_profile_has_samples_from_every_worker(bert_tiny, tmp_path):
    with LocalWorkers(3, tmp_path / "w", device="rpi4b-2gb", threads=1) as workers:
        cluster = cluster_from_profile("rpi4b-2gb", 3, addresses=workers.addresses)
        plan = make_plan(bert_tiny, cluster.devices, tmp_path / "build",
                         bindings={"batch": 1, "sequence": 32})
        with Pipeline(plan, tmp_path / "build") as pipeline:
            pipeline.start()
            r, report = profile_live(pipeline, tmp_path / "report", "--requests", "12")
    assert report["errors"] == 0 and report["requests"] == 12
    assert [d["stage"] for d in report["devices"]] == [0, 1, 2]
    for device in report["devices"]:
        assert len(device["samples"]) >= 2, device["device"]
        peak = max(s["peak_mb"] for s in device["samples"])
        assert peak >= device["rss_at_load_mb"] > 20
        assert device["samples"][-1]["requests_done"] == 12
    rows = (tmp_path / "report" / "samples.csv").read_text().splitlines()
    assert len(rows) - 1 == sum(len(d["samples"]) for d in report["devices"])
    png = (tmp_path / "report" / "memory.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    for device in report["devices"]:
        assert device["device"] in r.stdout


def test_live_profile_of_a_generation_plan_shows_kv_caches(tmp_path):
    """A decoder planned for generation: the load is short generations, and each device's
    KV caches (from the worker's status while they run) stand beside the plan's."""
    from edge.export.decoder import export_llama
    from edge.planning.generation import GenerationRequest

    llama = export_llama("tiny", seed=0, out=tmp_path / "llama" / "model.onnx")
    with LocalWorkers(2, tmp_path / "w", threads=1) as workers:
        cluster = cluster_from_profile("rpi4b-2gb", 2, addresses=workers.addresses)
        plan = make_plan(llama, cluster.devices, tmp_path / "build", modes=("fp32",),
                         generation=GenerationRequest(context=64, sequences=2, prefill=16))
        with Pipeline(plan, tmp_path / "build") as pipeline:
            pipeline.start()
            r, report = profile_live(pipeline, tmp_path / "report", "--requests", "4",
                                     "--concurrency", "2")
    assert report["errors"] == 0 and report["requests"] == 4
    planned = {s.index: s.predicted.kv_cache_mb for s in plan.stages}
    for device in report["devices"]:
        assert device["planned_kv_mb"] == planned[device["stage"]]
    holding = [d for d in report["devices"] if d["planned_kv_mb"] > 0]
    assert holding and all(d["kv_cache_mb"] > 0 and d["sequences"] >= 1 for d in holding)
    assert "KV MiB measured / planned" in r.stdout
