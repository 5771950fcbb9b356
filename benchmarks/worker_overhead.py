"""Where a live worker's memory goes: peak RSS per stage of real loopback `edge worker`
processes, split into the load phase and the serving phase, against the same shard run in
a bare process with the worker's imports.

For each mode, a model is planned with every stage forced into that mode (plans and the
exported model are cached in ``--work``), deployed on fresh workers (empty shard caches),
and driven with ``--requests`` requests, ``--concurrency`` in flight. Each worker's kernel
counters are read from ``/proc/<pid>/status``, and its VmHWM is reset between phases
(``/proc/<pid>/clear_refs``), so each phase's peak is its own:

- ``idle``: RSS before anything,
- ``upld``: VmHWM while the shards are uploaded,
- ``load``: VmHWM while Configure loads them; ``loaded``: RSS right after,
- ``serve``: VmHWM while serving,
- ``PEAK``: the largest of the three (what ``edge profile`` reports),
- ``anon`` / ``file``: RssAnon / RssFile at the end,
- ``bare-*``: with ``--bare``, the same shard in a fresh process that imports the worker,
  loads the stage with :class:`edge.worker.stage.StageRunner` and runs the same requests
  one after another (its load peak, its peak, its anonymous RSS at the end).

``--smaps DIR`` keeps every worker's ``/proc/<pid>/smaps`` after load and at the end.

    python benchmarks/worker_overhead.py --work /tmp/edge-memory-model --modes fp32 int8
    python benchmarks/worker_overhead.py --env MALLOC_ARENA_MAX=2 --bare   # an experiment

Needs ``edge[export]`` (torch) to export the model the first time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

MiB = float(1 << 20)



def _dump_smaps(smaps_dir, pids, name: str) -> None:
    """Copy each worker's /proc/PID/smaps to ``smaps_dir/<name>.smaps`` (``{i}``: its index)."""
    if not smaps_dir:
        return
    Path(smaps_dir).mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(pids):
        Path(smaps_dir, name.format(i=i) + ".smaps").write_text(
            Path(f"/proc/{p}/smaps").read_text())

def proc_status(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile of a process, in MiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "Threads"):
                v = int(line.split()[1])
                out[key] = v if key == "Threads" else v / 1024
    return out


def reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux ``clear_refs`` 5)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def build(kind: str, size: str, devices: int, mode: str, work: Path, profile: str,
          seq: int):
    """The exported model and a plan with every stage in ``mode`` (cached in ``work``)."""
    from edge.build import make_plan
    from edge.planning.cluster import cluster_from_profile
    from edge.planning.plan import load_plan

    model = work / f"{kind}-{size}.onnx"
    if not model.exists():
        from edge.export import export_model

        export_model(kind, size=size, seed=0, out=model)
    out = work / f"overhead-{kind}-{size}-{devices}-{mode}"
    if (out / "plan.json").exists():
        return load_plan(out / "plan.json"), out
    cluster = cluster_from_profile(profile, devices,
                                   addresses=[f"127.0.0.1:{i + 1}" for i in range(devices)])
    bindings = {"batch": 1, "sequence": seq}
    return make_plan(model, cluster.devices, out, bindings=bindings, modes=(mode,)), out


def with_addresses(plan, addresses):
    stages = tuple(dataclasses.replace(s, device=dataclasses.replace(s.device, address=a))
                   for s, a in zip(plan.stages, addresses))
    return dataclasses.replace(plan, stages=stages)


def stage_inputs(plan, plan_dir: Path, x: dict[str, np.ndarray]) -> list[dict]:
    """Each stage's inputs, computed by running the shards in this process."""
    import onnxruntime as ort

    cur, out = dict(x), []
    for st in plan.stages:
        feeds = {s.name: cur[s.name] for s in st.inputs}
        out.append(feeds)
        sess = ort.InferenceSession(str(plan_dir / st.shard), providers=["CPUExecutionProvider"])
        res = sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})
        produced = dict(zip([o.name for o in sess.get_outputs()], res))
        cur = {s.name: produced.get(s.name, feeds.get(s.name)) for s in st.outputs}
        del sess
    return out


