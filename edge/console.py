"""What the CLI, the demo and the bench show people: plan tables, upload progress, labels.

Only command-line front ends import this module (``edge.cli`` when a command runs,
``edge.demo``, ``edge.bench``); the library logs instead of printing.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import onnx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from edge.coordinator.guard import describe_limits
from edge.coordinator.pipeline import Pipeline
from edge.lab.lab import Lab, LabError
from edge.planning.plan import Plan, load_plan, plan_file
from edge.transport.channels import Deadlines, Security

__all__ = ["console", "print_plan", "format_upload", "start_pipeline", "lab_diagnose",
           "stage_layers", "measured_peak_mib", "NOT_MEASURED"]

# Shown in a table where a stage's peak memory was not measured.
NOT_MEASURED = "not measured"


def console() -> Console:
    """A console for the CLI's own output (stdout, no syntax highlighting)."""
    return Console(stderr=False, highlight=False)


def _plan_table(plan: Plan) -> Table:
    dims = ", ".join(f"{k}={v}" for k, v in plan.model.bindings.items())
    table = Table(title=f"plan: {plan.model.name}, {plan.model.num_nodes} nodes, {dims}")
    generating = plan.model.generation is not None
    cols = ["stage", "device", "nodes", "mode", "shard", "memory / budget MiB"]
    cols += ["KV cache MiB", "prefill", "decode"] if generating else ["compute"]
    for col in cols + ["send", "sends"]:
        table.add_column(col, justify="left" if col in ("device", "nodes", "mode")
                         else "right")
    for s in plan.stages:
        p = s.predicted
        shard_mb = (s.shard_bytes + sum(f.size for f in s.data_files)) / 2**20
        # An int8 stage shows the cosine of the model's outputs with it quantized, rounded
        # down so that 0.99996 reads 0.9999, not 1.0000.
        mode = (s.mode if s.int8_cosine is None
                else f"{s.mode} (cos {math.floor(s.int8_cosine * 1e4) / 1e4:.4f})")
        row = [str(s.index), f"{s.device.name} ({s.device.profile})",
               f"{s.node_range[0]}–{s.node_range[1]}", mode, f"{shard_mb:.0f} MiB",
               f"{p.memory_mb:.0f} / {s.device.memory_mb:.0f}"]
        # A decoder's stage: its caches (in its memory) and the time of one decode step.
        row += ([f"{p.kv_cache_mb:.3g}", f"{p.compute_ms:.0f} ms", f"{p.decode_ms:.1f} ms"]
                if generating else [f"{p.compute_ms:.0f} ms"])
        table.add_row(*row, f"{p.transfer_ms:.1f} ms", f"{len(s.outputs)} tensors")
    return table


def print_plan(plan: Plan, out: Console) -> None:
    """Show a plan as a table, with its intake notes and the sizes it serves; for a plan
    for generation, each stage's KV caches and decode step, and its context, sequences
    and prefill.

    Args:
        plan: the plan.
        out: where to print.
    """
    for note in plan.model.notes:
        out.print(f"[yellow]intake:[/yellow] {note}")
    out.print(_plan_table(plan))
    gen = plan.model.generation
    if gen is not None:
        prefill = sum(s.predicted.time_ms for s in plan.stages)
        rate = f" (~{1e3 / plan.latency_ms:.1f} tokens/s for one sequence)" \
            if plan.latency_ms > 0 else ""
        out.print(f"generation: context {gen.context} tokens (prompt and generated), "
                  f"{gen.sequences} sequence(s) holding caches at once, prefill up to "
                  f"{gen.prefill} tokens; KV cache MiB: a stage's caches for all of them "
                  f"(in its memory), stored in {gen.kv_dtype}"
                  + (f" (logits keep cosine {math.floor(gen.kv_cosine * 1e4) / 1e4:.4f} "
                     "with fp32 caches)" if gen.kv_cosine is not None else ""))
        # For a decoder, the plan's bottleneck and latency are those of a decode step.
        out.print(f"modelled from the device profiles: a token takes {plan.latency_ms:.0f} "
                  f"ms through the stages{rate}, slowest decode step "
                  f"{plan.bottleneck_ms:.1f} ms; a prefill of {gen.prefill} tokens "
                  f"{prefill:.0f} ms")
    else:
        out.print(f"modelled from the device profiles: bottleneck {plan.bottleneck_ms:.0f} "
                  f"ms per request, latency {plan.latency_ms:.0f} ms")
    if any(s.int8_cosine is not None for s in plan.stages):
        what = ("the logits of the prefill and of teacher-forced decode steps, the worst,"
                if gen is not None else "the model's outputs")
        out.print(f"cos: {what} with that stage in int8 against fp32 "
                  f"(int8 needs >= {plan.int8_min_cosine})")
    limits = describe_limits(plan)
    if limits:
        out.print(limits)


