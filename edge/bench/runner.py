"""One `edge bench` run: every comparison side by side, in one process, on one machine.

The run:

1. exports the model with seeded weights and plans it for 1 device (the baseline), for the
   cluster's device count and for each scaling count, each on fresh loopback workers;
2. splits the same torch model at the same layer boundaries and starts the torch ranks;
3. alternates, for ``rounds`` rounds, between every edge deployment and the torch peer
   (rotating who goes first), so machine noise hits all of them alike: latency request
   by request across all of them in turn, then a throughput block of each (all requests
   in flight; torch: one GPipe step of that many microbatches);
4. checks that torch and edge compute the same outputs, reads every process's peak RSS;
5. measures one hop for a 384 KiB activation on loopback and on a shaped gigabit link;
6. writes ``bench.json``, ``bench.md``, ``timeline.png`` and ``scaling.png``.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime

from edge.bench import hop
from edge.bench.lab_pipeline import lab_scaling
from edge.bench.measure import Deployment, start_workers, summary
from edge.bench.modelled import modelled_pipeline
from edge.bench.report import write_results
from edge.bench.split import layer_splits
from edge.bench.timeline import (NEEDED_FOR_EXACT, from_timestamps, overlap_ms, reconstruct,
                                 render)
from edge.build import make_plan
from edge.console import stage_layers
from edge.errors import ConfigError, NoFitError
from edge.export import example_inputs, export_model, sizes
from edge.planning.cluster import cluster_from_profile, load_profile
from edge.profiling.calibrate import measure_gflops
from edge.profiling.memory import device_facts, tune_malloc

__all__ = ["BenchConfig", "run_bench", "parse_model", "parse_devices", "TARGETS"]

log = logging.getLogger(__name__)

# The targets of issue 5, item 4, and issue 16 (the lab's, with the coordinator on a board).
TARGETS = {
    "pipeline_vs_one_device_throughput": 3.2,   # ≥, 4 stages vs one device of the class
    "lab_speedup": {4: 3.6, 8: 6.8},            # ≥, N stages vs one, coordinator on a board
    "coordinator_cpu_share_of_stage": 0.05,     # ≤, its CPU per request ÷ a stage's compute
    "latency_ratio": 1.10,                      # ≤, one request over 4 stages ÷ one device
    "edge_vs_torch_peak_rss": 0.5,              # ≤, per device
    "edge_vs_torch_throughput": 1.0,            # ≥
    "hop_gige_ms": 5.0,                         # ≤, 384 KiB over gigabit
}
# TCP goodput of gigabit Ethernet (the rpi4b profiles' bandwidth_mbps): 384 KiB take 3.3 ms.
_GIGE_GOODPUT_MBPS = 940.0


@dataclass(frozen=True)
class BenchConfig:
    """What ``edge bench`` runs.

    Attributes:
        model: ``bert-<size>``: ``bert-tiny``, ``bert-small`` or ``bert-base``.
        profile: the device profile of every device.
        devices: how many devices the compared pipeline has.
        out: folder for the results.
        requests: requests per measurement (one at a time, and then all in flight; the
            torch peer gets them as that many microbatches).
        rounds: how many times every configuration is measured, alternating.
        scaling: device counts of the scaling comparison.
        sequence: tokens per request.
        seed: weight seed (both edge's ONNX and torch's model).
        lab: measure the hop on a gigabit link shaped by ``edge.lab``, and pipelines
            against one device on CPU-capped lab devices (needs root).
        lab_stages: the pipelines of the lab comparison (each against one device).
        lab_coordinator: the profile of the board each lab arm's coordinator runs on
            (None: this host, uncapped).
        lab_direct: the lab's clients send to the first stage and hear the last
            (``DirectClient``); the coordinators only route.
        lab_requests: requests per throughput block of a lab pipeline (steady state: the
            filling and draining are left out).
        lab_rounds: throughput blocks of each in the lab comparison.
        hop_rounds: request pairs of each hop measurement.
        gflops_seconds: how long this host's speed is measured, in all (a share in each
            round, so that it meets the same neighbours as the stage times it scales).
        workdir: keep the model, plans and logs here (default: a temporary folder).
        command: the command line, for the report.
    """

    model: str = "bert-base"
    profile: str = "rpi4b-2gb"
    devices: int = 4
    out: str = "results"
    requests: int = 16
    rounds: int = 3
    scaling: tuple[int, ...] = (2, 4, 8)
    sequence: int = 128
    seed: int = 0
    lab: bool = True
    lab_stages: tuple[int, ...] = (4, 8)
    lab_coordinator: str | None = "rpi4b-2gb"
    lab_direct: bool = False
    lab_requests: int = 48
    lab_rounds: int = 2
    hop_rounds: int = 100
    gflops_seconds: float = 3.0
    workdir: str | None = None
    command: str = ""

    @staticmethod
    def quick(**overrides) -> "BenchConfig":
        """Small and fast (< 60 s): BERT-small, few requests, one round."""
        base = dict(model="bert-small", requests=4, rounds=1, hop_rounds=20,
                    gflops_seconds=0.5, lab_stages=(2,), lab_requests=12, lab_rounds=1)
        return BenchConfig(**{**base, **overrides})


def parse_model(text: str) -> tuple[str, str]:
    """``bert-base`` -> ``("bert", "base")``.

    Raises:
        ConfigError: not ``bert-<size>`` with a size edge.export knows.
    """
    kind, _, size = text.partition("-")
    if kind != "bert" or size not in sizes("bert"):
        raise ConfigError(f"--model: expected bert-{{{','.join(sizes('bert'))}}} (the torch "
                          f"peer splits BERT's encoder layers), got {text!r}")
    return kind, size


def parse_devices(text: str) -> tuple[str, int]:
    """``rpi4b-2gb:4`` -> ``("rpi4b-2gb", 4)``; a bare profile means one device.

    Raises:
        ConfigError: not ``PROFILE[:COUNT]`` with COUNT >= 1, or an unknown profile.
    """
    profile, sep, count = text.rpartition(":")
    if not sep:
        profile, count = text, "1"
    if not profile or not count.isdigit() or int(count) < 1:
        raise ConfigError(f"--devices: expected PROFILE:COUNT with COUNT >= 1, got {text!r}")
    load_profile(profile)  # names the known profiles if it is not one
    return profile, int(count)


# ---------------------------------------------------------------------- the run


def run_bench(config: BenchConfig, say: Callable[[str], None] | None = None) -> dict:
    """Run every comparison and write the results into ``config.out``.

    Args:
        config: what to run.
        say: called with a line of progress for people (default: log it).

    Returns:
        The results (also ``bench.json``), with ``files`` naming what was written.
    """
    say = say or log.info
    tune_malloc()  # as `edge demo` and the coordinator: fast activation encoding
    _, size = parse_model(config.model)
    tmp = None
    if config.workdir:
        work = Path(config.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="edge-bench-")
        work = Path(tmp)
    started = time.time()
    try:
        result = _run(config, size, work, say)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result["duration_s"] = round(time.time() - started, 1)
    result["files"] = {k: str(v) for k, v in write_results(result, Path(config.out)).items()}
    return result


def _run(config: BenchConfig, size: str, work: Path, say: Callable[[str], None]) -> dict:
    # torch_peer imports torch: only a run that compares with it loads it.
    from edge.bench.torch_peer import TorchPeer, save_stages

    profile = load_profile(config.profile)
    counts = sorted({1, config.devices, *config.scaling})
    say(f"exporting {config.model} (seed {config.seed})")
    # verify=False: the torch peer's outputs are compared with edge's below, which checks
    # the export and the sharding together.
    model = export_model("bert", size=size, seed=config.seed, out=work / f"{config.model}.onnx",
                         verify=False)
    inputs = [example_inputs("bert", size, batch=1, seq=config.sequence, seed=config.seed + i)
              for i in range(config.requests)]

    deployments: dict[int, Deployment] = {}
    peer = None
    try:
        say(f"starting {sum(counts)} workers for {', '.join(map(str, counts))} device(s) "
            "and planning")
        workers = start_workers(sum(counts), work / "workers", config.profile)
        for n in counts:
            mine, workers = workers[:n], workers[n:]
            try:
                deployments[n] = _deploy(model, config, mine, work / f"edge-{n}")
            except BaseException:
                for w in mine + workers:
                    w.stop()
                raise
        main = deployments[config.devices]
        splits = layer_splits(main.plan, main.plan_dir, model)
        say(f"starting {config.devices} torch ranks (" +
            "; ".join(s.describe() for s in splits) + ")")
        stage_files = save_stages(size, config.seed, splits, work / "torch")
        peer = TorchPeer(stage_files, work / "torch")
        peer.launch()  # they import torch while the shards are deployed
        for n, d in deployments.items():
            say(f"deploying over {n} × {config.profile}")
            d.start()
        peer.wait_ready()

        # Warm-up: first-run allocations, gloo's first connections, onnxruntime's arenas.
        for d in deployments.values():
            d.run_sequential(inputs[:2])
            d.sequential.clear()
        batch = {k: np.concatenate([x[k] for x in inputs]) for k in inputs[0]}
        peer.run(inputs[0], 1, 2)
        peer.run(batch, len(inputs), 1)

        rounds = _measure_rounds(config, deployments, peer, inputs, say)
        host_gflops = statistics.median(rounds.host_gflops)

        say("comparing outputs and reading peak memory")
        edge_out = main.outputs(inputs[0])
        _, torch_out = peer.run(inputs[0], 1, 1, want_outputs=True)
        diff = max(float(np.max(np.abs(edge_out[k].astype(np.float64) - torch_out[k])))
                   for k in torch_out)
        torch_mem = peer.memory()
        edge_rss = {n: d.peak_rss_mib() for n, d in deployments.items()}

        say("drawing the timeline")
        timeline = _timeline(config, rounds, main)
    finally:
        say("stopping the workers and torch ranks")
        # Together: each worker takes a moment to stop gracefully.
        with ThreadPoolExecutor(len(deployments) + 1) as pool:
            if peer is not None:
                pool.submit(peer.stop)
            for d in deployments.values():
                pool.submit(d.close)

    hops = _hops(config, work, say)
    lab_a = _lab_comparison(config, model, size, work, say, rounds.host_gflops)
    return _assemble(config, profile, host_gflops, rounds, deployments, splits, torch_mem,
                     edge_rss, diff, hops, timeline, lab_a)


def _timeline(config: BenchConfig, rounds: _Rounds, main) -> dict:
    """Draw the last concurrent round's timeline (timeline.png); its figures for results."""
    bars = from_timestamps(rounds.last_concurrent)
    exact = bars is not None
    if not exact:
        bars = reconstruct(rounds.last_concurrent, main.num_stages)
    timeline_png = Path(config.out) / "timeline.png"
    render(bars, main.num_stages, timeline_png,
           f"edge: {config.model} over {config.devices} loopback workers, "
           f"{len(rounds.last_concurrent)} requests, {max(2, main.num_stages)} in flight",
           note=("From the workers' clocks: each stage's arrival time and its own "
                 "queue, compute and encode durations." if exact else
                 "Reconstructed: compute/queue/encode durations are the workers' own; "
                 "positions assume the unreported time (hops, coordinator) is spread "
                 "evenly over each request's hops."))
    timeline = {"png": timeline_png.name, "requests": len(rounds.last_concurrent),
                "source": ("the workers' arrival timestamps (one clock on loopback) and "
                           "per-stage durations" if exact else
                           "reconstructed from per-stage durations and the bench's own "
                           "send/receive times"),
                "max_compute_overlap_ms": round(overlap_ms(bars), 2),
                "bars": [[b.request, b.stage, b.kind, round(b.start_ms, 3),
                          round(b.end_ms, 3)] for b in bars],
                "needed_for_exact": "" if exact else NEEDED_FOR_EXACT}
    return timeline


