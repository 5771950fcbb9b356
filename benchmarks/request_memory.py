"""Requests larger than the plan's sizes: the coordinator's memory bound against each
worker's measured peak RSS.

A plan is costed at one size (sequence 128); the coordinator bounds a larger request's
memory per stage from the growth powers the plan records (``StagePrediction.memory_at``)
and refuses one that some device cannot hold. This measures how tight that bound is: for
each request size, fresh loopback workers serve the plan (so each peak belongs to that
size alone), driven as ``edge profile --coordinator`` does.

Usage:
    python benchmarks/request_memory.py --model bert-base --devices 4 \
        --sizes 1x128 1x256 1x512 4x128 4x256 --json benchmarks/results/request_memory.json
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import sys
import tempfile
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bert-base", help="KIND-SIZE (bert or gpt2)")
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--profile", default="rpi4b-2gb")
    ap.add_argument("--sequence", type=int, default=128, help="the size the plan is made for")
    ap.add_argument("--sizes", nargs="+", default=["1x128", "1x256", "1x512", "4x128", "4x256"],
                    help="request sizes, BATCHxSEQUENCE")
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--json")
    args = ap.parse_args()

    from edge.coordinator.guard import check_fits, TooLarge
    from edge.coordinator.pipeline import Pipeline
    from edge.coordinator.server import start_coordinator
    from edge.export import example_inputs, export_model
    from edge.build import make_plan
    from edge.planning.cluster import cluster_from_profile
    from edge.coordinator.live_profile import collect
    from edge.profiling.report import summarize
    from edge.worker.launch import LocalWorkers

    work = Path(tempfile.mkdtemp(prefix="edge-reqmem-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # GBs of shards
    kind, _, size = args.model.partition("-")
    model = export_model(kind, size=size, seed=0, out=work / f"{args.model}.onnx")
    bindings = {"batch": 1, "sequence": args.sequence}
    rows = []
    plan = None
    for item in args.sizes:
        batch, _, seq = item.partition("x")
        sizes = {"batch": int(batch), "sequence": int(seq)}
        with LocalWorkers(args.devices, work / f"workers-{item}", device=args.profile) as workers:
            cluster = cluster_from_profile(args.profile, args.devices,
                                           addresses=workers.addresses)
            # Plans differ only in addresses; costing is the same for every size.
            plan = make_plan(model, cluster.devices, work / f"plan-{item}", bindings=bindings,
                             modes=("fp32",))
            try:
                check_fits(plan, sizes)
                refused = ""
            except TooLarge as e:
                refused = str(e)
            x = example_inputs(kind, size, batch=sizes["batch"], seq=sizes["sequence"])
            with Pipeline(plan, work / f"plan-{item}") as pipeline:
                pipeline.start()
                server, port = start_coordinator(pipeline, "127.0.0.1:0")
                try:
                    # A size the coordinator refuses is reported as refused, not sent.
                    if refused:
                        report = None
                    else:
                        report = collect(f"127.0.0.1:{port}", requests=args.requests,
                                         concurrency=2, inputs=x)
                finally:
                    server.stop(0)
        for st in plan.stages:
            bound = st.predicted.memory_at(bindings, sizes)
            measured = None
            if report is not None:
                measured = next(r["measured_peak_mb"] for r in summarize(report)
                                if r["stage"] == st.index)
            rows.append(dict(size=item, stage=st.index, planned_mb=st.predicted.memory_mb,
                             bound_mb=bound, measured_peak_mb=measured,
                             budget_mb=st.device.memory_mb, refused=refused,
                             degrees=st.predicted.activation_degrees))
            ratio = f"{bound / measured:.2f}" if measured else "-"
            print(f"{item:>8} stage {st.index}: planned {st.predicted.memory_mb:7.1f}  "
                  f"bound {bound:7.1f}  measured {measured or float('nan'):7.1f} MiB  "
                  f"bound/measured {ratio}{'  REFUSED' if refused else ''}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(model=args.model, bindings=bindings,
                                                   rows=rows), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
