"""Failover on BERT: kill a worker mid-run and measure how long the pipeline takes to serve
again, and that every request still gets the unsharded model's answer.

Three runs over loopback workers, each with requests 4 in flight:
- ``replan``:  SIGKILL one of 4 workers; the model is re-planned over the 3 left;
               then the worker restarts on its cache and the original plan returns;
- ``standby``: SIGKILL one of 4 workers with a standby device in the cluster;
- ``hang``:    SIGSTOP one of 4 (no connection reset, as when a device is unplugged):
               only missed health checks tell.

Usage:
    python benchmarks/failover.py --size base --sequence 128 --json benchmarks/results/failover.json
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="base")
    ap.add_argument("--sequence", type=int, default=128)
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--kill-at", type=int, default=40)
    ap.add_argument("--profile", default="rpi4b-2gb")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()

    import onnxruntime as ort

    from edge.coordinator.pipeline import Pipeline
    from edge.export import example_inputs, export_model
    from edge.build import make_plan
    from edge.planning.cluster import cluster_from_profile
    from edge.profiling.memory import tune_malloc
    from edge.transport.codec import decode_tensors
    from edge.worker.launch import LocalWorkers, spawn_worker

    tune_malloc()
    work = Path(tempfile.mkdtemp(prefix="edge-failover-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # GBs of shards
    model = export_model("bert", size=args.size, seed=0, out=work / f"bert-{args.size}.onnx")
    pool = [example_inputs("bert", args.size, batch=1, seq=args.sequence, seed=i)
            for i in range(8)]
    full = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in full.get_outputs()]
    want = [dict(zip(names, full.run(None, x))) for x in pool]
    del full
    bindings = {"batch": 1, "sequence": args.sequence}

    def run(pipeline: Pipeline, act) -> dict:
        latencies, wrong = [], 0

        def one(i: int):
            if i == args.kill_at:
                act()
            t = time.perf_counter()
            r = pipeline.infer(pool[i % len(pool)])
            return i, r, (time.perf_counter() - t) * 1e3

        with ThreadPoolExecutor(4) as ex:
            results = list(ex.map(one, range(args.requests)))
        worst = 0.0
        for i, r, ms in results:
            got = decode_tensors(r.outputs)
            diff = max(float(np.max(np.abs(got[n] - want[i % len(pool)][n]))) for n in names)
            worst = max(worst, diff)
            wrong += diff > 1e-3
            latencies.append(ms)
        before = latencies[:args.kill_at]
        return dict(requests=len(results), wrong=wrong, max_abs_diff=worst,
                    median_ms_before=round(statistics.median(before), 1),
                    worst_ms=round(max(latencies), 1))

    def describe(r) -> dict:
        return dict(lost=list(r.lost), joined=list(r.joined), how=r.how,
                    devices=list(r.devices), noticed_s=round(r.noticed_s, 2),
                    recovery_s=round(r.seconds, 2),
                    uploaded_mib=round(r.uploaded_bytes / 2**20, 1), resent=r.resent,
                    text=r.describe())

    results = {}
    for scenario in ("replan", "standby", "hang"):
        count = 5 if scenario == "standby" else 4
        root = work / scenario
        with LocalWorkers(count, root / "w", device=args.profile) as workers:
            devices = list(cluster_from_profile(args.profile, count,
                                                addresses=workers.addresses).devices)
            standby = []
            if scenario == "standby":
                standby = [dataclasses.replace(devices.pop(), name="spare", standby=True)]
            plan = make_plan(model, devices, root / "build", bindings=bindings,
                             standby=standby)
            victim = workers.workers[2]
            with Pipeline(plan, root / "build") as pipeline:
                pipeline.start()
                for x in pool[:2]:
                    pipeline.infer(x)
                if scenario == "hang":
                    act = lambda: os.kill(victim.process.pid, signal.SIGSTOP)  # noqa: E731
                else:
                    act = lambda: victim.process.send_signal(signal.SIGKILL)  # noqa: E731
                try:
                    out = run(pipeline, act)
                finally:
                    if scenario == "hang":
                        os.kill(victim.process.pid, signal.SIGCONT)
                out["recoveries"] = [describe(r) for r in pipeline.recoveries]
                if scenario == "replan":
                    victim.process.wait()
                    t = time.monotonic()
                    workers.workers.append(spawn_worker(
                        root / "w", "again", device=args.profile, port=victim.port,
                        cache_dir=victim.cache_dir))
                    while len(pipeline.recoveries) < 2 and time.monotonic() < t + 120:
                        time.sleep(0.05)
                    out["rejoin_after_restart_s"] = round(time.monotonic() - t, 2)
                    out["recoveries"] = [describe(r) for r in pipeline.recoveries]
                    pipeline.infer(pool[0])
            results[scenario] = out
            print(f"{scenario}: {json.dumps(out, indent=2)}", file=sys.stderr)

    result = dict(model=f"bert-{args.size}", sequence=args.sequence,
                  requests=args.requests, kill_at=args.kill_at, scenarios=results)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(r["wrong"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