def _hops(config: BenchConfig, work: Path, say: Callable[[str], None]) -> dict:
    """One hop of an activation: on loopback, and over a gigabit link in the lab."""
    say(f"measuring one hop of a {hop.activation_bytes() // 1024} KiB activation on loopback")
    hops = {"activation_bytes": hop.activation_bytes(),
            "wire_ms_at_940_mbps": round(hop.activation_bytes() * 8 / (_GIGE_GOODPUT_MBPS * 1e3),
                                         2),
            "loopback": hop.loopback_hop(work / "hop-loopback", config.profile,
                                         config.hop_rounds)}
    if config.lab:
        say("measuring one hop over a gigabit link shaped by edge.lab")
        try:
            hops["gige"] = hop.lab_hop(work / "hop-lab", config.profile, config.hop_rounds)
        except Exception as e:  # the lab is being built: report it, keep the other results
            log.exception("the lab hop failed")
            hops["gige"] = {"link": "gige", "status": "unavailable",
                            "reason": f"{type(e).__name__}: {e}"}
    else:
        hops["gige"] = {"link": "gige", "status": "unavailable", "reason": "skipped (--no-lab)"}
    return hops


def _lab_comparison(config: BenchConfig, model: Path, size: str, work: Path,
                    say: Callable[[str], None], host_gflops: list[float]) -> dict:
    """Pipelines against one emulated device in edge lab, each with its coordinator on
    an emulated board, or why they were not measured."""
    if not config.lab:
        return {"status": "unavailable", "reason": "skipped (--no-lab)"}
    say(f"measuring {', '.join(map(str, config.lab_stages))} emulated {config.profile} "
        f"against one in edge lab, coordinators on "
        f"{config.lab_coordinator or 'this host'}")
    inputs = [example_inputs("bert", size, batch=1, seq=config.sequence, seed=config.seed + i)
              for i in range(16)]
    try:
        return lab_scaling(model, inputs, {"batch": 1, "sequence": config.sequence},
                           config.profile, config.lab_stages, config.lab_rounds,
                           work / "lab-a", coordinator=config.lab_coordinator,
                           requests=config.lab_requests, direct=config.lab_direct,
                           host_gflops=max(host_gflops) if host_gflops else None, say=say)
    except Exception as e:  # the lab is being built: report it, keep the other results
        log.exception("the lab comparison failed")
        return {"status": "unavailable", "reason": f"{type(e).__name__}: {e}"}


