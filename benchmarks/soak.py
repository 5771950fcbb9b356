"""Soak: requests without pause for a long time across N workers; errors and memory growth.

Every answer is compared with the unsharded model's output for the same input (a pool of
inputs of varied sequence lengths, computed once); a wrong answer counts as an error. Each
process's RSS (the workers' and this coordinator's) is sampled all along. Growth is the
median RSS of the last tenth of the run against the median of the tenth right after
warm-up.

Runs on loopback workers, or with --lab on the devices of a running `edge lab` (each
worker then has its device's CPU, memory and link caps).

Usage:
    python benchmarks/soak.py --minutes 10 --devices 4 --json benchmarks/results/soak.json
"""

from __future__ import annotations

import argparse
import atexit
import json
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=1.0, help="minutes of warm-up")
    ap.add_argument("--size", default="base")
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--profile", default="rpi4b-2gb")
    ap.add_argument("--max-sequence", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--lab", action="store_true", help="use the devices of `edge lab up`")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()

    import onnxruntime as ort
    import psutil

    from edge.coordinator.pipeline import InferError, Pipeline
    from edge.export import example_inputs, export_model
    from edge.build import make_plan
    from edge.planning.cluster import cluster_from_profile
    from edge.profiling.memory import tune_malloc
    from edge.transport.codec import decode_tensors
    from edge.worker.launch import LocalWorkers

    tune_malloc()
    work = Path(tempfile.mkdtemp(prefix="edge-soak-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # GBs of shards
    model = export_model("bert", size=args.size, seed=0, out=work / f"bert-{args.size}.onnx")
    rng = random.Random(0)
    pool = [example_inputs("bert", args.size, batch=1, seq=rng.randint(8, args.max_sequence),
                           seed=i) for i in range(24)]
    full = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in full.get_outputs()]
    want = [dict(zip(names, full.run(None, x))) for x in pool]
    del full

    workers = None
    if args.lab:
        from edge.lab.lab import Lab

        lab = Lab.load()
        devices = list(lab.cluster().devices)[:args.devices]
        pids = {d.name: lab.device(d.address).pid for d in devices}
    else:
        workers = LocalWorkers(args.devices, work / "workers", device=args.profile).__enter__()
        devices = list(cluster_from_profile(args.profile, args.devices,
                                            addresses=workers.addresses).devices)
        pids = {d.name: w.process.pid for d, w in zip(devices, workers.workers)}
    pids["coordinator"] = None  # this process
    procs = {name: psutil.Process(pid) for name, pid in pids.items()}

    plan = make_plan(model, devices, work / "build",
                     bindings={"batch": 1, "sequence": args.max_sequence})
    samples: dict[str, list[tuple[float, float]]] = {n: [] for n in procs}
    counts = {"ok": 0, "wrong": 0, "errors": 0}
    messages: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    t0 = time.monotonic()
    try:
        with Pipeline(plan, work / "build") as pipeline:
            pipeline.start()

            def client(k: int) -> None:
                i = k
                while not stop.is_set():
                    x = pool[i % len(pool)]
                    try:
                        got = decode_tensors(pipeline.infer(x).outputs)
                        ok = all(np.allclose(got[n], want[i % len(pool)][n], atol=1e-3, rtol=0)
                                 for n in names)
                        with lock:
                            counts["ok" if ok else "wrong"] += 1
                    except InferError as e:
                        with lock:
                            counts["errors"] += 1
                            if len(messages) < 10:
                                messages.append(f"{e.code.name}: {e}")
                    i += args.concurrency

            threads = [threading.Thread(target=client, args=(k,), daemon=True)
                       for k in range(args.concurrency)]
            for t in threads:
                t.start()
            end = t0 + args.minutes * 60
            while time.monotonic() < end:
                now = time.monotonic() - t0
                for name, proc in procs.items():
                    samples[name].append((now, proc.memory_info().rss / 2**20))
                done = sum(counts.values())
                print(f"\r{now / 60:5.1f} min  {done} requests  errors "
                      f"{counts['errors'] + counts['wrong']}", end="", file=sys.stderr)
                time.sleep(2.0)
            stop.set()
            for t in threads:
                t.join(timeout=120)
            recoveries = [r.describe() for r in pipeline.recoveries]
    finally:
        if workers is not None:
            workers.__exit__(None, None, None)
    print(file=sys.stderr)

    elapsed = time.monotonic() - t0
    warm = args.warmup * 60
    span = (elapsed - warm) / 10
    growth = {}
    for name, series in samples.items():
        after = [rss for t, rss in series if warm <= t < warm + span]
        last = [rss for t, rss in series if t >= elapsed - span]
        first = statistics.median(after)
        end_ = statistics.median(last)
        growth[name] = dict(after_warmup_mib=round(first, 1), end_mib=round(end_, 1),
                            peak_mib=round(max(rss for _, rss in series), 1),
                            growth_pct=round(100 * (end_ - first) / first, 2))
    result = dict(model=f"bert-{args.size}", devices=args.devices,
                  where="lab" if args.lab else "loopback", minutes=round(elapsed / 60, 2),
                  warmup_minutes=args.warmup, concurrency=args.concurrency,
                  requests=sum(counts.values()), ok=counts["ok"], wrong=counts["wrong"],
                  errors=counts["errors"], error_messages=messages, recoveries=recoveries,
                  requests_per_s=round(sum(counts.values()) / elapsed, 2), rss=growth)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if counts["errors"] + counts["wrong"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
