"""Pipelined throughput of 4 stages against one device, measured in the device lab.

On loopback, four workers share this machine's two cores, so a pipeline cannot show what
four boards would do. In ``edge lab`` each device gets a CPU quota scaled to its profile's
speed (a Pi 4 is ~5% of this host), so five emulated Pis - four running the pipeline, one
holding the whole model - together use well under the two cores, and each computes at its
own emulated speed. This measures, side by side in one run (rounds alternate):

- one device: one ``edge worker`` holding the whole model, requests one at a time and then
  2 in flight;
- four devices: the planner's split over four workers, one request at a time and then
  ``--in-flight`` requests in flight (default two per stage, so that no stage waits on a
  hop). Throughput includes filling and draining the pipeline: with N requests over S
  stages it is at most N / (N + S - 1) of the steady state, so use enough requests.

A CPU quota emulates throughput, not a Pi's per-operation latency: these figures are
"measured in the emulated lab", not on Pis. Needs root.

    python benchmarks/lab_throughput.py --model bert-base --profile rpi4b-2gb --requests 24
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _throughput(pipeline, inputs, in_flight: int) -> float:
    t = time.perf_counter()
    with ThreadPoolExecutor(in_flight) as pool:
        list(pool.map(pipeline.infer, inputs))
    return len(inputs) / (time.perf_counter() - t)


def _latency_ms(pipeline, inputs) -> list[float]:
    out = []
    for x in inputs:
        t = time.perf_counter()
        pipeline.infer(x)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bert-base", help="KIND-SIZE, e.g. bert-base")
    ap.add_argument("--profile", default="rpi4b-2gb")
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--sequence", type=int, default=128)
    ap.add_argument("--requests", type=int, default=24, help="per throughput block")
    ap.add_argument("--in-flight", type=int, help="for the pipeline (default 2 per stage)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", default=None)
    ap.add_argument("--json")
    args = ap.parse_args()

    from edge.coordinator.pipeline import Pipeline
    from edge.export import example_inputs, export_model
    from edge.lab import DeviceSpec, Lab
    from edge.planning import make_plan
    from edge.planning.cluster import load_cluster

    kind, size = args.model.split("-", 1)
    in_flight = args.in_flight or 2 * args.devices
    work = Path(args.work or tempfile.mkdtemp(prefix="edge-lab-tp-"))
    model = work / f"{kind}-{size}.onnx"
    if not model.exists():
        export_model(kind, size=size, seed=0, out=model)
    bindings = {"batch": 1, "sequence": args.sequence}
    inputs = [example_inputs(kind, size, batch=1, seq=args.sequence, seed=i)
              for i in range(args.requests)]

    lab = Lab.up([DeviceSpec(args.profile)] * (args.devices + 1), state_dir=work / "lab",
                 cache_dir=work / "lab-cache", cluster_file=work / "cluster.yaml")
    try:
        devices = list(load_cluster(work / "cluster.yaml").devices)
        many = make_plan(model, devices[:args.devices], work / "many", bindings=bindings)
        one = make_plan(model, devices[args.devices:], work / "one", bindings=bindings)
        print(f"lab: host {lab.host_gflops:.0f} GFLOP/s; {args.profile} devices at their "
              "profile's share of it", file=sys.stderr)
        with Pipeline(many, work / "many") as p_many, Pipeline(one, work / "one") as p_one:
            p_many.start()
            p_one.start()
            for p in (p_many, p_one):  # warm up
                p.infer(inputs[0])
            lat = {"one": [], "many": []}
            tput = {"one": [], "many": []}
            for r in range(args.rounds):
                order = [("one", p_one), ("many", p_many)]
                if r % 2:
                    order.reverse()
                for name, p in order:
                    lat[name] += _latency_ms(p, inputs[:2])
                    tput[name].append(_throughput(p, inputs,
                                                  in_flight if name == "many" else 2))
                    print(f"round {r}: {name} {tput[name][-1]:.3f} req/s", file=sys.stderr)
            status = {"one": p_one.status(), "many": p_many.status()}
    finally:
        lab.down()

    result = dict(
        model=args.model, profile=args.profile, devices=args.devices, sequence=args.sequence,
        requests=args.requests, rounds=args.rounds, in_flight=in_flight, host_gflops=round(lab.host_gflops, 1),
        modes={"one": [s.mode for s in one.stages], "many": [s.mode for s in many.stages]},
        one_device_rps=round(statistics.median(tput["one"]), 3),
        pipeline_rps=round(statistics.median(tput["many"]), 3),
        throughput_ratio=round(statistics.median(tput["many"]) / statistics.median(tput["one"]), 2),
        one_device_latency_ms=round(statistics.median(lat["one"]), 1),
        pipeline_latency_ms=round(statistics.median(lat["many"]), 1),
        peak_rss_mib={k: [round(s.worker.peak_rss_bytes / 2**20, 1) for s in v.stages]
                      for k, v in status.items()},
        note="measured in edge lab: CPU quotas scaled to the profile's GFLOP/s emulate a "
             "Pi's throughput, not its per-operation latency; not measured on Pis",
    )
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