def _summary(config: BenchConfig, lab: dict) -> dict:
    """The headline numbers of the lab comparison (None where not measured)."""
    pipes = lab.get("pipelines", {}) if lab.get("status") == "measured" else {}
    main = pipes.get(str(config.devices), {})
    out: dict = {f"lab_speedup_{n}": pipes.get(str(n), {}).get("speedup")
                 for n in config.lab_stages}
    out.update({
        "coordinator_device": lab.get("coordinator_device", config.lab_coordinator),
        "requests": lab.get("requests"),
        "coordinator_cpu_ms_per_request": main.get("coordinator_cpu_ms_per_request"),
        "coordinator_cpu_share_of_stage": main.get("coordinator_cpu_share_of_stage"),
        f"latency_ratio_{config.devices}": main.get("latency_ratio"),
        "source": "measured in the emulated lab (CPU quotas), not on a Pi" if pipes
                  else f"not measured: {lab.get('reason', '')}",
    })
    return out


@dataclass
class _Rounds:
    """What the alternating rounds measured (edge's records stay in its deployments)."""

    torch_latency_ms: list[float] = field(default_factory=list)
    torch_rps: list[float] = field(default_factory=list)
    host_gflops: list[float] = field(default_factory=list)
    last_concurrent: list = field(default_factory=list)


