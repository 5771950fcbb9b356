"""Refusing a request that would run a device out of memory, before any worker sees it.

A plan is costed at sizes (``batch=1, sequence=128``); a request may be larger. Within
those sizes every stage fits by construction. Beyond them, the planner's memory model is
evaluated again at the request's sizes, rounded up to whole multiples of the planned ones
(so a handful of analyses serve every request), and a request some stage would not fit is
refused with RESOURCE_EXHAUSTED naming the device, the memory it would need and what it
has, instead of reaching a worker that the kernel then kills for memory.
"""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path
from typing import Mapping

import numpy as np

from edge.planning.plan import Plan

__all__ = ["MemoryGuard", "TooLarge"]

log = logging.getLogger(__name__)


class TooLarge(Exception):
    """The request would not fit a device; the message says which and by how much."""


class MemoryGuard:
    """Checks a request's sizes against the devices of the plan being served.

    Args:
        model: the source ``.onnx`` (the one the plan names); None disables the guard.
        bindings: the sizes the plan was costed at.
    """

    def __init__(self, model: Path | None, bindings: Mapping[str, int]):
        self.model = model
        self.bindings = dict(bindings)
        self._lock = threading.Lock()
        # (bucket, plan_id) -> per stage (predicted MiB, device MiB), the analysis dropped.
        self._needs: dict[tuple, list[tuple[float, float]]] = {}

    def sizes(self, plan: Plan, inputs: Mapping[str, np.ndarray]) -> dict[str, int]:
        """The request's size of each symbolic dim of the model's inputs."""
        out: dict[str, int] = {}
        for spec in plan.model.inputs:
            array = inputs.get(spec.name)
            if array is None:
                continue
            for dim, size in zip(spec.shape, np.shape(array)):
                if isinstance(dim, str):
                    out[dim] = max(out.get(dim, 0), int(size))
        return out

    def check(self, plan: Plan, inputs: Mapping[str, np.ndarray]) -> None:
        """Raise TooLarge if some stage of ``plan`` would not fit this request."""
        if self.model is None or not self.model.is_file():
            return
        sizes = self.sizes(plan, inputs)
        over = {k: v for k, v in sizes.items() if k in self.bindings and v > self.bindings[k]}
        if not over:
            return
        bucket = dict(self.bindings)
        for k, v in over.items():
            bucket[k] = math.ceil(v / self.bindings[k]) * self.bindings[k]
        key = (tuple(sorted(bucket.items())), plan.plan_id)
        with self._lock:
            needs = self._needs.get(key)
            if needs is None:
                needs = self._needs[key] = self._predict(plan, bucket)
        for stage, (need, has) in zip(plan.stages, needs):
            if need > has:
                asked = ", ".join(f"{k}={v}" for k, v in sizes.items())
                planned = ", ".join(f"{k}={v}" for k, v in self.bindings.items())
                raise TooLarge(
                    f"a request of {asked} would need about {need:.0f} MiB on device "
                    f"{stage.device.name} (stage {stage.index}), which has {has:.0f} MiB; "
                    f"the plan was made for {planned}. Send smaller requests, or plan for "
                    f"these sizes (edge plan --dim) on devices that hold them")

    def _predict(self, plan: Plan, bucket: dict[str, int]) -> list[tuple[float, float]]:
        from edge.planning.graph import analyze
        from edge.planning.planner import evaluate

        costs = analyze(self.model, bucket)
        needs = [(evaluate(costs, s.device, *s.node_range, s.mode).memory_mb, s.device.memory_mb)
                 for s in plan.stages]
        log.info("memory at %s: %s", bucket,
                 ", ".join(f"{s.device.name} {n:.0f}/{h:.0f} MiB"
                           for s, (n, h) in zip(plan.stages, needs)))
        return needs
