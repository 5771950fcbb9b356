"""BERT over N loopback workers against the unsharded model, side by side in one run.

Measures, for one model at batch 1:
- end-to-end latency of the pipeline divided by the unsharded onnxruntime latency, with
  the two measured interleaved (request by request) so machine noise hits both alike;
- pipelined throughput with several requests in flight;
- each worker's peak RSS (VmHWM) against the planner's prediction.

Usage:
    python benchmarks/bert_pipeline.py --size base --devices 4 --sequence 128 --rounds 30 \
        --json results/bert_pipeline.json
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
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
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--profile", default="rpi4b-2gb")
    ap.add_argument("--sequence", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--modes", help="modes the planner may use, comma-separated (e.g. int8); "
                    "default: its own choice")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()

    import onnxruntime as ort

    from edge.coordinator.pipeline import Pipeline
    from edge.export import example_inputs, export_model
    from edge.build import make_plan
    from edge.planning.cluster import cluster_from_profile
    from edge.profiling.memory import tune_malloc
    from edge.shards.quantize import cosine
    from edge.shards.runtime import session_options
    from edge.transport.codec import decode_tensors
    from edge.worker.launch import LocalWorkers

    tune_malloc()
    work = Path(tempfile.mkdtemp(prefix="edge-bench-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # GBs of shards
    model = export_model("bert", size=args.size, seed=0, out=work / f"bert-{args.size}.onnx")
    inputs = [example_inputs("bert", args.size, batch=1, seq=args.sequence, seed=i)
              for i in range(args.rounds)]
    full = ort.InferenceSession(str(model), sess_options=session_options(),
                                providers=["CPUExecutionProvider"])

    with LocalWorkers(args.devices, work / "workers", device=args.profile) as workers:
        cluster = cluster_from_profile(args.profile, args.devices, addresses=workers.addresses)
        plan = make_plan(model, cluster.devices, work / "build",
                         bindings={"batch": 1, "sequence": args.sequence},
                         modes=tuple(args.modes.split(",")) if args.modes else None)
        with Pipeline(plan, work / "build") as pipeline:
            pipeline.start()
            for x in inputs[:3]:  # warm both up
                full.run(None, x)
                pipeline.infer(x)
            unsharded, sharded, worst, least_cos = [], [], 0.0, 1.0
            for x in inputs:
                t = time.perf_counter()
                want = full.run(None, x)
                unsharded.append((time.perf_counter() - t) * 1e3)
                t = time.perf_counter()
                got = decode_tensors(pipeline.infer(x).outputs)
                sharded.append((time.perf_counter() - t) * 1e3)
                for o, w in zip(full.get_outputs(), want):
                    worst = max(worst, float(np.max(np.abs(got[o.name] - w))))
                    least_cos = min(least_cos, cosine(got[o.name], w))
            t = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                list(pool.map(pipeline.infer, inputs))
            pipelined_rps = len(inputs) / (time.perf_counter() - t)
            t = time.perf_counter()
            for x in inputs:
                full.run(None, x)
            unsharded_rps = len(inputs) / (time.perf_counter() - t)
            status = pipeline.status()

    stages = []
    for stage, st in zip(plan.stages, status.stages):
        measured = st.worker.peak_rss_bytes / 2**20
        stages.append(dict(stage=stage.index, device=stage.device.name,
                           nodes=list(stage.node_range),
                           shard_mib=round(stage.total_bytes / 2**20, 1), mode=stage.mode,
                           predicted_mib=round(stage.predicted.memory_mb, 1),
                           measured_peak_mib=round(measured, 1),
                           error_pct=round(100 * (stage.predicted.memory_mb - measured) / measured, 1),
                           mean_compute_ms=round(st.worker.mean_compute_ms, 2)))
    ratios = [s / u for s, u in zip(sharded, unsharded)]
    result = dict(
        model=f"bert-{args.size}", sequence=args.sequence, batch=1, devices=args.devices,
        rounds=args.rounds,
        unsharded_ms_median=round(statistics.median(unsharded), 2),
        pipeline_ms_median=round(statistics.median(sharded), 2),
        latency_ratio_median=round(statistics.median(ratios), 3),
        latency_ratio_of_medians=round(statistics.median(sharded) / statistics.median(unsharded), 3),
        pipelined_rps=round(pipelined_rps, 2), unsharded_rps=round(unsharded_rps, 2),
        max_abs_diff=worst, least_cosine=round(least_cos, 6), stages=stages,
    )
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