def _measure_rounds(config: BenchConfig, deployments: dict, peer, inputs: list,
                    say: Callable[[str], None]) -> _Rounds:
    """Each round: this host's GFLOP/s; latency, request by request across every edge
    deployment and the torch peer in turn; then a throughput block of each. The order
    rotates every round, so no configuration always follows a given other one."""
    out = _Rounds()
    batch = {k: np.concatenate([x[k] for x in inputs]) for k in inputs[0]}
    entries: list = [*deployments, "torch"]
    for r in range(config.rounds):
        k = r % len(entries)
        order = entries[k:] + entries[:k]
        say(f"round {r + 1}/{config.rounds}: " + ", ".join(
            "torch" if e == "torch" else f"edge over {e}" for e in order))
        # Measured with the same neighbours as the stage times it scales (modelled figures).
        out.host_gflops.append(measure_gflops(config.gflops_seconds / config.rounds)[0])
        for x in inputs:
            for e in order:
                if e == "torch":
                    out.torch_latency_ms += peer.run(x, 1, 1)[0]
                else:
                    deployments[e].run_sequential([x])
        for e in order:
            if e == "torch":
                (step_ms,), _ = peer.run(batch, len(inputs), 1)
                out.torch_rps.append(len(inputs) / (step_ms / 1e3))
            else:
                d = deployments[e]
                records, _ = d.run_concurrent(inputs, in_flight=max(2, d.num_stages))
                if e == config.devices:
                    out.last_concurrent = records
    return out


def _deploy(model: Path, config: BenchConfig, workers: list, where: Path):
    """Plan the model over ``workers`` (devices of the profile) and deploy it there. A
    model too big for one device is planned and served anyway by one worker without a
    memory budget (the baseline stays one worker-like process)."""
    bindings = {"batch": 1, "sequence": config.sequence}
    n = len(workers)
    devices = cluster_from_profile(config.profile, n, [w.address for w in workers]).devices
    note = ""
    try:
        plan = make_plan(model, devices, where, bindings=bindings)
    except NoFitError as e:
        if n != 1:
            raise
        for w in workers:
            w.stop()
        workers = start_workers(1, where / "workers", None, prefix="unbounded")
        try:
            big = dataclasses.replace(devices[0], address=workers[0].address, memory_mb=1e9)
            plan = make_plan(model, [big], where, bindings=bindings)
        except BaseException:
            workers[0].stop()
            raise
        note = (f"does not fit one {config.profile} ({e}); measured in one worker without "
                "a memory budget")
    d = Deployment(f"edge-{n}", plan, where, workers)
    d.note = note
    return d


