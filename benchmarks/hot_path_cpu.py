"""CPU per request on the hot path: each worker's CPU outside its stage's compute, and the
coordinator's, measured on real processes on loopback (issue 16).

What it does: copies a plan to a work folder with its devices moved to loopback ports,
starts one ``edge worker --threads 1`` per stage and an ``edge coordinator``, all with
mutual TLS from a fresh CA (``--plaintext``: without), warms up, then sends a block of
requests with a few in flight from this process's ``InferClient`` and reads, per process,
the CPU seconds (user + system, psutil) that the block cost.

Per worker, *compute* is the CPU of its busiest thread over the block: the engine's
compute thread, where onnxruntime runs with one thread (its Python around the run
included, a few microseconds). *Overhead* is the rest of the process's CPU: gRPC's
receive and TLS, parsing and checks, encoding and sending, the event stream, metrics,
the memory sampler. The stage's own wall-clock compute (``WorkerStatus.mean_compute_ms``)
is reported beside it; on a machine with fewer cores than processes it includes waits for
a core. The coordinator's CPU is all of its process's. Before the block, each process's
CPU per second without requests is measured too (health checks, event streams, the
memory sampler): that part of a per-request figure grows as throughput falls (on a
Pi 4 a BERT-base stage is ~10x slower than here).

Run (BENCHMARKS.md cites these commands; about a minute each on 2 cores)::

    PYTHONPATH=$PWD python benchmarks/hot_path_cpu.py --plan /path/to/p8 --requests 80 \\
        --in-flight 4
    PYTHONPATH=$PWD python benchmarks/hot_path_cpu.py --plan /path/to/p4 --requests 120 \\
        --rate 2

``--rate R`` sends the measured requests one at a time, R a second, as a pipeline of Pi 4s
gets them: each one finds gRPC's threads asleep. The report then also gives the
coordinator's CPU per second by kind of thread (``python``: Python's threads;
``event_engine``: gRPC's). ``--coordinator-cores C`` (root) runs the coordinator under a
CPU quota of C host cores, in a cgroup of its own, as ``edge lab`` runs a coordinator
board.

``--rates 0,1,3 --seconds 20`` measures phases instead, one per rate, with the same
processes: requests one at a time at that rate (0: none), every figure from each
thread's scheduler time (``/proc/PID/task/TID/schedstat``, nanoseconds), not psutil's 10 ms
ticks. Per phase it gives the coordinator's CPU a second (by kind of thread) and per
request, and a worker's CPU beyond its compute thread a second and per hop. Two rates
separate what a request costs from what a second costs anyway.

``--plan`` is a folder holding ``plan.json`` and its ``shards/`` (e.g. ``edge plan
bert-base.onnx --cluster c8.yaml --out p8``, BERT-base at sequence 128 over 8 rpi4b-2gb).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil

from edge.coordinator.client import InferClient
from edge.coordinator.direct import DirectClient
from edge.lab import cgroups
from edge.transport.certs import init_ca, issue
from edge.transport.channels import Security
from edge.worker.launch import module_command, spawn_worker, stop_process, wait_port_file


def _inputs(plan: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """The model's inputs at the plan's bindings: token ids and a full mask."""
    rng = np.random.default_rng(seed)
    sizes = plan["model"]["bindings"]
    out = {}
    for t in plan["model"]["inputs"]:
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in t["shape"])
        if "mask" in t["name"]:
            out[t["name"]] = np.ones(shape, dtype=t["dtype"])
        else:
            out[t["name"]] = rng.integers(1000, 2000, size=shape).astype(t["dtype"])
    return out


def _copy_plan(src: Path, dst: Path) -> dict:
    """plan.json (its model path made absolute) and links to its shards, in ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    plan = json.loads((src / "plan.json").read_text())
    shards = dst / "shards"
    if not shards.exists():
        shards.symlink_to((src / "shards").resolve(), target_is_directory=True)
    model = plan["model"].get("path")
    if model:  # relative to the plan's folder: point at the original from the copy
        target = (src / model).resolve()
        link = dst / Path(model).name
        if target.exists() and not link.exists():
            link.symlink_to(target)
            for extra in target.parent.glob(target.name + ".*"):
                if not (dst / extra.name).exists():
                    (dst / extra.name).symlink_to(extra)
        plan["model"]["path"] = link.name
    return plan


