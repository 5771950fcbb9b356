"""Planner's memory prediction against measured worker peak RSS, per stage, for real
pipelines: each model is planned, deployed on loopback `edge worker` processes, driven
with requests, and profiled through the coordinator exactly as `edge profile` does.

Usage:
    python benchmarks/memory_accuracy.py --models bert-base:4 gpt2-small:4 unet-small:3 \
        --requests 20 --json results/memory_accuracy.json
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import sys
import tempfile
from pathlib import Path


def run_one(kind: str, size: str, devices: int, profile: str, requests: int, work: Path,
            memory_mb: float | None = None, sequence: int = 128) -> dict:
    from edge.coordinator.pipeline import Pipeline
    from edge.coordinator.server import start_coordinator
    from edge.export import example_inputs, export_model
    from edge.build import make_plan
    from edge.planning.cluster import cluster_from_profile
    from edge.coordinator.live_profile import collect
    from edge.profiling.report import summarize
    from edge.worker.launch import LocalWorkers

    model = export_model(kind, size=size, seed=0, out=work / f"{kind}-{size}.onnx")
    if kind == "unet":
        bindings = {"batch": 1, "height": sequence, "width": sequence}
        x = example_inputs(kind, size, batch=1, seq=sequence)
    else:
        bindings = {"batch": 1, "sequence": sequence}
        x = example_inputs(kind, size, batch=1, seq=sequence)
    with LocalWorkers(devices, work / f"workers-{kind}", device=profile) as workers:
        cluster = cluster_from_profile(profile, devices, addresses=workers.addresses)
        if memory_mb:
            import dataclasses

            cluster = dataclasses.replace(cluster, devices=tuple(
                dataclasses.replace(d, memory_mb=memory_mb) for d in cluster.devices))
        build = work / f"build-{kind}"
        plan = make_plan(model, cluster.devices, build, bindings=bindings)
        with Pipeline(plan, build) as pipeline:
            pipeline.start()
            server, port = start_coordinator(pipeline, "127.0.0.1:0")
            try:
                report = collect(f"127.0.0.1:{port}", requests=requests, concurrency=2, inputs=x)
            finally:
                server.stop(0)
    rows = summarize(report)
    return dict(model=f"{kind}-{size}", devices=devices, profile=profile, bindings=bindings,
                modes=[getattr(s, "mode", "fp32") for s in plan.stages],
                errors=report["errors"], stages=rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["bert-base:4", "gpt2-small:4", "unet-small:3"],
                    help="KIND-SIZE:DEVICES")
    ap.add_argument("--profile", default="rpi4b-2gb")
    ap.add_argument("--memory-mb", type=float, help="override every device's memory budget")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edge-memacc-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # GBs of shards
    results = []
    for item in args.models:
        name, _, n = item.partition(":")
        kind, _, size = name.partition("-")
        res = run_one(kind, size, int(n or 4), args.profile, args.requests, work, args.memory_mb)
        results.append(res)
        print(f"\n{res['model']} over {res['devices']} ({res['profile']}), modes {res['modes']}")
        print(f"{'stage':>5} {'planned':>9} {'measured':>9} {'error':>7}")
        for r in res["stages"]:
            print(f"{r['stage']:>5} {r['planned_mb']:>9.1f} {r['measured_peak_mb']:>9.1f} "
                  f"{r['error_pct']:>+6.1f}%")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