# ---------------------------------------------------------------------- results


def _median(values) -> float:
    return round(float(statistics.median(values)), 3)


def _assemble(config, profile, host_gflops, rounds, deployments, splits, torch_mem, edge_rss,
              diff, hops, timeline, lab_a) -> dict:
    figures = {n: _edge_figures(n, deployments[n], host_gflops, edge_rss[n])
               for n in deployments}
    one, main = figures[1], figures[config.devices]
    measured_ratio = main["throughput_rps"] / one["throughput_rps"]
    modelled_ratio = main["modelled"]["throughput_rps"] / one["modelled"]["throughput_rps"]
    gige = hops["gige"]
    hop_gige = gige["hop_ms"]["median"] if gige.get("status") == "measured" else None
    return {
        "bench": "edge bench (issues 5 and 16)",
        "command": config.command,
        "summary": _summary(config, lab_a),
        "config": {**dataclasses.asdict(config), "scaling": list(config.scaling)},
        "machine": _machine(device_facts(), host_gflops, rounds.host_gflops),
        "profile": {k: getattr(profile, k) for k in ("name", "gflops", "bandwidth_mbps",
                                                     "memory_budget_mb", "cores")},
        "model": config.model, "sequence": config.sequence, "batch": 1,
        "a_one_device": {
            "baseline": "one edge worker holding the whole model" + (
                f" ({one['note']})" if "note" in one else ""),
            "one_device": one, "pipeline": main,
            "measured_throughput_ratio": round(measured_ratio, 3),
            "modelled_throughput_ratio": round(modelled_ratio, 3),
            "target_ratio": TARGETS["pipeline_vs_one_device_throughput"],
            "met_measured": measured_ratio >= TARGETS["pipeline_vs_one_device_throughput"],
            "met_modelled": modelled_ratio >= TARGETS["pipeline_vs_one_device_throughput"],
            "lab": lab_a,
            "met_lab": _met_lab(lab_a),
            "modelled_means": (f"each stage's compute time measured here, one request at a "
                               f"time, × host {host_gflops:.1f} GFLOP/s ÷ the profile's "
                               f"{profile.gflops:g} GFLOP/s, plus sending its outputs at "
                               f"{profile.bandwidth_mbps:g} Mbit/s; period = slowest stage. "
                               "Not measured on a Pi."),
        },
        "b_torch": _torch_section(config, rounds, main, splits, torch_mem, diff),
        "c_hop": {**hops, "target_gige_ms": TARGETS["hop_gige_ms"],
                  "met_gige": None if hop_gige is None else hop_gige <= TARGETS["hop_gige_ms"]},
        "d_scaling": {"points": [
            {"devices": n, "latency_ms": f["latency_ms"]["median"],
             "throughput_rps": f["throughput_rps"],
             "speedup": round(f["throughput_rps"] / one["throughput_rps"], 3),
             "modelled_latency_ms": f["modelled"]["latency_ms"],
             "modelled_throughput_rps": f["modelled"]["throughput_rps"],
             "modelled_speedup": round(f["modelled"]["throughput_rps"]
                                       / one["modelled"]["throughput_rps"], 3)}
            for n, f in sorted(figures.items())]},
        "e_timeline": timeline,
    }


def _met_lab(lab: dict) -> dict | None:
    """Per lab pipeline, whether it met its targets (None: not measured)."""
    if lab.get("status") != "measured":
        return None
    out = {}
    for n, p in lab["pipelines"].items():
        want = TARGETS["lab_speedup"].get(int(n), TARGETS["pipeline_vs_one_device_throughput"])
        out[n] = {"speedup": p["speedup"] >= want, "target": want,
                  "coordinator_cpu": p["coordinator_cpu_share_of_stage"]
                  <= TARGETS["coordinator_cpu_share_of_stage"],
                  "latency": p["latency_ratio"] <= TARGETS["latency_ratio"]}
    return out


