"""Fit the planner's memory model (edge/planning/memory.py) from real workers, per mode.

For each model and mode, the model is planned with every stage forced into that mode
(``make_plan(modes=(mode,))``), deployed on loopback ``edge worker`` processes, driven with
requests through the coordinator and profiled exactly as ``edge profile`` does
(benchmarks/memory_accuracy.py does the same with the planner's own choice of modes). Each
stage gives one row: its weights read whole and its Gather tables (bytes at fp32 or int8
size, as the planner counts them), its peak live activations, the device's runtime floor
and the worker's measured peak RSS. ``--fit`` then solves, per mode, by non-negative least
squares on the relative error,

    peak - floor = weight_factor * whole + table_factor * tables
                   + activation_factor * activations + session_overhead
                   + io_factor * (bytes received + bytes sent per request)

(the factors non-negative, the session overhead of either sign; stages that peaked within
5 MiB of the floor are left out, the prediction never goes below the floor + 2 MiB,
``FLOOR_MARGIN_MB``)

and prints the table of predicted against measured peaks. ``--speed`` also times every
stage in-process in each mode (median of runs, ``--threads`` intra-op threads) to give the
compute factor of int8 against fp32.

    python benchmarks/memory_model.py --json /tmp/mm.jsonl            # measure (appends)
    python benchmarks/memory_model.py --load /tmp/mm.jsonl --fit      # fit, print the table
    python benchmarks/memory_model.py --models bert-base:4 --modes int8 --speed

Needs ``edge[export]`` (torch) to export the models.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MiB = float(1 << 20)


def _bindings(kind: str, seq: int) -> dict[str, int]:
    return ({"batch": 1, "height": seq, "width": seq} if kind == "unet"
            else {"batch": 1, "sequence": seq})


def _channels(costs, i: int, j: int) -> dict[str, float]:
    """The planner's four weight channels of nodes [i, j), in MiB."""
    from edge.planning.planner import _weights_brute

    w = _weights_brute(costs, i, j) / MiB
    return dict(whole32=w[0], table32=w[1], whole8=w[2], table8=w[3])


def measure(kind: str, size: str, devices: int, mode: str, work: Path, profile: str,
            requests: int, seq: int) -> list[dict]:
    from edge.coordinator.pipeline import Pipeline
    from edge.coordinator.server import start_coordinator
    from edge.export import example_inputs, export_model
    from edge.build import make_plan
    from edge.planning.cluster import cluster_from_profile
    from edge.planning.graph import analyze
    from edge.coordinator.live_profile import collect
    from edge.profiling.report import summarize
    from edge.worker.launch import LocalWorkers

    model = work / f"{kind}-{size}.onnx"
    if not model.exists():
        export_model(kind, size=size, seed=0, out=model)
    bindings = _bindings(kind, seq)
    x = example_inputs(kind, size, batch=1, seq=seq)
    costs = analyze(model, bindings)
    tag = f"{kind}-{size}-{devices}-{mode}"
    with LocalWorkers(devices, work / f"workers-{tag}", device=profile) as workers:
        cluster = cluster_from_profile(profile, devices, addresses=workers.addresses)
        build = work / f"build-{tag}"
        plan = make_plan(model, cluster.devices, build, bindings=bindings, modes=(mode,))
        with Pipeline(plan, build) as pipeline:
            pipeline.start()
            server, port = start_coordinator(pipeline, "127.0.0.1:0")
            try:
                report = collect(f"127.0.0.1:{port}", requests=requests, concurrency=2,
                                 inputs=x)
            finally:
                server.stop(0)
    if report.get("errors"):
        raise RuntimeError(f"{tag}: {report['errors']}")
    rows = []
    for st, r in zip(plan.stages, summarize(report)):
        i, j = st.node_range
        rows.append(dict(model=f"{kind}-{size}", devices=devices, stage=st.index, mode=st.mode,
                         bindings=bindings, node_range=[i, j],
                         **_channels(costs, i, j),
                         act=costs.activation_peak(i, j) / MiB,
                         io=(float(costs.cut_bytes[i]) + float(costs.cut_bytes[j])) / MiB,
                         floor=st.device.runtime_floor_mb,
                         planned=r["planned_mb"], peak=r["measured_peak_mb"],
                         at_load=r["rss_at_load_mb"], anon=r["peak_anon_mb"],
                         file=r["peak_file_mb"]))
    return rows