_BARE = textwrap.dedent("""
    import sys, time, numpy as np
    from pathlib import Path
    from edge.profiling.memory import tune_malloc, release_free_heap
    tune_malloc()
    import edge.worker.server  # the worker's imports: grpc, onnxruntime, numpy, psutil
    from edge.planning.plan import load_plan
    from edge.worker.stage import StageRunner, StageSpec
    def status():
        out = {}
        for line in open("/proc/self/status"):
            k = line.split(":", 1)[0]
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[k] = int(line.split()[1]) / 1024
        return out
    plan_dir, index, inputs, requests = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    idle = status()
    st = load_plan(plan_dir / "plan.json").stages[index]
    spec = StageSpec(stage=index, num_stages=2, shard_sha256="", inputs=st.inputs,
                     outputs=st.outputs, next_address="x", epoch=0, plan_id="",
                     data_files=tuple((f.name, f.sha256, f.random_access) for f in st.data_files),
                     mode=st.mode)
    from edge.worker.cache import drop_page_cache
    for f in [st.shard] + [f.path for f in st.data_files]:
        drop_page_cache(plan_dir / f)  # as the worker does after an upload
    runner = StageRunner(spec, plan_dir / st.shard)
    release_free_heap()
    load = status()
    x = dict(np.load(inputs))
    for _ in range(requests):
        runner.run(x)
    end = status()
    import os
    if os.environ.get("BARE_SMAPS"):
        Path(os.environ["BARE_SMAPS"]).write_text(open("/proc/self/smaps").read())
    print(idle["VmRSS"], load["VmHWM"], load["VmRSS"], end["VmHWM"], end["RssAnon"],
          end["RssFile"])
""")


def bare(plan_dir: Path, index: int, inputs: dict, requests: int, env: dict) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".npz", delete=False) as f:
        np.savez(f, **inputs)
    try:
        out = subprocess.run([sys.executable, "-c", _BARE, str(plan_dir), str(index), f.name,
                              str(requests)], capture_output=True, text=True, check=True,
                             env={**os.environ, **env})
    finally:
        os.unlink(f.name)
    idle, load, loaded, peak, anon, file = map(float, out.stdout.split())
    return dict(idle=idle, load=load, loaded=loaded, peak=peak, anon=anon, file=file)


