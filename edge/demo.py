"""`edge demo`: the whole product on one machine.

Exports a model with seeded weights, plans it over N devices of a Pi profile, starts N
worker processes on loopback, deploys through a real coordinator, sends requests through
its gRPC API and compares every answer with the unsharded model.
"""

from __future__ import annotations

import re
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.spec import MODE_TABLE

__all__ = ["DemoConfig", "run_demo", "TOLERANCE", "INT8_MIN_COSINE", "measured_peak_mib",
           "NOT_MEASURED"]

TOLERANCE = 1e-4
# Outputs of a plan with int8 stages must keep this cosine similarity with the fp32 model.
INT8_MIN_COSINE = 0.99


@dataclass(frozen=True)
class DemoConfig:
    model: str = "bert"
    size: str = "base"
    devices: int = 4
    profile: str = "rpi4b-2gb"
    requests: int = 16
    concurrency: int = 4
    sequence: int = 128
    seed: int = 0
    workdir: str | None = None
    modes: tuple[str, ...] | None = None  # None: the planner's choice (see edge plan --modes)


NOT_MEASURED = "not measured"


def measured_peak_mib(stage) -> float | None:
    """A stage's measured peak RSS in MiB from a ``ClusterStatus`` entry, or None when it
    was not measured: the worker did not answer its status call, or answered with no peak.
    A worker's peak is never 0 (the interpreter alone is tens of MiB), so 0 is a missing
    measurement, never a pass.

    Args:
        stage: one of ``pb.ClusterStatus.stages``.
    """
    if not stage.healthy or not stage.HasField("worker") or stage.worker.peak_rss_bytes <= 0:
        return None
    return stage.worker.peak_rss_bytes / 2**20


def stage_layers(shard_path: Path) -> str:
    """A human label for what a shard holds: the module indices its weights are named with
    (``encoder.layer.3.…`` → 3), or its node count when the names carry none."""
    import onnx

    model = onnx.load(str(shard_path), load_external_data=False)
    blocks = sorted({int(m.group(1)) for i in model.graph.initializer
                     for m in [re.search(r"\.(\d+)\.", i.name)] if m})
    prefix = "embeddings + " if any("embed" in i.name for i in model.graph.initializer) else ""
    if not blocks:
        return f"{prefix}{len(model.graph.node)} nodes"
    span = f"{blocks[0]}" if len(blocks) == 1 else f"{blocks[0]}–{blocks[-1]}"
    return f"{prefix}layers {span}"


