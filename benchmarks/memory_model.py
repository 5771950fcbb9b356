"""Measure how much memory onnxruntime really needs per shard, and compare with the model.

For each stage of a plan, a fresh subprocess that imports only numpy and onnxruntime loads
the shard, runs it once on the stage's real inputs and reports its peak RSS (``VmHWM`` from
/proc/self/status; ``ru_maxrss`` of a child can report the parent's peak). The prediction
is edge.planning.memory.stage_memory_mb with the child's own RSS after its imports (before
the stage's inputs are loaded) as the floor.

    python benchmarks/memory_model.py                          # BERT-base over 4, seq 128
    python benchmarks/memory_model.py --kind unet --size small --devices 3
    python benchmarks/memory_model.py --external               # also external data + no prepacking
    python benchmarks/memory_model.py --fit                    # least-squares constants

Needs ``edge[export]`` (torch) only to export the model when ``--model`` is not given.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# The child imports only what a worker imports to run a shard. It reads its RSS after the
# imports (the floor) and again once the inputs are in memory; "peak - floor" is what the
# shard and its activations (inputs included) cost.
_CHILD = r"""
import json, sys
import numpy as np
import onnxruntime as ort

def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) / 1024.0
    return out

shard, feeds_path, threads, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
floor = status()
feeds = dict(np.load(feeds_path))
idle = status()
so = ort.SessionOptions()
so.intra_op_num_threads = threads
so.inter_op_num_threads = 1
so.add_session_config_entry("session.intra_op.allow_spinning", "0")
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
if mode == "external":
    so.add_session_config_entry("session.disable_prepacking", "1")
