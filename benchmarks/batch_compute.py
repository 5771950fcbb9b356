"""onnxruntime's CPU per request for a batch of 2 against single requests, one thread,
edge's session options: free, and (as root) in a cgroup with a Pi 4's CPU quota.

Run (BENCHMARKS.md, "Batches of Infer requests under load")::

    edge export bert --size base --seed 0 --out bert-base.onnx
    sudo python benchmarks/batch_compute.py --model bert-base.onnx --runs 6

Cases: ``block1`` (every run a batch of 1), ``block2`` (every run a batch of 2), ``alt``
(1 and 2 in turn). Prints host CPU ms per request of each, free and under the quota.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def measure(model: str, runs: int, sequence: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    from edge.profiling.memory import tune_malloc
    from edge.shards.runtime import session_options

    tune_malloc()
    session = ort.InferenceSession(model, session_options(1, "fp32"),
                                   providers=["CPUExecutionProvider"])
    feeds = {b: {"input_ids": np.ones((b, sequence), np.int64),
                 "attention_mask": np.ones((b, sequence), np.int64)} for b in (1, 2)}
    for f in feeds.values():
        session.run(None, f)
    out = {}
    for case in ("block1", "block2", "alt"):
        start, rows = time.process_time(), 0
        for i in range(runs):
            b = {"block1": 1, "block2": 2}.get(case, 1 + i % 2)
            session.run(None, feeds[b])
            rows += b
        out[case] = round((time.process_time() - start) * 1e3 / rows, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a BERT .onnx (input_ids, attention_mask)")
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--sequence", type=int, default=128)
    ap.add_argument("--quota-cores", type=float, default=11 / 190 * 2,
                    help="host cores' worth of CPU under the quota (default: a Pi 4 on "
                         "this 2-core host, as the lab gives it)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.model, args.runs, args.sequence)))
        return
    cmd = [sys.executable, __file__, "--child", "--model", args.model, "--runs",
           str(args.runs), "--sequence", str(args.sequence)]
    report = {"free": json.loads(subprocess.run(cmd, capture_output=True, text=True,
                                                 check=True).stdout)}
    from edge.errors import EdgeError
    from edge.lab import cgroups

    try:
        group = cgroups.detect().create("edge-batch-compute")
    except (EdgeError, OSError) as e:
        report["quota"] = f"not measured: {e}"
    else:
        try:
            quota = cgroups.cpu_quota(args.quota_cores, 2)
            group.limit_cpu(quota)
            run = subprocess.run(group.enter_command(cmd), capture_output=True, text=True,
                                 check=True)
            report["quota"] = {"quota_us": quota.quota_us, "period_us": quota.period_us,
                               **json.loads(run.stdout)}
        finally:
            for d in group.dirs:
                d.rmdir()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