def run_demo(config: DemoConfig) -> int:
    """Run the demo; returns the process exit code (1 if outputs differ beyond TOLERANCE)."""
    import onnxruntime as ort
    from rich.console import Console
    from rich.table import Table

    from edge.cli import print_plan, start_pipeline
    from edge.coordinator.client import InferClient
    from edge.coordinator.server import start_coordinator
    from edge.export import example_inputs, export_model
    from edge.build import make_plan
    from edge.planning.cluster import cluster_from_profile
    from edge.profiling.memory import tune_malloc
    from edge.shards.runtime import session_options
    from edge.transport.codec import decode_tensors
    from edge.worker.launch import LocalWorkers

    tune_malloc()
    console = Console(highlight=False)
    tmp = None
    if config.workdir:
        work = Path(config.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="edge-demo-")
        work = Path(tmp.name)
    try:
        name = f"{config.model}-{config.size}"
        console.rule(f"edge demo: {name} over {config.devices} × {config.profile}")
        t0 = time.perf_counter()
        model_path = export_model(config.model, size=config.size, seed=config.seed,
                                  out=work / f"{name}.onnx")
        console.print(f"exported {model_path.name} with seeded weights in "
                      f"{time.perf_counter() - t0:.1f} s")

        # Every request is distinct; the reference is the unsharded model on the same input.
        inputs = [example_inputs(config.model, config.size, batch=1, seq=config.sequence,
                                 seed=config.seed + i) for i in range(config.requests)]
        reference = ort.InferenceSession(str(model_path), sess_options=session_options(),
                                         providers=["CPUExecutionProvider"])
        expected = [dict(zip([o.name for o in reference.get_outputs()],
                             reference.run(None, x))) for x in inputs]
        single_ms = []
        for x in inputs[: min(8, len(inputs))]:
            t = time.perf_counter()
            reference.run(None, x)
            single_ms.append((time.perf_counter() - t) * 1e3)
        del reference

        with LocalWorkers(config.devices, work / "workers", device=config.profile) as workers:
            cluster = cluster_from_profile(config.profile, config.devices,
                                           addresses=workers.addresses)
            t0 = time.perf_counter()
            bindings = ({"batch": 1, "height": config.sequence, "width": config.sequence}
                        if config.model == "unet" else {"batch": 1, "sequence": config.sequence})
            plan = make_plan(model_path, cluster.devices, work / "build", bindings=bindings,
                             modes=config.modes)
            console.print(f"planned in {time.perf_counter() - t0:.1f} s")
            print_plan(plan, console)
            pipeline = start_pipeline(str(work / "build" / "plan.json"), 60.0, console)
            server, port = start_coordinator(pipeline, "127.0.0.1:0")
            try:
                with InferClient(f"127.0.0.1:{port}") as client:
                    client.infer_raw(inputs[0])  # warm-up: first-run allocations
                    # Latency: one request at a time.
                    sequential, stage_ms = [], {}
                    for x in inputs[: min(8, len(inputs))]:
                        t = time.perf_counter()
                        reply = client.infer_raw(x)
                        sequential.append((time.perf_counter() - t) * 1e3)
                        for timing in reply.timings:
                            stage_ms.setdefault(timing.stage, []).append(timing.compute_ms)
                    # Throughput: several in flight, so the stages overlap.
                    t = time.perf_counter()
                    with ThreadPoolExecutor(config.concurrency) as pool:
                        replies = list(pool.map(client.infer_raw, inputs))
                    elapsed = time.perf_counter() - t
                    status = client.status()
            finally:
                server.stop(1).wait()
                pipeline.close()

        from edge.shards.quantize import cosine

        worst, least_cos = 0.0, 1.0
        for reply, want in zip(replies, expected):
            got = decode_tensors(reply.outputs)
            for k, v in want.items():
                worst = max(worst, float(np.max(np.abs(got[k].astype(np.float64) - v))))
                least_cos = min(least_cos, cosine(got[k], v))

        table = Table(title="per device")
        for col in ("stage", "device", "holds", "mode", "planned MiB", "peak RSS MiB",
                    "stage ms"):
            table.add_column(col, justify="left" if col in ("device", "holds", "mode")
                             else "right")
        unmeasured = []
        for stage, st in zip(plan.stages, status.stages):
            peak = measured_peak_mib(st)
            if peak is None:
                unmeasured.append(f"{stage.index} ({stage.device.name}, {st.address})")
            table.add_row(str(stage.index), stage.device.name,
                          stage_layers(work / "build" / stage.shard), stage.mode,
                          f"{stage.predicted.memory_mb:.0f}",
                          NOT_MEASURED if peak is None else f"{peak:.0f}",
                          f"{statistics.mean(stage_ms.get(stage.index, [0])):.1f}")
        console.print(table)
        console.print("[dim]stage ms: mean compute time of a stage, one request at a time[/dim]")
        console.print(f"unsharded onnxruntime: {statistics.median(single_ms):.1f} ms/request "
                      "(median, this process)")
        console.print(f"pipeline latency: {statistics.median(sequential):.1f} ms (median of "
                      f"{len(sequential)}, one at a time)")
        console.print(f"pipeline throughput: {len(inputs) / elapsed:.1f} requests/s "
                      f"({len(inputs)} requests, {config.concurrency} in flight)")
        if any(MODE_TABLE[s.mode].quantized for s in plan.stages):
            # Quantized stages are not exact: judge them by the drift bound instead.
            ok = least_cos >= INT8_MIN_COSINE
            console.print(f"max |sharded − unsharded| = {worst:.2e}; int8 stages: least "
                          f"cosine similarity {least_cos:.5f} ({'OK' if ok else 'FAIL'}: "
                          f"bound {INT8_MIN_COSINE:g})")
        else:
            ok = worst <= TOLERANCE
            console.print(f"max |sharded − unsharded| = {worst:.2e} "
                          f"({'OK' if ok else 'FAIL'}: tolerance {TOLERANCE:g})")
        if unmeasured:
            # The demo shows measured memory; a table of blanks is not a pass.
            ok = False
            console.print(f"peak RSS not measured for stage(s) {', '.join(unmeasured)}: "
                          "their status calls failed (see the log above) (FAIL)")
        console.print("[dim]timings are measured on this machine, which stands in for "
                      f"{config.devices} {config.profile} devices; a Pi is slower.[/dim]")
        return 0 if ok else 1
    finally:
        if tmp is not None:
            tmp.cleanup()