def speed(kind: str, size: str, devices: int, work: Path, threads: int, seq: int,
          runs: int = 7) -> list[dict]:
    """Median in-process run time of every stage in each mode (same ranges for all)."""
    import onnxruntime as ort

    from edge.export import example_inputs, export_model
    from edge.build import make_plan
    from edge.planning.plan import MODES, Device
    from edge.shards.runtime import session_options

    model = work / f"{kind}-{size}.onnx"
    if not model.exists():
        export_model(kind, size=size, seed=0, out=model)
    devs = [Device(f"d{k}", f"d{k}:1", "bench", 1e6, 10.0, 1000.0) for k in range(devices)]
    plans = {m: make_plan(model, devs, work / f"speed-{kind}-{size}-{m}",
                          bindings=_bindings(kind, seq), modes=(m,)) for m in MODES}
    cur = example_inputs(kind, size, batch=1, seq=seq)
    rows = []
    for k in range(devices):
        times = {}
        for m in MODES:
            st = plans[m].stages[k]
            sess = ort.InferenceSession(str(work / f"speed-{kind}-{size}-{m}" / st.shard),
                                        session_options(threads, m),
                                        providers=["CPUExecutionProvider"])
            feed = {i.name: cur[i.name] for i in sess.get_inputs()}
            sess.run(None, feed)
            ts = []
            for _ in range(runs):
                t = time.perf_counter()
                res = sess.run(None, feed)
                ts.append((time.perf_counter() - t) * 1e3)
            times[m] = statistics.median(ts)
            if m == "fp32":
                nxt = {n: cur[n] for n in st.passthrough}
                nxt.update(zip([o.name for o in sess.get_outputs()], res))
        cur = nxt
        rows.append(dict(model=f"{kind}-{size}", stage=k, **{f"{m}_ms": t for m, t in times.items()}))
    return rows


def _features(r: dict, mode: str) -> list[float]:
    s = "8" if mode == "int8" else "32"
    return [r[f"whole{s}"], r[f"table{s}"], r["act"], 1.0, r.get("io", 0.0)]


FLOOR_BOUND_MB = 5.0


def fit(rows: list[dict]) -> dict[str, list[float]]:
    """Per mode, least squares of (peak - floor) on relative error: the factors
    non-negative, the session overhead of either sign (a worker keeps only part of the
    floor's library pages once it unmaps those its start and its load touched,
    ``edge.profiling.memory.release_file_pages``, so it can end below floor + session)."""
    from scipy.optimize import nnls

    out = {}
    for mode in sorted({r["mode"] for r in rows}):
        # Stages that peaked within FLOOR_BOUND_MB of the floor peaked before their load
        # (idle, upload), which the prediction's clamp at the floor covers: they say
        # nothing about the linear terms.
        sel = [r for r in rows if r["mode"] == mode and r["peak"] - r["floor"] > FLOOR_BOUND_MB]
        # the intercept as the difference of two non-negative columns: +1 and -1
        a = np.array([_features(r, mode) + [-1.0] for r in sel])
        y = np.array([r["peak"] - r["floor"] for r in sel])
        wgt = 1.0 / np.array([r["peak"] for r in sel])  # relative error of the whole peak
        coef, _ = nnls(a * wgt[:, None], y * wgt)
        c = [float(x) for x in coef[:5]]
        c[3] -= float(coef[5])
        out[mode] = c
    return out