sess = ort.InferenceSession(shard, so, providers=["CPUExecutionProvider"])
loaded = status()
sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})
ran = status()
sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})
ran2 = status()
print(json.dumps(dict(floor=floor, idle=idle, loaded=loaded, ran=ran, ran2=ran2)))
"""

# glibc settings the worker applies (edge.profiling.memory.tune_malloc).
_TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}


def _measure(shard: Path, feeds: Path, threads: int, mode: str, tuned: bool) -> dict:
    env = dict(os.environ)
    for k in _TUNED_MALLOC:
        env.pop(k, None)
    if tuned:
        env.update(_TUNED_MALLOC)
    out = subprocess.run([sys.executable, "-c", _CHILD, str(shard), str(feeds), str(threads),
                          mode], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _externalise(shard: Path, out: Path) -> Path:
    import onnx

    m = onnx.load(str(shard))
    onnx.save(m, str(out), save_as_external_data=True, location=out.name + ".data",
              size_threshold=1024)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="an .onnx file (default: export --kind/--size)")
    ap.add_argument("--kind", default="bert")
    ap.add_argument("--size", default="base")
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--seq", type=int, default=None,
                    help="sequence length (text) or image side (unet); default 128")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "edge-memory-model"))
    ap.add_argument("--external", action="store_true",
                    help="also measure shards with external data and prepacking off")
    ap.add_argument("--malloc", choices=["default", "tuned", "both"], default="both",
                    help="glibc malloc settings of the child (tuned = what the worker sets)")
    ap.add_argument("--fit", action="store_true", help="print least-squares constants")
    ap.add_argument("--reps", type=int, default=1,
                    help="measure each shard this many times and keep the highest peak "
                         "(the load-time peak is bimodal from run to run)")
    ap.add_argument("--json", help="also append the rows to this JSON-lines file")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from edge.planning import make_plan, memory
    from edge.planning.graph import analyze
    from edge.planning.plan import Device
    from edge.shards.runtime import session_options
    import onnxruntime as ort

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    seq = args.seq or 128
    if args.model:
        model = Path(args.model)
    else:
        model = work / f"{args.kind}-{args.size}.onnx"
        if not model.exists():
            from edge.export import export_model
            export_model(args.kind, size=args.size, seed=0, out=model)
    kind = args.kind
    bindings = ({"batch": 1, "height": seq, "width": seq} if kind == "unet"
                else {"batch": 1, "sequence": seq})
    from edge.export.inputs import example_inputs
    feeds = example_inputs(kind, args.size, batch=1, seq=seq)

    devs = [Device(f"pi-{k}", f"pi-{k}:50051", "bench", memory_mb=1e6, gflops=10.0,
                   bandwidth_mbps=1000.0) for k in range(args.devices)]
    out = work / f"plan-{model.stem}-{args.devices}"
    plan = make_plan(model, devs, out, bindings=bindings)
    costs = analyze(model, bindings)

    # Real stage inputs (Reshape targets and masks must be real values), from a chained run.
    cur = dict(feeds)
    feed_files = []
    for st in plan.stages:
        path = out / f"feeds-{st.index}.npz"
        np.savez(path, **{t.name: cur[t.name] for t in st.inputs})
        feed_files.append(path)
        sess = ort.InferenceSession(str(out / st.shard), session_options(args.threads),
                                    providers=["CPUExecutionProvider"])
        res = sess.run(None, {i.name: cur[i.name] for i in sess.get_inputs()})
        nxt = {k: cur[k] for k in st.passthrough}
        nxt.update(zip([o.name for o in sess.get_outputs()], res))
        cur = nxt
        del sess

    modes = ["embedded"] + (["external"] if args.external else [])
    mallocs = {"default": [False], "tuned": [True], "both": [False, True]}[args.malloc]
    rows = []
    for st in plan.stages:
        i, j = st.node_range
        w = costs.weight_bytes(i, j)
        a = costs.activation_peak(i, j)
        shard = out / st.shard
        for mode in modes:
            path = shard if mode == "embedded" else _externalise(
                shard, out / f"stage-{st.index}-ext.onnx")
            for tuned in mallocs:
                r = max((_measure(path, feed_files[st.index], args.threads, mode, tuned)
                         for _ in range(max(1, args.reps))), key=lambda x: x["ran2"]["VmHWM"])
                # The inputs are part of the stage's live activations (a worker holds the
                # decoded request), so the floor is read before they are loaded.
                idle = r["floor"]["VmRSS"]
                peak = r["ran2"]["VmHWM"]
                pred = memory.stage_memory_mb(w, a, idle)
                rows.append(dict(stage=st.index, mode=mode, malloc="tuned" if tuned else "default",
                                 weights_mb=w / memory.MiB, act_mb=a / memory.MiB,
                                 idle=idle, load_peak=r["loaded"]["VmHWM"],
                                 after_load=r["loaded"]["VmRSS"], peak=peak,
                                 steady=r["ran2"]["VmRSS"], pred=pred,
                                 anon=r["ran2"]["RssAnon"], file=r["ran2"]["RssFile"],
                                 model=model.name,
                                 bindings=bindings))

    print(f"{model.name} over {args.devices}, bindings {bindings}, threads {args.threads}; "
          f"WEIGHT_FACTOR={memory.WEIGHT_FACTOR} ACTIVATION_FACTOR={memory.ACTIVATION_FACTOR} "
          f"SESSION_OVERHEAD_MB={memory.SESSION_OVERHEAD_MB}")
    hdr = (f"{'stage':>5} {'mode':>8} {'malloc':>7} {'weights':>8} {'act':>6} {'floor':>6} "
           f"{'loadpk':>7} {'loaded':>7} {'peak':>7} {'steady':>7} {'anon':>6} {'file':>6} "
           f"{'pred':>7} {'err':>6}")
    print(hdr + "   (MiB; peak = VmHWM after load + two runs; anon/file = RssAnon/RssFile "
          "at the end)")
    for r in rows:
        err = (r["pred"] - r["peak"]) / r["peak"] * 100
        print(f"{r['stage']:>5} {r['mode']:>8} {r['malloc']:>7} {r['weights_mb']:8.1f} "
              f"{r['act_mb']:6.1f} {r['idle']:6.1f} {r['load_peak']:7.1f} {r['after_load']:7.1f} "
              f"{r['peak']:7.1f} {r['steady']:7.1f} {r['anon']:6.1f} {r['file']:6.1f} "
              f"{r['pred']:7.1f} {err:+5.1f}%")
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    if args.fit:
        for mode in modes:
            for malloc in sorted({r["malloc"] for r in rows}):
                sel = [r for r in rows if r["mode"] == mode and r["malloc"] == malloc]
                x = np.array([[r["weights_mb"], r["act_mb"], 1.0] for r in sel])
                y = np.array([r["peak"] - r["idle"] for r in sel])  # idle = the floor
                coef, *_ = np.linalg.lstsq(x, y, rcond=None)
                print(f"fit {mode}/{malloc}: peak - floor = {coef[0]:.3f} * weights + "
                      f"{coef[1]:.3f} * activations + {coef[2]:.1f} MiB")


if __name__ == "__main__":
    main()
