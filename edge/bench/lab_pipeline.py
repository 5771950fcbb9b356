"""Pipelines of N emulated devices against one, each with its coordinator on a board of
its own, measured side by side in the device lab.

On loopback the pipeline's workers share this machine's cores, so a measured pipeline
cannot show what separate boards do. In ``edge lab`` each device gets a CPU quota of its
profile's share of this host, so the devices compute side by side at their emulated speed
without taking cores from each other. Every arm (one device holding the whole model, and
each pipeline) is its own cluster: its workers, and a coordinator process on a board of
its own (``DeviceSpec(role="coordinator")``: its own namespace, link and CPU quota), as a
home lab runs one. A client on this host sends the requests over gRPC, as users do. Rounds
rotate the arms, so that all are measured alike.

Throughput is the steady state: a closed loop keeps ``in_flight`` requests in the arm,
and the rate counts the completions after the pipeline has filled and before it drains
(a block of N requests over S stages otherwise reaches at most N / (N + S - 1) of it).

CPU is read from each process (user + system, all threads): the coordinator's per request
is its whole cost, health checks and event streams included; each worker's per request
is its compute and its gRPC, TLS and Python around it.

A CPU quota emulates a board's throughput, not its per-operation latency: the figures are
"measured in the emulated lab", never "measured on a Pi".
"""

from __future__ import annotations

import logging
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import psutil

from edge.build import make_plan
from edge.coordinator.client import InferClient
from edge.coordinator.direct import DirectClient
from edge.lab.devices import DeviceSpec, LabDevice
from edge.lab.lab import Lab
from edge.lab.system import LabError
from edge.planning.cluster import load_cluster
from edge.transport.security import Security
from edge.worker.launch import module_command, stop_process, wait_port_file

__all__ = ["lab_scaling", "steady_rate", "Arm", "start_arm", "measure_arm", "stop_arms"]

log = logging.getLogger(__name__)

COORDINATOR_PORT = 50050
_READY_S = 180.0  # a coordinator's start: it loads and configures every stage at Pi speed
_IDLE_S = 5.0  # seconds the coordinator's CPU without requests is measured, once an arm


def steady_rate(done: Sequence[float], in_flight: int) -> float:
    """Requests per second in the steady state of a closed loop: between the completion
    of request ``in_flight`` (the arm has filled) and that of the ``in_flight``-th from
    the end (it starts draining).

    Args:
        done: completion times, in seconds, of one block.
        in_flight: requests the loop kept in flight.

    Raises:
        ValueError: fewer than ``2 * in_flight + 2`` completions.
    """
    t = sorted(done)
    lo, hi = in_flight, len(t) - 1 - in_flight
    if hi - lo < 1:
        raise ValueError(f"a steady rate needs at least {2 * in_flight + 2} completions "
                         f"with {in_flight} in flight; got {len(t)}")
    return (hi - lo) / (t[hi] - t[lo])


@dataclass
class Arm:
    """One cluster of a lab comparison: its name, workers, the coordinator's board (None:
    this host), its load, and what was measured of it."""

    name: str
    stages: int
    workers: list[LabDevice]
    board: LabDevice | None
    in_flight: int
    requests: int
    process: subprocess.Popen | None = None
    client: InferClient | None = None
    direct: DirectClient | None = None  # sends the requests, where they skip the coordinator
    rps: list[float] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    latency_via_coordinator_ms: list[float] = field(default_factory=list)  # direct arms
    coordinator_cpu_ms: list[float] = field(default_factory=list)   # per request
    coordinator_idle_ms_per_s: float | None = None  # its CPU without requests
    worker_cpu_ms: list[list[float]] = field(default_factory=list)  # per request, by stage
    per_run: list[float] = field(default_factory=list)  # requests per pipeline run (batch)

    @property
    def sender(self) -> InferClient | DirectClient:
        """What sends the arm's requests: its direct client, else the coordinator's."""
        return self.direct or self.client


def _cpu_s(pid: int) -> float:
    """A process's CPU seconds, all its threads (ended ones included), to the nanosecond:
    Linux's CPU-time clock of that process. psutil's times count 10 ms ticks, which can
    read 0 for a coordinator's block of a dozen small requests."""
    try:
        return time.clock_gettime(((~pid) << 3) | 2)  # MAKE_PROCESS_CPUCLOCK(pid, SCHED)
    except OSError:  # not Linux, or the process is gone
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system