def _edge_figures(devices: int, d, host_gflops: float, peak_rss: list) -> dict:
    """One deployment's measured and modelled figures, per stage and in all."""
    compute = d.stage_compute_ms()
    modelled = modelled_pipeline(compute, [s.predicted.transfer_ms for s in d.plan.stages],
                                 host_gflops, [s.device.gflops for s in d.plan.stages])
    stages = [{"stage": s.index, "holds": stage_layers(d.plan_dir / s.shard),
               "mode": s.mode, "compute_ms": round(c, 2),
               "transfer_ms_modelled": round(s.predicted.transfer_ms, 2),
               "planned_mib": round(s.predicted.memory_mb, 1),
               "peak_rss_mib": None if rss is None else round(rss, 1)}  # None: not measured
              for s, c, rss in zip(d.plan.stages, compute, peak_rss)]
    return {"devices": devices, "stages": stages,
            "latency_ms": summary([r.latency_ms for r in d.sequential]),
            "throughput_rps": round(statistics.median(d.throughputs), 3),
            "throughput_rps_per_round": [round(x, 3) for x in d.throughputs],
            "in_flight": max(2, d.num_stages),
            "modelled": modelled, **({"note": d.note} if d.note else {})}


def _torch_section(config, rounds, main: dict, splits, torch_mem, diff: float) -> dict:
    """Part b of the results: edge against torch.distributed.pipelining, stage by stage."""
    torch_stages = []
    for split, mem, edge_stage in zip(splits, torch_mem, main["stages"]):
        edge_peak = edge_stage["peak_rss_mib"]
        torch_stages.append({
            **split.to_dict(), "edge_holds": edge_stage["holds"],
            "edge_peak_rss_mib": edge_stage["peak_rss_mib"],
            "torch_peak_rss_mib": round(mem["peak_rss"] / 2**20, 1),
            "torch_rss_after_imports_mib": round(mem["rss_after_imports"] / 2**20, 1),
            "torch_rss_after_load_mib": round(mem["rss_after_load"] / 2**20, 1),
            "rss_ratio": (None if edge_peak is None else
                          round(edge_peak / (mem["peak_rss"] / 2**20), 3))})
    # A peak that was not measured fails the memory target: it is never taken as small.
    rss_missing = [s["stage"] for s in torch_stages if s["rss_ratio"] is None]
    rss_ratio = None if rss_missing else max(s["rss_ratio"] for s in torch_stages)
    torch_thr = round(statistics.median(rounds.torch_rps), 3)
    thr_ratio = main["throughput_rps"] / torch_thr
    rounded = [s for s in splits[:-1] if s.rounded]
    return {
        "peer": ("torch.distributed.pipelining PipelineStage + ScheduleGPipe (forward "
                 f"only), gloo on loopback, {config.devices} ranks as processes, "
                 f"OMP_WAIT_POLICY=PASSIVE, {torch_mem[0]['threads']} intra-op threads "
                 "each; each rank loads only its own stage"),
        "split_note": ("edge's cuts inside an encoder layer were rounded to the nearest "
                       "layer boundary (by node count): " + "; ".join(
                           f"after stage {s.stage} at layer {s.cut_at:.2f} → {s.layers[1]}"
                           for s in rounded)) if rounded else
                      "every edge cut is on a layer boundary",
        "stages": torch_stages,
        "edge_latency_ms": main["latency_ms"],
        "torch_latency_ms": summary(rounds.torch_latency_ms),
        "edge_throughput_rps": main["throughput_rps"],
        "torch_throughput_rps": torch_thr,
        "torch_throughput_rps_per_round": [round(x, 3) for x in rounds.torch_rps],
        "torch_microbatches": config.requests,
        "throughput_ratio": round(thr_ratio, 3),
        "peak_rss_ratio_max": rss_ratio,
        "targets": {"peak_rss_ratio_max": TARGETS["edge_vs_torch_peak_rss"],
                    "throughput_ratio": TARGETS["edge_vs_torch_throughput"]},
        "met_rss": rss_ratio is not None and rss_ratio <= TARGETS["edge_vs_torch_peak_rss"],
        "rss_not_measured": rss_missing,
        "met_throughput": thr_ratio >= TARGETS["edge_vs_torch_throughput"],
        "max_abs_diff_vs_edge": diff,
    }


def _machine(facts: dict, host_gflops: float, per_round: list[float]) -> dict:
    import torch  # loaded by the torch peer already; never at import time

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": facts["cpu_count"],
            "memory_gib": round(facts["memory_total_bytes"] / 2**30, 1),
            "system": facts["system"], "python": facts["python"],
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
            "host_gflops": round(host_gflops, 1),
            "host_gflops_per_round": [round(g, 1) for g in per_round]}
