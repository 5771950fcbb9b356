"""Does the plan bound a worker's whole life? Planned memory against each worker's peak RSS
(VmHWM since the worker started: upload, load, first run and serving) on CNNs and
transformers split over devices whose memory forces a real split.

For each model: export it (seeded weights, cached in ``--work``), plan it over ``N``
devices of ``M`` MiB each (every stage in ``--modes``), start ``N`` fresh loopback
``edge worker`` processes, upload the shards, let the coordinator configure (load) them,
send one request, then ``--requests`` more with 2 in flight. After each phase every
worker's VmHWM is read from ``/proc/<pid>/status`` (never reset, so the last one is the
peak of its whole life), which tells in which phase the peak came:

- ``upload``, ``load``, ``first``, ``serve``: VmHWM after that phase (MiB),
- ``peak``: VmHWM at the end; ``ratio``: peak / planned,
- ``p50_ms``: median end-to-end latency of the pipeline.

``--speed`` times each stage in-process with the shards' session options and with the
onnxruntime optimizers they disable turned back on (the latency cost of the fix).

``--lab`` runs the same models under ``edge lab`` instead: one emulated device per stage,
each in a cgroup whose memory cap is the plan's budget for it (``memory_mb``), and checks
that no worker is killed for memory (needs root; see edge/lab).

    python benchmarks/load_memory.py --json /tmp/load_memory.json
    python benchmarks/load_memory.py --models unet-wide:4:220 resnet-50:3:120
    python benchmarks/load_memory.py --lab --requests 4
    python benchmarks/load_memory.py --speed   # the latency cost of the disabled optimizers

Needs ``edge[export]`` (torch, transformers) to export the models the first time.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MiB = float(1 << 20)

# KIND-SIZE:DEVICES:MEMORY_MB. The memory is the for the wide UNet; for the others
# a little below what one device fewer would need, so that the model must be split (the
# last stage of GPT-2 and of the Llama, the LM head and its logits, needs about as much
# over 2 devices as over 3: their 3 devices are only a little above it). GPT-2's head
# stage peaks at 357 MiB while its 147 MiB weight is prepacked, so it needs 380 (at 340
# the planner now refuses: no split fits).
DEFAULT_MODELS = [
    "unet-wide:4:220",
    "resnet-50:3:120",
    "convnext-t:3:135",
    "vit-base:4:190",
    "distilbert-base:3:150",
    "gpt2-small:3:380",
    "llama-small:3:210",
]


def _clean(work: Path) -> None:
    """Remove a run's shards, plans, caches and lab state (GBs per model); the exported
    models and the host's measured GFLOP/s stay for the next run."""
    for p in work.iterdir():
        if p.is_dir() and p.name.startswith(("plan-", "load-", "lab-", "tmp")) \
                and p.name != "lab-gflops":
            shutil.rmtree(p, ignore_errors=True)


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile of a process, in MiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) / 1024
    return out


def parse_model(item: str) -> tuple[str, str, int, float]:
    name, devices, memory = (item.split(":") + ["", ""])[:3]
    kind, _, size = name.partition("-")
    return kind, size, int(devices or 4), float(memory or 220)


def bindings_for(kind: str, size: str, seq: int) -> dict[str, int]:
    from edge.export import get_spec

    image = get_spec(kind, size).inputs[0] in ("image", "pixel_values")
    return {"batch": 1, "height": seq, "width": seq} if image else {"batch": 1, "sequence": seq}


def exported(kind: str, size: str, work: Path) -> Path:
    model = work / f"{kind}-{size}.onnx"
    if not model.exists():
        from edge.export import export_model

        export_model(kind, size=size, seed=0, out=model)
    return model


def plan_for(kind: str, size: str, devices: int, memory_mb: float, work: Path,
             addresses: list[str], seq: int, modes: tuple[str, ...], profile: str):
    """Plan the model over ``devices`` devices of ``memory_mb`` at ``addresses``."""
    from edge.build import make_plan
    from edge.planning.cluster import cluster_from_profile

    model = exported(kind, size, work)
    cluster = cluster_from_profile(profile, devices, addresses=addresses)
    devs = [dataclasses.replace(d, memory_mb=memory_mb) for d in cluster.devices]
    out = work / f"plan-{kind}-{size}-{devices}-{memory_mb:g}"
    return make_plan(model, devs, out, bindings=bindings_for(kind, size, seq), modes=modes), out