def _securities(workdir: Path, plaintext: bool) -> tuple[list[str], Security]:
    """The ``--certs`` arguments for the workers and coordinator, and the client's
    Security: one CA, bundles valid for 127.0.0.1."""
    if plaintext:
        return [], Security()
    ca = workdir / "ca"
    init_ca(ca, force=True)
    node = issue(ca, "node", hosts=["127.0.0.1"], out=workdir / "node", force=True)
    client = issue(ca, "client", hosts=["127.0.0.1"], out=workdir / "client", force=True,
                   role="client")
    return ["--certs", str(node)], Security.from_dir(client)


def _start_coordinator(workdir: Path, plan_dir: Path, certs: list[str],
                       group: cgroups.Cgroup | None = None) -> tuple:
    """The coordinator's process and port; in ``group``, if given, from its first
    instruction."""
    port_file = workdir / "coordinator.port"
    port_file.unlink(missing_ok=True)
    log = open(workdir / "coordinator.log", "ab")
    cmd = module_command("edge", "--log-level", "WARNING", "coordinator", "--plan",
                         str(plan_dir), "--listen", "127.0.0.1:0", "--port-file",
                         str(port_file), *certs)
    if group is not None:
        cmd = group.enter_command(cmd)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    return proc, wait_port_file(proc, port_file, 180, "the coordinator",
                                workdir / "coordinator.log")


def _cpu(pid: int) -> tuple[float, dict[int, float]]:
    """A process's CPU seconds (user + system), and each thread's."""
    p = psutil.Process(pid)
    t = p.cpu_times()
    return t.user + t.system, {th.id: th.user_time + th.system_time for th in p.threads()}


def _block(client: InferClient, inputs: dict, count: int, in_flight: int) -> float:
    """Send ``count`` requests, ``in_flight`` at once; returns the seconds it took."""
    start = time.perf_counter()
    with ThreadPoolExecutor(in_flight) as pool:
        for reply in pool.map(lambda _: client.infer_raw(inputs), range(count)):
            if not reply.outputs:
                raise RuntimeError("a reply without outputs")
    return time.perf_counter() - start


def _paced(client: InferClient, inputs: dict, count: int, rate: float) -> float:
    """Send ``count`` requests one at a time, starting one every ``1 / rate`` seconds (as
    clients' requests reach a pipeline of Pi-class boards); returns the seconds it took."""
    start = time.perf_counter()
    for i in range(count):
        if not client.infer_raw(inputs).outputs:
            raise RuntimeError("a reply without outputs")
        time.sleep(max(0.0, start + (i + 1) / rate - time.perf_counter()))
    return time.perf_counter() - start


def _stage_stats(client: InferClient) -> dict[int, tuple[int, float]]:
    """Per stage: requests done and their total wall-clock compute ms."""
    out = {}
    for s in client.status().stages:
        w = s.worker
        out[s.stage] = (w.requests_done, w.mean_compute_ms * w.requests_done)
    return out


