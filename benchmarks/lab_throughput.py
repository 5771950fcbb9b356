"""Pipelines of N emulated devices against one, each with its coordinator on an emulated
board of its own, measured side by side in the device lab.

The comparison ``edge bench`` makes in its lab section, on its own (see
``edge.bench.lab_pipeline``). Needs root.

    python benchmarks/lab_throughput.py --model bert-base --profile rpi4b-2gb --stages 4,8 \\
        --coordinator rpi4b-2gb --rounds 2 --json benchmarks/results/lab_throughput.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bert-base", help="KIND-SIZE, e.g. bert-base")
    ap.add_argument("--profile", default="rpi4b-2gb", help="every worker device's profile")
    ap.add_argument("--stages", default="4,8", help="the pipelines, e.g. 4,8")
    ap.add_argument("--coordinator", default="rpi4b-2gb",
                    help="the profile of each arm's coordinator board ('host': this host, "
                         "uncapped)")
    ap.add_argument("--sequence", type=int, default=128)
    ap.add_argument("--requests", type=int, default=48,
                    help="per throughput block of a pipeline (one device: a third)")
    ap.add_argument("--in-flight", type=int,
                    help="for the pipelines (default --per-stage per stage)")
    ap.add_argument("--per-stage", type=int, default=2,
                    help="requests in flight per stage, one device included (default 2; past "
                         "2 the coordinators batch the requests that wait)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--latency-requests", type=int, default=3,
                    help="requests sent one at a time per round and arm, for the latency")
    ap.add_argument("--host-gflops", type=float,
                    help="this host's GFLOP/s for the quotas (default: measured at lab up)")
    ap.add_argument("--direct", action="store_true",
                    help="the client sends each request to the first stage and hears its "
                         "result from the last (DirectClient); the coordinator only routes")
    ap.add_argument("--work", default=None)
    ap.add_argument("--json")
    args = ap.parse_args()

    from edge.bench.lab_pipeline import lab_scaling
    from edge.export import example_inputs, export_model

    kind, size = args.model.split("-", 1)
    work = Path(args.work or tempfile.mkdtemp(prefix="edge-lab-tp-"))
    model = work / f"{kind}-{size}.onnx"
    if not model.exists():
        export_model(kind, size=size, seed=0, out=model)
    inputs = [example_inputs(kind, size, batch=1, seq=args.sequence, seed=i)
              for i in range(16)]
    result = lab_scaling(model, inputs, {"batch": 1, "sequence": args.sequence},
                         args.profile, [int(s) for s in args.stages.split(",")], args.rounds,
                         work, coordinator=None if args.coordinator == "host" else
                         args.coordinator, in_flight=args.in_flight, requests=args.requests,
                         host_gflops=args.host_gflops, per_stage=args.per_stage,
                         direct=args.direct, latency_requests=args.latency_requests,
                         say=lambda m: print(m, file=sys.stderr, flush=True))
    result["model"] = args.model
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["status"] == "measured" else 2


if __name__ == "__main__":
    sys.exit(main())