def run_model(kind: str, size: str, devices: int, memory_mb: float, work: Path, seq: int,
              requests: int, modes: tuple[str, ...], profile: str) -> list[dict]:
    from edge.coordinator.deploy import connect, upload_shard, wait_healthy
    from edge.coordinator.pipeline import Pipeline
    from edge.export import example_inputs
    from edge.transport.channels import Deadlines, Security
    from edge.worker.launch import LocalWorkers

    exported(kind, size, work)  # before the workers start: exporting takes the cores
    x = example_inputs(kind, size, batch=1, seq=seq)
    workers_dir = Path(tempfile.mkdtemp(prefix=f"load-{kind}-{size}-", dir=work))
    with LocalWorkers(devices, workers_dir, device=profile) as workers:
        plan, plan_dir = plan_for(kind, size, devices, memory_mb, work, workers.addresses,
                                  seq, modes, profile)
        pids = [w.process.pid for w in workers.workers]
        phases: dict[str, list[dict]] = {"idle": [proc_status(p) for p in pids]}
        # Upload on handles of our own first, so that the upload and the load are told
        # apart; the pipeline then finds the shards cached.
        for st in plan.stages:
            w = connect(st, Security())
            try:
                wait_healthy(w, Deadlines())
                upload_shard(w, plan_dir, Deadlines())
            finally:
                w.close()
        phases["upload"] = [proc_status(p) for p in pids]
        with Pipeline(plan, plan_dir) as pipeline:
            t = time.perf_counter()
            pipeline.start()
            load_s = time.perf_counter() - t
            phases["load"] = [proc_status(p) for p in pids]
            pipeline.infer(x)
            phases["first"] = [proc_status(p) for p in pids]
            lat = []

            def one(_):
                lat.append(pipeline.infer(x).latency_ms)

            with ThreadPoolExecutor(2) as pool:
                list(pool.map(one, range(requests)))
            phases["serve"] = [proc_status(p) for p in pids]
    rows = []
    features = fit_features(exported(kind, size, work), plan, bindings_for(kind, size, seq))
    for st, i in zip(plan.stages, range(devices)):
        planned = st.predicted.memory_mb
        peak = phases["serve"][i]["VmHWM"]
        rows.append(dict(
            model=f"{kind}-{size}", devices=devices, device_mb=memory_mb, seq=seq,
            stage=st.index, mode=st.mode, node_range=list(st.node_range), **features[i],
            weights_mb=st.predicted.weights_mb, activations_mb=st.predicted.activations_mb,
            planned=planned, idle=phases["idle"][i]["VmRSS"],
            **{ph: phases[ph][i]["VmHWM"] for ph in ("upload", "load", "first", "serve")},
            loaded_anon=phases["load"][i]["RssAnon"], loaded_file=phases["load"][i]["RssFile"],
            end_anon=phases["serve"][i]["RssAnon"], end_file=phases["serve"][i]["RssFile"],
            peak=peak, ratio=peak / planned, load_s=load_s,
            p50_ms=statistics.median(lat) if lat else 0.0))
    return rows


def fit_features(model: Path, plan, bindings: dict[str, int]) -> list[dict]:
    """Per stage, what benchmarks/memory_model.py fits the memory model on (MiB): weights
    read whole and Gather tables at fp32 and int8 size, peak live activations, bytes in
    and out per request, and the runtime floor. With ``peak`` the rows feed
    ``memory_model.py --load ROWS.jsonl --fit``."""
    from edge.planning.graph import analyze
    from edge.planning.planner import _weights_brute

    costs = analyze(model, bindings)
    out = []
    for st in plan.stages:
        i, j = st.node_range
        w = _weights_brute(costs, i, j) / MiB
        out.append(dict(bindings=bindings, whole32=w[0], table32=w[1], whole8=w[2],
                        table8=w[3], act=costs.activation_peak(i, j) / MiB,
                        io=(float(costs.cut_bytes[i]) + float(costs.cut_bytes[j])) / MiB,
                        floor=st.device.runtime_floor_mb))
    return out