@contextlib.contextmanager
def _pipeline(plan_src: Path, workdir: Path, plaintext: bool, threads: int,
              profile: str | None, coordinator_cores: float = 0.0, direct: bool = False):
    """Start a worker per stage and the coordinator; yields ``(plan, client, inputs,
    coordinator process, workers, direct client or None)``; stops them all on the way out.

    ``coordinator_cores`` > 0 runs the coordinator under that CPU quota (host cores, in a
    cgroup of its own: root only), as ``edge lab`` runs a coordinator board."""
    plan_dir = workdir / "plan"
    plan = _copy_plan(plan_src, plan_dir)
    certs, client_security = _securities(workdir, plaintext)
    stages = plan["stages"]
    workers, coordinator, group = [], None, None
    try:
        if coordinator_cores > 0:
            group = cgroups.detect().create(f"edge-hotpath-{os.getpid()}")
            group.limit_cpu(cgroups.cpu_quota(coordinator_cores, os.cpu_count() or 1))
        for st in stages:
            workers.append(spawn_worker(workdir, f"worker-{st['index']}",
                                        profile or st["device"]["profile"], threads=threads,
                                        extra_args=certs))
        for st, w in zip(stages, workers):
            st["device"]["address"] = w.address
        for st in plan.get("standby") or []:
            st["address"] = f"127.0.0.1:{_free_port()}"  # never answers: not in use
        (plan_dir / "plan.json").write_text(json.dumps(plan, indent=1))
        coordinator, port = _start_coordinator(workdir, plan_dir, certs, group)
        client = InferClient(f"127.0.0.1:{port}", timeout=300, security=client_security)
        direct_client = (DirectClient(f"127.0.0.1:{port}", timeout=300,
                                      security=client_security) if direct else None)
        try:
            yield plan, client, _inputs(plan), coordinator, workers, direct_client
        finally:
            client.close()
            if direct_client is not None:
                direct_client.close()
    finally:
        if coordinator is not None:
            stop_process(coordinator, 10)
        for w in workers:
            w.stop()
        if group is not None:
            for d in group.dirs:
                cgroups.remove_dir(d)


def measure(plan_src: Path, workdir: Path, requests: int, in_flight: int, warmup: int,
            plaintext: bool, threads: int, profile: str | None,
            idle_seconds: float = 5.0, rate: float = 0.0,
            coordinator_cores: float = 0.0) -> dict:
    """Start the processes, run a warm-up and a measured block, stop them; the report."""
    with _pipeline(plan_src, workdir, plaintext, threads, profile,
                   coordinator_cores) as (plan, client, inputs, coordinator, workers, _):
        _block(client, inputs, warmup, in_flight)
        pids = [w.process.pid for w in workers] + [coordinator.pid]
        idle = _idle_cpu(pids, idle_seconds)
        before_stats = _stage_stats(client)
        before = [_cpu(pid) for pid in pids]
        named = _run_ns(coordinator.pid)
        seconds = (_paced(client, inputs, requests, rate) if rate > 0
                   else _block(client, inputs, requests, in_flight))
        after = [_cpu(pid) for pid in pids]
        by_kind = _by_kind(named, _run_ns(coordinator.pid), seconds)
        after_stats = _stage_stats(client)
    report = _report(plan, requests, 1 if rate > 0 else in_flight, seconds, plaintext,
                     threads, before, after, before_stats, after_stats, idle)
    report["paced_rate_rps"] = rate if rate > 0 else None
    report["coordinator_quota_cores"] = coordinator_cores or None
    report["coordinator_threads_cpu_ms_per_s"] = by_kind
    return report


def measure_rates(plan_src: Path, workdir: Path, rates: list[float], seconds: float,
                  warmup: int, plaintext: bool, threads: int, profile: str | None,
                  coordinator_cores: float = 0.0, direct: bool = False) -> dict:
    """One set of processes, a phase of ``seconds`` per rate in ``rates`` (requests one at
    a time, that many a second; 0: none), all read from each thread's scheduler time.
    ``direct``: each rate above 0 twice, through the coordinator, then from a direct
    client (``DirectClient``: the coordinator only routes), side by side.

    Per phase: the coordinator's CPU a second, by kind of thread, and per request; a
    worker's CPU beyond its compute thread (its busiest over all phases), a second and per
    hop. Between
    two rates, the difference gives what a request costs and what a second costs anyway
    (no health checks run while requests flow, so the phase at 0 is not that)."""
    readings, paths_run = [], []
    with _pipeline(plan_src, workdir, plaintext, threads, profile, coordinator_cores,
                   direct) as (plan, client, inputs, coordinator, workers, direct_client):
        _block(client, inputs, warmup, 1)
        if direct_client is not None:
            _block(direct_client, inputs, warmup, 1)
        pids = [w.process.pid for w in workers] + [coordinator.pid]
        start_ns = [_run_ns(pid) for pid in pids[:-1]]
        paths = [("coordinator", client)] + ([("direct", direct_client)] if direct else [])
        for rate, (path, sender) in ((r, p) for r in rates for p in paths[:1 if r <= 0 else 2]):
            before = [_run_ns(pid) for pid in pids]
            start = time.perf_counter()
            count = round(rate * seconds)
            if count:
                _paced(sender, inputs, count, rate)
            else:
                time.sleep(seconds)
            elapsed = time.perf_counter() - start
            readings.append((rate, count, elapsed, before, [_run_ns(pid) for pid in pids]))
            paths_run.append(path)
        # Each worker's compute thread: its busiest over all the phases.
        computes = [max(end, key=lambda k: end[k] - first.get(k, 0))
                    for first, end in zip(start_ns, readings[-1][4][:-1])]
    phases = [{"requests": path, **_phase(*r, computes)}
              for path, r in zip(paths_run, readings)]
    return {"benchmark": "hot_path_cpu", "mode": "rates",
            "model": plan["model"]["name"], "stages": len(plan["stages"]),
            "security": "plaintext" if plaintext else "mutual TLS",
            "coordinator_quota_cores": coordinator_cores or None,
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "phases": phases}