def start_arm(arm: Arm, lab: Lab, plan_dir: Path, workdir: Path, direct: bool = False) -> None:
    """Start the arm's coordinator on its board and connect a client to it (``direct``:
    and a direct client, which sends the requests)."""
    port_file = workdir / f"{arm.name}.port"
    port_file.unlink(missing_ok=True)
    ip = arm.board.ip if arm.board else lab.host_ip
    bundle = lab.bundle(arm.board.name) if arm.board else lab.coordinator_bundle
    cmd = module_command("edge", "coordinator", "--plan", str(plan_dir), "--certs",
                         str(bundle), "--listen", f"{ip}:{COORDINATOR_PORT if arm.board else 0}",
                         "--port-file", str(port_file), "--max-in-flight", "256")
    if arm.board:
        cmd = lab.command(arm.board.name, cmd)
    log_path = workdir / f"{arm.name}-coordinator.log"
    with open(log_path, "ab") as out:
        arm.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        port = wait_port_file(arm.process, port_file, _READY_S,
                              f"the coordinator of {arm.name}", log_path)
    except (RuntimeError, TimeoutError) as e:
        raise LabError(f"{e} (log: {log_path})") from None
    security = Security.from_dir(lab.coordinator_bundle)
    arm.client = InferClient(f"{ip}:{port}", timeout=600, security=security)
    if direct:
        arm.direct = DirectClient(f"{ip}:{port}", timeout=600, security=security)


def stop_arms(arms: Sequence[Arm]) -> None:
    """Close the arms' clients and stop their coordinators."""
    for arm in arms:
        for client in (arm.direct, arm.client):
            if client is not None:
                client.close()
        if arm.process is not None:
            stop_process(arm.process, 10)


