"""`edge demo`: the whole product on one machine.

Exports a model with seeded weights, plans it over N devices of a Pi profile, starts N
worker processes on loopback, deploys through a real coordinator, sends requests through
its gRPC API and compares every answer with the unsharded model.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

from edge.build import make_plan
from edge.console import NOT_MEASURED, measured_peak_mib, print_plan, stage_layers, start_pipeline
from edge.coordinator.client import InferClient
from edge.coordinator.server import start_coordinator
from edge.export import example_inputs, export_model
from edge.planning.cluster import cluster_from_profile
from edge.planning.plan import Plan
from edge.profiling.memory import tune_malloc
from edge.shards.quantize import cosine
from edge.shards.runtime import session_options
from edge.spec import MODE_TABLE
from edge.transport.codec import decode_tensors
from edge.worker.launch import LocalWorkers

__all__ = ["DemoConfig", "run_demo", "workdir", "TOLERANCE", "INT8_MIN_COSINE"]

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
    # Text generation (edge.demo_generate): the plan's context (None: the planner's
    # default) and the tokens to generate at most.
    context: int | None = None
    max_tokens: int = 48


@dataclass
class _Reference:
    """The unsharded model's answers to the demo's requests, and its speed."""

    expected: list[dict[str, np.ndarray]]
    single_ms: list[float]


@dataclass
class _Served:
    """What the pipeline answered, and how fast."""

    replies: list = field(default_factory=list)
    sequential_ms: list[float] = field(default_factory=list)
    stage_ms: dict[int, list[float]] = field(default_factory=dict)
    elapsed_s: float = 0.0
    status: object = None


# Where a demo whose export is slow keeps it between runs when no --workdir is given.
CACHE_DIR = Path.home() / ".cache" / "edge" / "demo"


@contextlib.contextmanager
def workdir(config: DemoConfig, keep: bool = False) -> Iterator[Path]:
    """``config.workdir`` (kept), else ``CACHE_DIR`` when ``keep``, else a temporary
    folder removed afterwards.

    Args:
        config: the demo's settings.
        keep: keep the folder without a ``workdir`` (a slow export is cached in it).
    """
    if config.workdir or keep:
        work = Path(config.workdir) if config.workdir else CACHE_DIR
        work.mkdir(parents=True, exist_ok=True)
        yield work
        return
    with tempfile.TemporaryDirectory(prefix="edge-demo-") as tmp:
        yield Path(tmp)


def _reference(model_path: Path, inputs: list[dict[str, np.ndarray]]) -> _Reference:
    """Run the unsharded model on every input, and time a few runs of it."""
    session = ort.InferenceSession(str(model_path), sess_options=session_options(),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    expected = [dict(zip(names, session.run(None, x))) for x in inputs]
    single_ms = []
    for x in inputs[: min(8, len(inputs))]:
        t = time.perf_counter()
        session.run(None, x)
        single_ms.append((time.perf_counter() - t) * 1e3)
    return _Reference(expected, single_ms)


def _bindings(config: DemoConfig) -> dict[str, int]:
    if config.model == "unet":
        return {"batch": 1, "height": config.sequence, "width": config.sequence}
    return {"batch": 1, "sequence": config.sequence}


def _send(client: InferClient, inputs: list[dict[str, np.ndarray]],
          concurrency: int) -> _Served:
    """Latency one request at a time, then throughput with several in flight."""
    served = _Served()
    client.infer_raw(inputs[0])  # warm-up: first-run allocations
    for x in inputs[: min(8, len(inputs))]:
        t = time.perf_counter()
        reply = client.infer_raw(x)
        served.sequential_ms.append((time.perf_counter() - t) * 1e3)
        for timing in reply.timings:
            served.stage_ms.setdefault(timing.stage, []).append(timing.compute_ms)
    t = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:  # the stages overlap
        served.replies = list(pool.map(client.infer_raw, inputs))
    served.elapsed_s = time.perf_counter() - t
    served.status = client.status()
    return served


def _plan_and_serve(config: DemoConfig, model_path: Path, work: Path,
                    inputs: list[dict[str, np.ndarray]], console: Console
                    ) -> tuple[Plan, _Served]:
    """Start the workers, plan over them, deploy, and send the requests."""
    with LocalWorkers(config.devices, work / "workers", device=config.profile) as workers:
        cluster = cluster_from_profile(config.profile, config.devices,
                                       addresses=workers.addresses)
        t0 = time.perf_counter()
        plan = make_plan(model_path, cluster.devices, work / "build",
                         bindings=_bindings(config), modes=config.modes)
        console.print(f"planned in {time.perf_counter() - t0:.1f} s")
        print_plan(plan, console)
        pipeline = start_pipeline(str(work / "build" / "plan.json"), 60.0, console)
        server, port = start_coordinator(pipeline, "127.0.0.1:0")
        try:
            with InferClient(f"127.0.0.1:{port}") as client:
                return plan, _send(client, inputs, config.concurrency)
        finally:
            server.stop(1).wait()
            pipeline.close()


def _differences(served: _Served, reference: _Reference) -> tuple[float, float]:
    """(largest absolute difference, least cosine similarity) with the unsharded model."""
    worst, least_cos = 0.0, 1.0
    for reply, want in zip(served.replies, reference.expected):
        got = decode_tensors(reply.outputs)
        for k, v in want.items():
            worst = max(worst, float(np.max(np.abs(got[k].astype(np.float64) - v))))
            least_cos = min(least_cos, cosine(got[k], v))
    return worst, least_cos


def _stage_table(plan: Plan, served: _Served, build: Path) -> tuple[Table, list[str]]:
    """The per-device table, and the stages whose peak memory was not measured."""
    table = Table(title="per device")
    for col in ("stage", "device", "holds", "mode", "planned MiB", "peak RSS MiB",
                "stage ms"):
        table.add_column(col, justify="left" if col in ("device", "holds", "mode")
                         else "right")
    unmeasured = []
    for stage, st in zip(plan.stages, served.status.stages):
        peak = measured_peak_mib(st)
        if peak is None:
            unmeasured.append(f"{stage.index} ({stage.device.name}, {st.address})")
        table.add_row(str(stage.index), stage.device.name, stage_layers(build / stage.shard),
                      stage.mode, f"{stage.predicted.memory_mb:.0f}",
                      NOT_MEASURED if peak is None else f"{peak:.0f}",
                      f"{statistics.mean(served.stage_ms.get(stage.index, [0])):.1f}")
    return table, unmeasured


def _verdict(plan: Plan, served: _Served, reference: _Reference, unmeasured: list[str],
             console: Console) -> bool:
    """Print how the pipeline compares with the unsharded model; True if it passes."""
    worst, least_cos = _differences(served, reference)
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
    return ok


def _report(config: DemoConfig, plan: Plan, served: _Served, reference: _Reference,
            build: Path, console: Console) -> bool:
    """Print the per-device table, the timings and the verdict; True if the demo passes."""
    table, unmeasured = _stage_table(plan, served, build)
    console.print(table)
    console.print("[dim]stage ms: mean compute time of a stage, one request at a time[/dim]")
    console.print(f"unsharded onnxruntime: {statistics.median(reference.single_ms):.1f} "
                  "ms/request (median, this process)")
    console.print(f"pipeline latency: {statistics.median(served.sequential_ms):.1f} ms "
                  f"(median of {len(served.sequential_ms)}, one at a time)")
    console.print(f"pipeline throughput: {len(served.replies) / served.elapsed_s:.1f} "
                  f"requests/s ({len(served.replies)} requests, {config.concurrency} in "
                  "flight)")
    ok = _verdict(plan, served, reference, unmeasured, console)
    console.print("[dim]timings are measured on this machine, which stands in for "
                  f"{config.devices} {config.profile} devices; a Pi is slower.[/dim]")
    return ok


def run_demo(config: DemoConfig) -> int:
    """Run the demo.

    Args:
        config: the model, the devices and the requests.

    Returns:
        The process exit code: 1 if outputs differ beyond TOLERANCE (or, with int8
        stages, fall below INT8_MIN_COSINE), or a stage's memory was not measured.
    """
    tune_malloc()
    console = Console(highlight=False)
    with workdir(config) as work:
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
        reference = _reference(model_path, inputs)
        plan, served = _plan_and_serve(config, model_path, work, inputs, console)
        ok = _report(config, plan, served, reference, work / "build", console)
        return 0 if ok else 1