def run_mode(kind: str, size: str, devices: int, mode: str, work: Path, profile: str,
             requests: int, seq: int, env: dict, do_bare: bool,
             smaps_dir: str | None = None, concurrency: int = 2) -> list[dict]:
    from edge.coordinator.deploy import connect, upload_shard, wait_healthy
    from edge.coordinator.pipeline import Pipeline
    from edge.export import example_inputs
    from edge.transport.channels import Deadlines, Security
    from edge.worker.launch import LocalWorkers

    plan, plan_dir = build(kind, size, devices, mode, work, profile, seq)
    x = example_inputs(kind, size, batch=1, seq=seq)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        workers_dir = Path(tempfile.mkdtemp(prefix=f"overhead-{mode}-", dir=work))
        with LocalWorkers(devices, workers_dir, device=profile) as workers:
            pids = [w.process.pid for w in workers.workers]
            time.sleep(0.5)
            idle = [proc_status(p) for p in pids]
            plan = with_addresses(plan, workers.addresses)
            # Upload first, on handles of our own, so that the upload and the load are
            # measured apart; the pipeline then finds the shards cached.
            t = time.perf_counter()
            for st in plan.stages:
                w = connect(st, Security())
                try:
                    wait_healthy(w, Deadlines())
                    upload_shard(w, plan_dir, Deadlines())
                finally:
                    w.close()
            time.sleep(0.3)
            uploaded = [proc_status(p) for p in pids]
            for p in pids:
                reset_peak(p)
            with Pipeline(plan, plan_dir) as pipeline:
                pipeline.start()
                deploy_s = time.perf_counter() - t
                time.sleep(0.3)
                loaded = [proc_status(p) for p in pids]
                _dump_smaps(smaps_dir, pids, f"{mode}-{{i}}-loaded")
                for p in pids:
                    reset_peak(p)
                lat = []

                def one(_):
                    r = pipeline.infer(x)
                    lat.append(r.latency_ms)

                t = time.perf_counter()
                with ThreadPoolExecutor(concurrency) as pool:
                    list(pool.map(one, range(requests)))
                elapsed = time.perf_counter() - t
                time.sleep(0.3)
                served = [proc_status(p) for p in pids]
                _dump_smaps(smaps_dir, pids, f"{mode}-{{i}}")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    rows = []
    ins = stage_inputs(plan, plan_dir, x) if do_bare else [None] * devices
    for i in range(devices):
        row = dict(mode=mode, stage=i, idle=idle[i]["VmRSS"], upload=uploaded[i]["VmHWM"],
                   rss_uploaded=uploaded[i]["VmRSS"], load=loaded[i]["VmHWM"],
                   rss_loaded=loaded[i]["VmRSS"], anon_loaded=loaded[i]["RssAnon"],
                   file_loaded=loaded[i]["RssFile"], serve=served[i]["VmHWM"],
                   peak=max(uploaded[i]["VmHWM"], loaded[i]["VmHWM"], served[i]["VmHWM"]),
                   anon=served[i]["RssAnon"],
                   file=served[i]["RssFile"] + served[i].get("RssShmem", 0),
                   threads=served[i]["Threads"], rps=requests / elapsed,
                   p50_ms=statistics.median(lat), deploy_s=deploy_s)
        if do_bare:
            benv = dict(env)
            if smaps_dir:
                benv["BARE_SMAPS"] = str(Path(smaps_dir, f"{mode}-{i}-bare.smaps"))
            row["bare"] = bare(plan_dir, i, ins[i], requests, benv)
        rows.append(row)
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'mode':>5} {'st':>2} {'idle':>6} {'upld':>6} {'load':>6} {'loaded':>6} "
          f"{'serve':>6} {'PEAK':>6} {'anon':>6} "
          f"{'file':>5} {'thr':>4} {'bare-load':>9} {'bare-peak':>9} {'bare-anon':>9} "
          f"{'rps':>5} {'p50ms':>6}")
    for r in rows:
        b = r.get("bare") or {}
        print(f"{r['mode']:>5} {r['stage']:>2} {r['idle']:6.1f} {r['upload']:6.1f} "
              f"{r['load']:6.1f} {r['rss_loaded']:6.1f} "
              f"{r['serve']:6.1f} {r['peak']:6.1f} {r['anon']:6.1f} {r['file']:5.1f} "
              f"{r['threads']:>4} {b.get('load', 0):9.1f} {b.get('peak', 0):9.1f} "
              f"{b.get('anon', 0):9.1f} {r['rps']:5.2f} {r['p50_ms']:6.0f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bert-base:4", help="KIND-SIZE:DEVICES")
    ap.add_argument("--modes", nargs="+", default=["fp32", "int8"])
    ap.add_argument("--profile", default="rpi4b-2gb")
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=2, help="requests in flight")
    ap.add_argument("--repeat", type=int, default=1, help="runs per mode")
    ap.add_argument("--env", nargs="*", default=[], help="K=V set in the workers' environment")
    ap.add_argument("--bare", action="store_true", help="also run each shard in a bare process")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "edge-memory-model"))
    ap.add_argument("--smaps", help="save each worker's /proc/<pid>/smaps here at the end")
    ap.add_argument("--json", help="append the rows to this JSON-lines file")
    ap.add_argument("--label", default="", help="a label stored with the rows")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = dict(kv.split("=", 1) for kv in args.env)
    name, _, n = args.model.partition(":")
    kind, _, size = name.partition("-")
    rows = []
    for _ in range(args.repeat):
        for mode in args.modes:
            rows += run_mode(kind, size, int(n or 4), mode, work, args.profile, args.requests,
                             args.seq, env, args.bare, args.smaps, args.concurrency)
    print(f"{args.model} {args.label} env={env} (MiB; load/serve: VmHWM of each phase)")
    print_rows(rows)
    for mode in args.modes:
        sel = [r for r in rows if r["mode"] == mode]
        print(f"{mode}: max peak {max(r['peak'] for r in sel):.1f} MiB, mean peak "
              f"{statistics.fmean(r['peak'] for r in sel):.1f} MiB")
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(dict(r, label=args.label, env=env)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
