"""Cuts inside feed-forward blocks against whole nodes, side by side in the device lab:
BERT-base over 8 emulated Pi 4s planned both ways (``blocks``: the default plan, which
computes feed-forward blocks in parts so that a cut may fall inside one; ``whole``:
``make_plan(block_cuts=False)``), and one Pi 4 holding the whole model, each cluster with
its coordinator on an emulated Pi 4 of its own (as ``edge.bench.lab_pipeline``). Needs root.

    sudo python benchmarks/finer_cuts_lab.py --rounds 2 --host-gflops 190   # ~12 min

``--columns`` plans the first arm with MatMuls split by columns instead
(``finer_cuts=True, block_cuts=False``), the comparison of the first version of this
script.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, default=8)
    ap.add_argument("--profile", default="rpi4b-2gb")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--host-gflops", type=float)
    ap.add_argument("--work", default=None)
    ap.add_argument("--columns", action="store_true",
                    help="the finer arm splits MatMuls by columns, not feed-forward blocks")
    args = ap.parse_args()

    from edge.bench import lab_pipeline as lp
    from edge.build import make_plan
    from edge.export import example_inputs, export_model
    from edge.lab.devices import DeviceSpec
    from edge.lab.lab import Lab
    from edge.planning.cluster import load_cluster

    work = Path(args.work or tempfile.mkdtemp(prefix="edge-finer-"))
    model = work / "bert-base.onnx"
    if not model.exists():
        export_model("bert", size="base", seed=0, out=model)
    inputs = [example_inputs("bert", "base", batch=1, seq=128, seed=i) for i in range(16)]
    finer = ({"finer_cuts": True, "block_cuts": False} if args.columns
             else {"block_cuts": True})
    shapes = (("one", 1, {"block_cuts": False}),
              ("columns" if args.columns else "blocks", args.stages, finer),
              ("whole", args.stages, {"block_cuts": False}))
    specs = []
    for name, n, _ in shapes:
        specs += [DeviceSpec(args.profile, name=f"{name}-{k}") for k in range(n)]
        specs.append(DeviceSpec(args.profile, name=f"{name}-coordinator", role="coordinator"))
    lab = Lab.up(specs, state_dir=work / "lab", cache_dir=work / "lab-cache",
                 cluster_file=work / "cluster.yaml", gflops=args.host_gflops)
    by = {d.name: d for d in lab.devices}
    arms = [lp.Arm(name, n, [by[f"{name}-{k}"] for k in range(n)], by[f"{name}-coordinator"],
                    2 if n == 1 else 2 * n, 16 if n == 1 else 8 * n) for name, n, _ in shapes]
    planned = {}
    try:
        devices = {d.name: d for d in load_cluster(work / "cluster.yaml").devices}
        for arm, (_, _, cuts) in zip(arms, shapes):
            plan = make_plan(model, [devices[w.name] for w in arm.workers], work / arm.name,
                             bindings={"batch": 1, "sequence": 128}, **cuts)
            planned[arm.name] = [round(s.predicted.time_ms, 1) for s in plan.stages]
            lp.start_arm(arm, lab, work / arm.name, work)
            arm.client.infer_raw(inputs[0])  # warm up
        for r in range(args.rounds):
            for arm in arms[r % 3:] + arms[:r % 3]:
                lp.measure_arm(arm, inputs, 2)
                print(f"round {r}: {arm.name} {arm.rps[-1]:.3f} req/s", file=sys.stderr)
    finally:
        lp.stop_arms(arms)
        lab.down()
    one = statistics.median(arms[0].rps)
    out = {arm.name: {"planned_stage_ms": planned[arm.name],
                      "rps_per_round": [round(x, 3) for x in arm.rps],
                      "worker_cpu_ms_per_request": [
                          round(statistics.median(w[k] for w in arm.worker_cpu_ms), 1)
                          for k in range(arm.stages)],
                      "speedup": round(statistics.median(arm.rps) / one, 3),
                      "speedup_per_round": [round(a / b, 3)
                                            for a, b in zip(arm.rps, arms[0].rps)]}
           for arm in arms}
    out["note"] = "measured in edge lab (CPU quotas), not on a Pi"
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