def _block(arm: Arm, inputs: Sequence[Mapping[str, np.ndarray]]) -> tuple[float, float]:
    """One closed-loop block: (steady requests per second, seconds it took)."""
    done: list[float] = []
    lock = threading.Lock()
    left = iter(range(arm.requests))
    errors: list[BaseException] = []
    runs: set[str] = set()  # the requests of one batch share its request id

    def loop() -> None:
        while True:
            with lock:
                i = next(left, None)
            if i is None:
                return
            try:
                reply = arm.sender.infer_raw(inputs[i % len(inputs)])
            except BaseException as e:  # said after the block: a failed request is a defect
                errors.append(e)
                return
            with lock:
                done.append(time.perf_counter())
                runs.add(reply.request_id)

    start = time.perf_counter()
    threads = [threading.Thread(target=loop) for _ in range(arm.in_flight)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{arm.name}: {len(errors)} request(s) failed: {errors[0]}")
    arm.per_run.append(len(done) / max(1, len(runs)))
    return steady_rate(done, arm.in_flight), time.perf_counter() - start


def measure_arm(arm: Arm, inputs, latency_requests: int) -> None:
    """Latency one request at a time (an arm with a direct client: each request also
    through the coordinator, in turn), then a throughput block, with the CPU each process
    spent on the block."""
    for x in inputs[:latency_requests]:
        for sender, into in ((arm.sender, arm.latency_ms),
                             (arm.client if arm.direct else None,
                              arm.latency_via_coordinator_ms)):
            if sender is not None:
                t = time.perf_counter()
                sender.infer_raw(x)
                into.append((time.perf_counter() - t) * 1e3)
    pids = [arm.process.pid] + [w.pid for w in arm.workers]
    if arm.coordinator_idle_ms_per_s is None:  # once: what it costs without requests
        t, c = time.perf_counter(), _cpu_s(pids[0])
        time.sleep(_IDLE_S)
        arm.coordinator_idle_ms_per_s = ((_cpu_s(pids[0]) - c) * 1e3
                                         / (time.perf_counter() - t))
    before = [_cpu_s(p) for p in pids]
    rps, _ = _block(arm, inputs)
    used = [(_cpu_s(p) - b) * 1e3 / arm.requests for p, b in zip(pids, before)]
    arm.rps.append(rps)
    arm.coordinator_cpu_ms.append(used[0])
    arm.worker_cpu_ms.append(used[1:])


def _arms(lab: Lab, stage_counts: Sequence[int], coordinator: str | None,
          in_flight: int | None, requests: int, per_stage: int = 2) -> list[Arm]:
    by_name = {d.name: d for d in lab.devices}
    arms = []
    for s in (1, *stage_counts):
        name = _arm_name(s)
        flight = per_stage if s == 1 else (in_flight or per_stage * s)
        arms.append(Arm(name, s, [by_name[f"{name}-{k}"] for k in range(s)],
                         by_name.get(f"{name}-coordinator") if coordinator else None,
                         flight, max(requests if s > 1 else requests // 3, 4 * flight)))
    return arms


def _arm_name(stages: int) -> str:
    """An arm's name, the prefix of its devices' names: "one", "pipe4", ..."""
    return "one" if stages == 1 else f"pipe{stages}"


def _specs(profile: str, stage_counts: Sequence[int], coordinator: str | None
           ) -> list[DeviceSpec]:
    specs = []
    for s in (1, *stage_counts):
        name = _arm_name(s)
        specs += [DeviceSpec(profile, name=f"{name}-{k}") for k in range(s)]
        if coordinator:
            specs.append(DeviceSpec(coordinator, name=f"{name}-coordinator", role="coordinator"))
    return specs


def lab_scaling(model: Path, inputs: Sequence[Mapping[str, np.ndarray]],
                bindings: dict[str, int], profile: str, stage_counts: Sequence[int],
                rounds: int, workdir: Path, coordinator: str | None = None,
                in_flight: int | None = None, requests: int = 48, latency_requests: int = 3,
                host_gflops: float | None = None, per_stage: int = 2, direct: bool = False,
                say: Callable[[str], None] = lambda _: None) -> dict:
    """Throughput, latency and CPU of pipelines of ``stage_counts`` lab devices against
    one lab device holding the whole model, rounds rotating the arms.

    Args:
        model: the ONNX model.
        inputs: requests, used in turn.
        bindings: the sizes to plan for.
        profile: every worker device's profile (its memory cap and CPU share apply).
        stage_counts: the pipelines, e.g. ``(4, 8)``.
        rounds: throughput blocks of each arm.
        workdir: for the plans and the lab's state and caches.
        coordinator: the profile of the board each arm's coordinator runs on (None: on
            this host, uncapped).
        in_flight: a pipeline's requests in flight (default ``per_stage`` per stage); one
            device gets ``per_stage``.
        requests: requests per throughput block of a pipeline (one device: a third), at
            least four times those in flight.
        latency_requests: requests sent one at a time per round, for the latency.
        host_gflops: this host's GFLOP/s, which the quotas are scaled against (default:
            measured as the lab comes up; a busy host measures low and over-provisions).
        per_stage: requests in flight per stage, for every arm. Past two per stage the
            coordinator's slots are full and the requests that wait go as batches
            (``edge coordinator --infer-batch``).
        direct: the client sends the requests to the first stage and hears their results
            from the last (``DirectClient``); the coordinator only tells it the route.

    Returns:
        The measurement, or ``{"status": "unavailable", "reason": ...}`` when the lab
        cannot run here (not root, a lab already up, ...).
    """
    try:
        lab = Lab.up(_specs(profile, stage_counts, coordinator), state_dir=workdir / "lab",
                     cache_dir=workdir / "lab-cache", cluster_file=workdir / "cluster.yaml",
                     gflops=host_gflops)
    except LabError as e:
        return {"status": "unavailable", "reason": str(e)}
    arms = _arms(lab, stage_counts, coordinator, in_flight, requests, per_stage)
    try:
        devs = {d.name: d for d in load_cluster(workdir / "cluster.yaml").devices}
        plans = {}
        for arm in arms:
            plans[arm.name] = make_plan(model, [devs[w.name] for w in arm.workers],
                                        workdir / arm.name, bindings=bindings)
            say(f"lab: starting the coordinator of {arm.name} "
                f"({arm.board.name if arm.board else 'on this host'})")
            start_arm(arm, lab, workdir / arm.name, workdir, direct)
            arm.sender.infer_raw(inputs[0])  # warm up
        for r in range(rounds):
            for arm in arms[r % len(arms):] + arms[:r % len(arms)]:
                measure_arm(arm, inputs, latency_requests)
                say(f"lab round {r}: {arm.name} {arm.rps[-1]:.3f} req/s, coordinator "
                    f"{arm.coordinator_cpu_ms[-1]:.2f} ms CPU a request")
        status = {arm.name: arm.client.status() for arm in arms}
    finally:
        stop_arms(arms)
        lab.down()
    return {**_result(arms, plans, status, lab, profile, coordinator, rounds),
            "requests": "direct to the first stage" if direct else "through the coordinator"}


def _result(arms: list[Arm], plans, status, lab: Lab, profile: str,
            coordinator: str | None, rounds: int) -> dict:
    med = statistics.median
    one = arms[0]
    one_cpu = med(w[0] for w in one.worker_cpu_ms)  # the whole model's CPU per request
    board_cores = next((d.cpu_cores for d in lab.devices if not d.runs_worker), None)
    out: dict = {
        "status": "measured", "profile": profile, "rounds": rounds,
        "coordinator_device": coordinator or "this host (uncapped)",
        "host_gflops": round(lab.host_gflops, 1),
        "one_device": _arm_dict(one, plans[one.name], status[one.name]),
        "pipelines": {},
        "note": "measured in edge lab: CPU quotas scaled to the profile's GFLOP/s emulate "
                "a board's throughput, not its per-operation latency; not measured on a Pi",
    }
    for arm in arms[1:]:
        d = _arm_dict(arm, plans[arm.name], status[arm.name])
        stage_share = one_cpu / arm.stages  # one stage's share of the compute, CPU ms
        coord = med(arm.coordinator_cpu_ms)
        d.update({
            "speedup": round(med(arm.rps) / med(one.rps), 3),
            "speedup_per_round": [round(a / b, 3) for a, b in zip(arm.rps, one.rps)],
            "latency_ratio": round(med(arm.latency_ms) / med(one.latency_ms), 3),
            **({"latency_ratio_via_coordinator": round(
                med(arm.latency_via_coordinator_ms) / med(one.latency_via_coordinator_ms), 3)}
               if arm.direct else {}),
            "coordinator_cpu_share_of_stage": round(coord / stage_share, 4),
            "stages_cpu_ratio": round(sum(med(w[k] for w in arm.worker_cpu_ms)
                                          for k in range(arm.stages)) / one_cpu, 3),
        })
        if board_cores:
            # On the board: CPU time at its quota, i.e. the wall time it takes there.
            d["coordinator_board_ms_per_request"] = round(coord / board_cores, 1)
        out["pipelines"][str(arm.stages)] = d
    return out


def _arm_dict(arm: Arm, plan, status) -> dict:
    med = statistics.median
    return {
        "stages": arm.stages, "in_flight": arm.in_flight, "requests": arm.requests,
        "rps": round(med(arm.rps), 3), "rps_per_round": [round(x, 3) for x in arm.rps],
        "requests_per_run": [round(x, 2) for x in arm.per_run],
        "latency_ms": round(med(arm.latency_ms), 1),
        "latency_ms_each": [round(v, 1) for v in arm.latency_ms],
        **({"latency_via_coordinator_ms_each": [round(v, 1)
                                                for v in arm.latency_via_coordinator_ms]}
           if arm.direct else {}),
        "coordinator_cpu_ms_per_request": round(med(arm.coordinator_cpu_ms), 3),
        "coordinator_idle_cpu_ms_per_s": round(arm.coordinator_idle_ms_per_s or 0.0, 2),
        "worker_cpu_ms_per_request": [round(med(w[k] for w in arm.worker_cpu_ms), 2)
                                      for k in range(arm.stages)],
        "planned_stage_ms": [round(s.predicted.time_ms, 1) for s in plan.stages],
        "modes": [s.mode for s in plan.stages],
        "mean_compute_ms": [round(s.worker.mean_compute_ms, 1) for s in status.stages],
        "peak_rss_mib": [round(s.worker.peak_rss_bytes / 2**20, 1) for s in status.stages],
    }