def speed(kind: str, size: str, devices: int, memory_mb: float, work: Path, seq: int,
          runs: int, modes: tuple[str, ...], profile: str, threads: int = 2) -> list[dict]:
    """Median in-process run time of every stage with the shards' session options, and
    with onnxruntime's optimizers that they disable (``DISABLED_OPTIMIZERS``) enabled."""
    import onnxruntime as ort

    from edge.export import example_inputs
    from edge.shards.runtime import session_options

    plan, plan_dir = plan_for(kind, size, devices, memory_mb, work,
                              [f"127.0.0.1:{i + 1}" for i in range(devices)], seq, modes,
                              profile)
    cur = example_inputs(kind, size, batch=1, seq=seq)
    rows = []
    for st in plan.stages:
        feeds = {s.name: cur[s.name] for s in st.inputs}
        times, produced = {}, None
        for name in ("shards", "all optimizers"):
            so = session_options(threads, st.mode)
            if name != "shards":
                so.add_session_config_entry("optimization.disable_specified_optimizers", "")
            sess = ort.InferenceSession(str(plan_dir / st.shard), so,
                                        providers=["CPUExecutionProvider"])
            f = {i.name: feeds[i.name] for i in sess.get_inputs()}
            res = sess.run(None, f)
            ts = []
            for _ in range(runs):
                t = time.perf_counter()
                sess.run(None, f)
                ts.append((time.perf_counter() - t) * 1e3)
            times[name] = statistics.median(ts)
            if produced is None:
                produced = dict(zip([o.name for o in sess.get_outputs()], res))
            del sess
        cur = {s.name: produced.get(s.name, feeds.get(s.name)) for s in st.outputs}
        rows.append(dict(model=f"{kind}-{size}", stage=st.index, ms=times["shards"],
                         ms_all_optimizers=times["all optimizers"]))
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| model | devices x MiB | stage | weights | planned | upload | load | first "
            "| serve = peak | peak / plan |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['model']} | {r['devices']} x {r['device_mb']:g} | {r['stage']} | "
                     f"{r['weights_mb']:.1f} | {r['planned']:.1f} | {r['upload']:.1f} | "
                     f"{r['load']:.1f} | {r['first']:.1f} | {r['peak']:.1f} | "
                     f"{r['ratio']:.2f} |")
    return "\n".join(lines)


def lab_run(kind: str, size: str, devices: int, memory_mb: float, work: Path, seq: int,
            requests: int, modes: tuple[str, ...], profile: str,
            cap_scale: float = 1.0) -> list[dict]:
    """The model under ``edge lab``: one emulated ``profile`` device per stage, each in a
    cgroup whose memory cap is ``memory_mb``, the plan's budget for it. Records whether a
    worker died (and the cgroup's OOM kills), the cgroup's peak charge (page cache
    included) and the worker's VmHWM.

    Args:
        cap_scale: caps ``cap_scale * memory_mb`` while the plan keeps ``memory_mb``: a
            worker above its plan then shows its whole peak instead of being killed (for
            fitting the memory model to workers behind mutual TLS, at the device's speed).
    """
    from edge.coordinator.pipeline import Pipeline
    from edge.export import example_inputs
    from edge.lab import DeviceSpec, Lab
    from edge.build import make_plan

    model = exported(kind, size, work)
    x = example_inputs(kind, size, batch=1, seq=seq)
    lab_dir = Path(tempfile.mkdtemp(prefix=f"lab-{kind}-{size}-", dir=work))
    specs = [DeviceSpec(profile, name=f"d{i}", memory_mb=memory_mb * cap_scale)
             for i in range(devices)]
    # The host's GFLOP/s is measured once and kept next to the state folders.
    lab = Lab.up(specs, state_dir=lab_dir / "state", cache_dir=lab_dir / "cache",
                 gflops=_host_gflops(work))
    error = ""
    try:
        out = lab_dir / "plan"
        plan = make_plan(model, [dataclasses.replace(d, memory_mb=memory_mb)
                                 for d in lab.cluster().devices], out,
                         bindings=bindings_for(kind, size, seq), modes=modes)
        try:
            with Pipeline(plan, out, diagnose=lab.diagnose,
                          security=lab.security()) as pipeline:
                pipeline.start()
                with ThreadPoolExecutor(2) as pool:
                    list(pool.map(lambda _: pipeline.infer(x), range(requests)))
        except Exception as e:  # a killed worker fails the run: record why
            error = f"{type(e).__name__}: {e}"
        status = {s.device.name: s for s in lab.status()}
        hwm = {}
        for d in lab.devices:
            try:
                hwm[d.name] = proc_status(d.pid)["VmHWM"]
            except (OSError, TypeError, KeyError):
                hwm[d.name] = None
    finally:
        lab.down()
    rows = []
    features = fit_features(model, plan, bindings_for(kind, size, seq))
    for st in plan.stages:
        s = status[st.device.name]
        rows.append(dict(model=f"{kind}-{size}", devices=devices, device_mb=memory_mb,
                         seq=seq, stage=st.index, mode=st.mode,
                         node_range=list(st.node_range), **features[st.index],
                         planned=st.predicted.memory_mb, cap=memory_mb * cap_scale,
                         alive=s.alive, oom_kills=s.oom_kills, cgroup_peak=s.peak_mb,
                         vmhwm=hwm.get(st.device.name), peak=hwm.get(st.device.name),
                         reason=s.reason, error=error))
    return rows