def _phase(rate: float, count: int, elapsed: float, before: list, after: list,
           computes: list) -> dict:
    """The figures of one phase of ``measure_rates`` (the last process is the
    coordinator; ``computes``: each worker's compute thread, as ``_run_ns`` keys it)."""
    overheads = []
    for b, a, compute in zip(before[:-1], after[:-1], computes):
        overheads.append(sum(ns - b.get(key, 0) for key, ns in a.items()
                             if key != compute) / 1e6 / elapsed)
    kinds = _by_kind(before[-1], after[-1], elapsed)
    total = sum(kinds.values())
    worker = sum(overheads) / len(overheads)
    achieved = count / elapsed
    return {"rate_rps": rate, "achieved_rps": round(achieved, 3),
            "coordinator_cpu_ms_per_s": round(total, 2),
            "coordinator_cpu_ms_per_request": round(total / achieved, 3) if count else None,
            "coordinator_threads_cpu_ms_per_s": kinds,
            "worker_overhead_cpu_ms_per_s": round(worker, 2),
            "worker_overhead_cpu_ms_per_hop": round(worker / achieved, 3) if count else None}


def _idle_cpu(pids: list[int], seconds: float) -> list[float]:
    """Each process's CPU ms per second while no request runs: its health checks, event
    streams, samplers (what it costs per request grows as throughput falls). From each
    thread's scheduler run time (ns), not the process's clock ticks: over a few seconds
    ticks of 10 ms are too coarse."""
    if seconds <= 0:
        return [0.0] * len(pids)
    before = [_run_ns(pid) for pid in pids]
    time.sleep(seconds)
    after = [_run_ns(pid) for pid in pids]
    return [sum(a.get(t, 0) - b.get(t, 0) for t in a) / 1e6 / seconds
            for a, b in zip(after, before)]