def table(rows: list[dict], constants=None) -> None:
    from edge.planning import memory

    print(f"{'model':>11} {'mode':>9} {'st':>2} {'whole':>6} {'table':>6} {'act':>5} "
          f"{'anon':>6} {'file':>6} {'measured':>8} {'predicted':>9} {'err':>6}")
    worst = 0.0
    for r in rows:
        s = "8" if r["mode"] == "int8" else "32"
        if constants is None:
            pred = float(memory.stage_memory_mb(r[f"whole{s}"] * MiB, r["act"] * MiB, r["floor"],
                                                table_bytes=r[f"table{s}"] * MiB, mode=r["mode"],
                                                io_bytes=r.get("io", 0.0) * MiB))
        else:
            pred = max(r["floor"] + memory.FLOOR_MARGIN_MB,
                       r["floor"] + float(np.dot(constants[r["mode"]], _features(r, r["mode"]))))
        err = (pred - r["peak"]) / r["peak"] * 100
        worst = max(worst, abs(err))
        print(f"{r['model']:>11} {r['mode']:>9} {r['stage']:>2} {r[f'whole{s}']:6.1f} "
              f"{r[f'table{s}']:6.1f} {r['act']:5.1f} {r['anon'] or 0:6.1f} "
              f"{r['file'] or 0:6.1f} {r['peak']:8.1f} {pred:9.1f} {err:+5.1f}%")
    print(f"worst |error| {worst:.1f}%")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+",
                    default=["bert-base:4", "gpt2-small:4", "unet-small:3"],
                    help="KIND-SIZE:DEVICES")
    ap.add_argument("--modes", nargs="+", default=["fp32", "fp32-lean", "int8"])
    ap.add_argument("--profile", default="rpi4b-2gb")
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--seq", type=int, default=128, help="sequence length or image side")
    ap.add_argument("--threads", type=int, default=2, help="threads for --speed")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "edge-memory-model"))
    ap.add_argument("--json", help="append the measured rows to this JSON-lines file")
    ap.add_argument("--load", nargs="*", help="read rows from these files instead of measuring")
    ap.add_argument("--fit", action="store_true", help="fit the constants per mode")
    ap.add_argument("--speed", action="store_true", help="time each stage in each mode")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    if args.speed:
        for item in args.models:
            name, _, n = item.partition(":")
            kind, _, size = name.partition("-")
            rows = speed(kind, size, int(n or 4), work, args.threads, args.seq)
            for r in rows:
                print(f"{r['model']} stage {r['stage']}: fp32 {r['fp32_ms']:.1f} ms, lean "
                      f"{r['fp32-lean_ms']:.1f} ms ({r['fp32-lean_ms'] / r['fp32_ms']:.2f}x), "
                      f"int8 {r['int8_ms']:.1f} ms ({r['int8_ms'] / r['fp32_ms']:.2f}x)")
            tot = {m: sum(r[f"{m}_ms"] for r in rows) for m in ("fp32", "fp32-lean", "int8")}
            print(f"{rows[0]['model']} all stages: lean {tot['fp32-lean'] / tot['fp32']:.2f}x, "
                  f"int8 {tot['int8'] / tot['fp32']:.2f}x of fp32")
        return 0

    rows = []
    if args.load is not None:
        for f in args.load:
            rows += [json.loads(line) for line in Path(f).read_text().splitlines() if line]
    else:
        for item in args.models:
            name, _, n = item.partition(":")
            kind, _, size = name.partition("-")
            for mode in args.modes:
                got = measure(kind, size, int(n or 4), mode, work, args.profile,
                              args.requests, args.seq)
                rows += got
                if args.json:
                    with open(args.json, "a") as f:
                        for r in got:
                            f.write(json.dumps(r) + "\n")
                print(f"measured {name}:{n} {mode}", file=sys.stderr)
    print("with the constants in edge/planning/memory.py:")
    table(rows)
    if args.fit:
        consts = fit(rows)
        for mode, c in consts.items():
            print(f"fit {mode}: weight_factor={c[0]:.3f} table_factor={c[1]:.3f} "
                  f"activation_factor={c[2]:.3f} session_overhead_mb={c[3]:.1f} "
                  f"io_factor={c[4]:.3f}")
        print("with the fitted constants:")
        table(rows, consts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