def lab_diagnose(plan: Plan):
    """The device lab's ``diagnose`` when the plan's workers run in an `edge lab`, so that a
    lost worker's error says why (e.g. killed at its memory cap); None otherwise.

    The coordinator takes it as a callback and never imports the lab itself.

    Args:
        plan: the plan whose workers to look for.
    """
    try:
        lab = Lab.load()
        for stage in plan.stages:
            lab.device(stage.device.address)
    except (LabError, OSError):
        return None
    return lab.diagnose


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def format_upload(planned: int, to_send: int, sent: int, seconds: float) -> str:
    """One stage's upload, for the progress bar.

    Only bytes actually sent count towards the rate; cached files are said to be cached.

    Args:
        planned: bytes of the stage's files.
        to_send: of those, bytes the worker's cache lacks.
        sent: bytes sent so far.
        seconds: since the first byte was sent.
    """
    cached = planned - to_send
    if to_send <= 0:
        return f"all {_mb(planned)} cached, nothing uploaded"
    text = f"{_mb(sent)}/{_mb(to_send)} uploaded"
    if sent and seconds >= 0.05:  # shorter: a rate of noise
        text += f" at {_mb(sent / seconds)}/s"
    return text + (f", {_mb(cached)} cached" if cached else "")


def _deploy_with_bar(pipeline: Pipeline, plan: Plan, out: Console) -> None:
    """Start ``pipeline`` with one progress bar per stage's upload."""
    # rich's own speed column would count cached files as transferred in no time ("16 MB at
    # 11.6 GB/s" with nothing sent): the text is format_upload's, from bytes really sent.
    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.fields[upload]}"), console=out,
                  transient=False) as bar:
        tasks = {s.index: bar.add_task(f"stage {s.index} → {s.device.name}", total=s.total_bytes,
                                       upload="waiting for the worker")
                 for s in plan.stages}
        first_byte: dict[int, float] = {}

        def progress(stage, sent: int, to_send: int) -> None:
            now = time.monotonic()
            if sent:
                first_byte.setdefault(stage.index, now)
            seconds = now - first_byte.get(stage.index, now)
            planned = stage.total_bytes
            bar.update(tasks[stage.index], total=planned, completed=planned - to_send + sent,
                       upload=format_upload(planned, to_send, sent, seconds))

        pipeline.start(progress=progress)


def start_pipeline(plan_path: str, ready_timeout: float, out: Console,
                   model: str | None = None, failover: bool = True, max_in_flight: int = 64,
                   security: Security | None = None, take_over: bool = False,
                   infer_batch: int = 1) -> Pipeline:
    """Load a plan and deploy it with a progress bar.

    Args:
        plan_path: ``plan.json`` or the folder it is in.
        ready_timeout: seconds to wait for each worker to be healthy.
        out: where to show progress and failovers.
        model: the source ``.onnx`` to re-plan from (default: the one the plan names).
        failover: move a lost device's stage to the devices that remain.
        max_in_flight: requests accepted at once.
        security: TLS settings (default: plaintext).
        take_over: configure workers another live coordinator owns.
        infer_batch: above 1, Infer requests past two per stage wait and go as one
            batch of at most this many (1: each sent at once, alone).

    Returns:
        The started pipeline.
    """
    plan_path = plan_file(plan_path)
    plan = load_plan(plan_path)

    def changed(recovery) -> None:
        style = "red" if recovery.how == "unavailable" else "yellow"
        what = "failover" if recovery.lost or not recovery.joined else "rejoin"
        out.print(f"[{style}]{what}:[/{style}] {recovery.describe()}")

    pipeline = Pipeline(plan, Path(plan_path).parent, deadlines=Deadlines(ready=ready_timeout),
                        diagnose=lab_diagnose(plan), failover=failover,
                        max_in_flight=max_in_flight, security=security or Security(),
                        model=Path(model) if model else None, on_change=changed,
                        take_over=take_over, infer_batch=infer_batch)
    _deploy_with_bar(pipeline, plan, out)
    return pipeline


def stage_layers(shard_path: Path) -> str:
    """A human label for what a shard holds: the module indices its weights are named with
    (``encoder.layer.3.…`` → 3), or its node count when the names carry none.

    Args:
        shard_path: the shard's ``.onnx`` (its weights are not loaded).
    """
    model = onnx.load(str(shard_path), load_external_data=False)
    blocks = sorted({int(m.group(1)) for i in model.graph.initializer
                     for m in [re.search(r"\.(\d+)\.", i.name)] if m})
    prefix = "embeddings + " if any("embed" in i.name for i in model.graph.initializer) else ""
    if not blocks:
        return f"{prefix}{len(model.graph.node)} nodes"
    span = f"{blocks[0]}" if len(blocks) == 1 else f"{blocks[0]}–{blocks[-1]}"
    return f"{prefix}layers {span}"


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