def _run_ns(pid: int) -> dict[tuple[str, str], int]:
    """Nanoseconds each live thread of ``pid`` has run (``/proc/PID/task/TID/schedstat``),
    by ``(TID, name)`` (the kernel's name of the thread: ``python`` for Python's threads,
    ``event_engine`` for gRPC's EventEngine)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                out[(tid, name)] = int(f.read().split()[0])
        except OSError:
            pass  # ended meanwhile
    return out


def _by_kind(before: dict[tuple[str, str], int], after: dict[tuple[str, str], int],
             seconds: float) -> dict[str, float]:
    """CPU ms per second between two ``_run_ns`` readings, summed by thread name."""
    out: dict[str, float] = {}
    for key, ns in after.items():
        name = key[1]
        out[name] = out.get(name, 0.0) + (ns - before.get(key, 0)) / 1e6 / seconds
    return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v > 0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _report(plan, requests, in_flight, seconds, plaintext, threads, before, after,
            before_stats, after_stats, idle) -> dict:
    per_worker = []
    for i, ((c0, t0), (c1, t1)) in enumerate(zip(before[:-1], after[:-1])):
        deltas = {tid: t1[tid] - t0.get(tid, 0.0) for tid in t1}
        busiest = max(deltas.values())
        done = after_stats[i][0] - before_stats[i][0]
        wall_ms = after_stats[i][1] - before_stats[i][1]
        total = (c1 - c0) * 1e3 / requests
        compute = busiest * 1e3 / requests
        per_worker.append({
            "stage": i, "requests": done,
            "cpu_ms_per_request": round(total, 3),
            "compute_thread_cpu_ms_per_request": round(compute, 3),
            "compute_wall_ms_per_request": round(wall_ms / done, 3) if done else None,
            "overhead_cpu_ms_per_request": round(total - compute, 3),
            "threads_with_cpu": sum(1 for d in deltas.values() if d > 0),
            "idle_cpu_ms_per_s": round(idle[i], 2),
        })
    c0, c1 = before[-1][0], after[-1][0]
    overheads = [w["overhead_cpu_ms_per_request"] for w in per_worker]
    computes = [w["compute_thread_cpu_ms_per_request"] for w in per_worker]
    return {
        "benchmark": "hot_path_cpu",
        "model": plan["model"]["name"], "bindings": plan["model"]["bindings"],
        "stages": len(plan["stages"]), "security": "plaintext" if plaintext else "mutual TLS",
        "threads": threads, "requests": requests, "in_flight": in_flight,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "throughput_rps": round(requests / seconds, 3),
        "coordinator_cpu_ms_per_request": round((c1 - c0) * 1e3 / requests, 3),
        # Of it, what the coordinator spends anyway, idle, over the block's duration.
        "coordinator_idle_cpu_ms_per_s": round(idle[-1], 2),
        "coordinator_idle_share_ms_per_request": round(idle[-1] * seconds / requests, 3),
        "worker_overhead_cpu_ms_per_request": {
            "mean": round(sum(overheads) / len(overheads), 3),
            "max": round(max(overheads), 3)},
        "stage_compute_cpu_ms_per_request_mean": round(sum(computes) / len(computes), 3),
        "workers": per_worker,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", required=True, type=Path,
                        help="folder with plan.json and shards/ (its devices' addresses are "
                             "replaced by loopback ports in a copy)")
    parser.add_argument("--requests", type=int, default=40, help="measured requests")
    parser.add_argument("--in-flight", type=int, default=4, help="requests sent at once")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="send the measured requests one at a time, this many a second "
                             "(0: --in-flight at once, back to back)")
    parser.add_argument("--rates", help="instead of one block: phases at these rates, one "
                        "request at a time (e.g. 0,1,3; 0: no requests), --seconds each")
    parser.add_argument("--seconds", type=float, default=20.0, help="of each --rates phase")
    parser.add_argument("--direct", action="store_true",
                        help="with --rates: each rate also from a direct client, which sends "
                             "to the first stage and hears the last (the coordinator routes)")
    parser.add_argument("--warmup", type=int, default=8, help="requests before measuring")
    parser.add_argument("--idle-seconds", type=float, default=5.0,
                        help="seconds without requests in which each process's idle CPU "
                             "is measured (0: not measured)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads per worker")
    parser.add_argument("--device", help="the workers' device profile (default: the plan's)")
    parser.add_argument("--plaintext", action="store_true",
                        help="no TLS (default: mutual TLS from a fresh CA, like the lab)")
    parser.add_argument("--coordinator-cores", type=float, default=0.0,
                        help="run the coordinator under a CPU quota of this many host cores, "
                             "as edge lab runs a coordinator board (root; e.g. 0.116: a "
                             "rpi4b at 190 host GFLOP/s); 0: uncapped")
    parser.add_argument("--workdir", type=Path,
                        help="logs, caches and the plan's copy (default: a temporary folder)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="edge-hotpath-"))
    try:
        if args.rates:
            report = measure_rates(args.plan.resolve(), workdir,
                                   [float(r) for r in args.rates.split(",")], args.seconds,
                                   args.warmup, args.plaintext, args.threads, args.device,
                                   args.coordinator_cores, args.direct)
        else:
            report = measure(args.plan.resolve(), workdir, args.requests, args.in_flight,
                             args.warmup, args.plaintext, args.threads, args.device,
                             args.idle_seconds, args.rate, args.coordinator_cores)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
