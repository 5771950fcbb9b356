"""Planning: analyse an ONNX model, split it over devices, write shards and ``plan.json``.

The worker imports ``edge.planning.plan`` (pure data), which runs this file first; so onnx
and the planner are imported lazily here, never at import time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from edge.planning.graph import analyze
    from edge.planning.plan import Device, Plan
    from edge.planning.planner import partition

__all__ = ["make_plan", "analyze", "partition"]

log = logging.getLogger(__name__)


def __getattr__(name: str) -> Any:
    if name == "analyze":
        from edge.planning.graph import analyze
        return analyze
    if name == "partition":
        from edge.planning.planner import partition
        return partition
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_plan(model_path: str | Path, cluster_devices: Sequence["Device"],
              out_dir: str | Path, bindings: dict[str, int] | None = None,
              standby: Sequence["Device"] = (),
              modes: Sequence[str] | None = None) -> "Plan":
    """Analyse a model, split it over the devices, write the shards and ``plan.json``.

    Args:
        model_path: the source ``.onnx`` (external data next to it is loaded).
        cluster_devices: devices in pipeline order; those with ``standby=True`` hold no
            stage and go to ``Plan.standby``.
        out_dir: folder for ``plan.json`` and ``shards/stage-<i>.onnx`` with their data
            files (``.onnx.data``, ``.onnx.gather.data``); a stage whose mode is int8 is
            built in fp32 and quantized (``edge.shards.quantize``).
        bindings: sizes of symbolic dims to cost at, e.g. ``{"batch": 1, "sequence": 128}``.
        standby: extra spare devices.
        modes: the modes a stage may take, in order of preference; None for all of
            ``MODES`` (fp32, then fp32-lean, then int8: each stage gets the first that fits).

    Returns:
        The plan, also saved as ``out_dir/plan.json``.

    Raises:
        GraphError: the model cannot be analysed or cut.
        NoFitError: no split fits the devices' memory.
    """
    from edge.planning.graph import analyze
    from edge.planning.plan import MODES, ModelInfo, Plan, ShardFile, Stage
    from edge.planning.planner import partition
    from edge.shards.build import build_shard
    from edge.shards.quantize import quantize_shard

    model_path = Path(model_path)
    out_dir = Path(out_dir)
    active = [d for d in cluster_devices if not d.standby]
    spares = tuple(d for d in cluster_devices if d.standby) + tuple(standby)
    costs = analyze(model_path, bindings)
    split = partition(costs, active, **({} if modes is None else {"modes": tuple(modes)}))

    shard_dir = out_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    n = costs.num_nodes
    stages = []
    for k, (dev, (i, j), pred, mode) in enumerate(zip(active, split.ranges,
                                                      split.predictions, split.modes)):
        rel = f"shards/stage-{k}.onnx"
        if mode == "int8":
            # Quantize the fp32 shard built in a folder of its own, then write the int8
            # one in the same layout.
            with tempfile.TemporaryDirectory(prefix="edge-fp32-", dir=shard_dir) as tmp:
                fp32 = build_shard(costs.model, costs, i, j, Path(tmp) / f"stage-{k}.onnx")
                info = quantize_shard(fp32.path, out_dir / rel)
        else:
            info = build_shard(costs.model, costs, i, j, out_dir / rel)
        outputs = (tuple(costs.specs[t] for t in costs.graph_outputs) if j == n
                   else costs.crossing_specs(j))
        stages.append(Stage(
            index=k, device=dev, node_range=(i, j), inputs=costs.crossing_specs(i),
            outputs=outputs, shard=rel, sha256=info.sha256, shard_bytes=info.size,
            predicted=dataclasses.replace(
                pred, activation_degrees=costs.activation_degrees(i, j),
                activation_growth=tuple(costs.activation_growth(i, j))), mode=mode,
            data_files=tuple(ShardFile(f"shards/{f.path.name}", f.sha256, f.size,
                                       f.random_access) for f in info.data_files)))
    model = ModelInfo(
        name=model_path.stem, sha256=_sha256_file(model_path), num_nodes=n,
        inputs=tuple(costs.specs[t] for t in costs.graph_inputs),
        outputs=tuple(costs.specs[t] for t in costs.graph_outputs),
        bindings=dict(costs.bindings), derived=dict(costs.derived),
        path=os.path.relpath(model_path.resolve(), out_dir.resolve()))
    plan = Plan(model=model, stages=tuple(stages), standby=spares,
                bottleneck_ms=split.bottleneck_ms, latency_ms=split.latency_ms,
                modes=MODES if modes is None else tuple(modes))
    plan.save(out_dir / "plan.json")
    log.info("plan %s: %d stages, period %.1f ms, latency %.1f ms -> %s", plan.plan_id,
             len(stages), plan.bottleneck_ms, plan.latency_ms, out_dir / "plan.json")
    return plan