def _host_gflops(work: Path) -> float:
    from edge.lab.devices import host_gflops

    return host_gflops(work / "lab-gflops")[0]


def lab_markdown(rows: list[dict]) -> str:
    lines = ["| model | devices x cap MiB | stage | planned | worker VmHWM | cgroup peak "
             "| OOM kills | alive |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['devices']} x {r['cap']:g} | {r['stage']} | "
                     f"{r['planned']:.1f} | {r['vmhwm'] or 0:.1f} | {r['cgroup_peak'] or 0:.1f} "
                     f"| {r['oom_kills']} | {'yes' if r['alive'] else 'NO: ' + r['reason']} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS,
                    help="KIND-SIZE:DEVICES:MEMORY_MB")
    ap.add_argument("--modes", nargs="+", default=["fp32"])
    ap.add_argument("--profile", default="rpi4b-2gb")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--seq", type=int, default=0,
                    help="sequence length or image side (0: 64 for unet, 224 for other "
                         "images, 128 for text)")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "edge-load-memory"))
    ap.add_argument("--json", help="write the rows to this JSON file")
    ap.add_argument("--label", default="", help="a label stored with the rows")
    ap.add_argument("--speed", action="store_true",
                    help="time each stage in-process, with and without the optimizers "
                         "the shards disable")
    ap.add_argument("--lab", action="store_true",
                    help="run under `edge lab`, each device capped at its plan budget")
    ap.add_argument("--cap-scale", type=float, default=1.0,
                    help="with --lab: cap each device at this times its plan budget")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.speed:
        print("| model | stage | ms | ms with NCHWc | slower |\n|---|---|---|---|---|")
        for item in args.models:
            kind, size, devices, memory_mb = parse_model(item)
            got = speed(kind, size, devices, memory_mb, work, args.seq or default_seq(kind),
                        7, tuple(args.modes), args.profile)
            for r in got + [dict(model=got[0]["model"], stage="all",
                                 ms=sum(r["ms"] for r in got),
                                 ms_all_optimizers=sum(r["ms_all_optimizers"] for r in got))]:
                print(f"| {r['model']} | {r['stage']} | {r['ms']:.1f} | "
                      f"{r['ms_all_optimizers']:.1f} | "
                      f"{(r['ms'] / r['ms_all_optimizers'] - 1) * 100:+.0f}% |", flush=True)
        return 0
    rows = []
    run = (functools.partial(lab_run, cap_scale=args.cap_scale) if args.lab
           else run_model)
    show = lab_markdown if args.lab else markdown
    for item in args.models:
        kind, size, devices, memory_mb = parse_model(item)
        seq = args.seq or default_seq(kind)
        got = run(kind, size, devices, memory_mb, work, seq, args.requests,
                  tuple(args.modes), args.profile)
        for r in got:
            r["label"] = args.label
        rows += got
        _clean(work)
        print(show(got), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    print()
    print(show(rows))
    if args.lab:
        dead = [r for r in rows if not r["alive"] or r["oom_kills"]]
        print(f"\n{len(dead)} of {len(rows)} workers killed or dead" + "".join(
            f"\n  {r['model']} stage {r['stage']}: {r['reason']} {r['error']}" for r in dead))
        return 1 if dead else 0
    worst = max(rows, key=lambda r: abs(r["ratio"] - 1))
    print(f"\nworst: {worst['model']} stage {worst['stage']}: peak {worst['peak']:.1f} MiB, "
          f"planned {worst['planned']:.1f} MiB ({(worst['ratio'] - 1) * 100:+.1f}%)")
    return 0


def default_seq(kind: str) -> int:
    return {"unet": 64, "resnet": 224, "convnext": 224, "vit": 224}.get(kind, 128)


if __name__ == "__main__":
    sys.exit(main())
