"""Where the model runs after devices are lost or come back.

The coordinator knows which devices answer. From that set this module picks the devices of
the pipeline and a plan for them, cheapest first:

1. every device of the original plan answers: the original plan (its shards are in the
   workers' caches already);
2. a lost device's place is taken by a standby device (``standby:`` in cluster.yaml) that
   has the memory for that stage: the same shards, one moved;
3. otherwise the planner runs again over the devices that answer (standby ones included),
   from the source model, with the modes and sizes of the original plan.

When no plan fits, :class:`NoCapacity` says how much memory is missing, so that requests
fail with a clear ``UNAVAILABLE`` instead of hanging.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

import numpy as np

from edge.build import make_plan
from edge.errors import EdgeError, NoFitError
from edge.files import file_sha256
from edge.planning.plan import Device, Plan

__all__ = ["Deployment", "NoCapacity", "Replanner"]

log = logging.getLogger(__name__)


class NoCapacity(EdgeError):
    """The devices that answer cannot hold the model (or nothing answers)."""


@dataclass(frozen=True)
class Deployment:
    """A plan and the folder its shard paths are relative to.

    Attributes:
        plan: the plan to deploy.
        plan_dir: its folder.
        how: "original", "standby" or "re-planned", for the log and the recovery report.
    """

    plan: Plan
    plan_dir: Path
    how: str


class Replanner:
    """Finds a deployment for the devices that answer.

    Args:
        original: the plan deployed at start; its devices, in order, are the preferred
            pipeline, its standby devices the spares.
        plan_dir: the original plan's folder; re-plans go to ``plan_dir/replans/``.
        model: the source ``.onnx``, or None (then only the original plan and standby
            substitutions are possible).
    """

    def __init__(self, original: Plan, plan_dir: Path, model: Path | None):
        self.original = original
        self.plan_dir = Path(plan_dir)
        self.model = model
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, ...], Deployment] = {}
        self._model_checked = False

    @property
    def devices(self) -> tuple[Device, ...]:
        """Every device this coordinator may use: the pipeline's, then the standby ones."""
        return self.original.devices + self.original.standby

    def layout(self, up: Collection[str]) -> tuple[list[Device], list[Device]]:
        """The pipeline's devices when the devices at addresses ``up`` answer.

        The original order is kept; a lost device's place goes to the first standby device
        that answers.

        Returns:
            (pipeline devices, standby devices that answer but were not placed).
        """
        spares = [d for d in self.original.standby if d.address in up]
        placed: list[Device] = []
        for d in self.original.devices:
            if d.address in up:
                placed.append(d)
            elif spares:
                placed.append(spares.pop(0))
        return placed, spares

    def deployment(self, up: Collection[str]) -> Deployment:
        """The cheapest deployment over the devices at addresses ``up``.

        Raises:
            NoCapacity: nothing answers, or what answers cannot hold the model.
        """
        placed, spares = self.layout(up)
        lost = [d.name for d in self.original.devices if d.address not in up]
        if not placed:
            gone = [d.name for d in self.original.standby if d.address not in up]
            spares = (f"standby {', '.join(gone)} does not answer either" if gone
                      else "there is no standby device")
            raise NoCapacity(f"no device can serve: lost {', '.join(lost)}, and {spares}; "
                             "start their workers or add standby devices to cluster.yaml")
        key = tuple(d.address for d in placed)
        with self._lock:
            if key == tuple(d.address for d in self.original.devices):
                return Deployment(self.original, self.plan_dir, "original")
            if key in self._cache:
                return self._cache[key]
            found = self._substitute(placed) or self._replan(placed, spares, lost)
            self._cache[key] = found
            return found

    # ------------------------------------------------------------------ internals

    def _substitute(self, placed: list[Device]) -> Deployment | None:
        """The original stages on ``placed`` if each newcomer has the memory for its stage."""
        stages = self.original.stages
        if len(placed) != len(stages):
            return None
        for stage, dev in zip(stages, placed):
            if dev != stage.device and dev.memory_mb < stage.predicted.memory_mb:
                return None
        moved = tuple(dataclasses.replace(s, device=d) for s, d in zip(stages, placed))
        used = {d.address for d in placed}
        plan = dataclasses.replace(
            self.original, stages=moved,
            standby=tuple(d for d in self.devices if d.address not in used and d.standby))
        return Deployment(plan, self.plan_dir, "standby")

    def _replan(self, placed: list[Device], spares: list[Device],
                lost: list[str]) -> Deployment:
        model = self._checked_model(lost)
        sample = self._sample()
        # A standby device placed in the pipeline holds a stage like any other: make_plan
        # would keep a device marked standby out of the split (with nothing else left, it
        # had "no devices to plan for").
        active = lambda ds: [dataclasses.replace(d, standby=False) for d in ds]  # noqa: E731
        tries = [active(placed)] + ([active(placed + spares)] if spares else [])
        error: NoFitError | None = None
        for devices in tries:
            name = hashlib.sha256("|".join(d.address for d in devices).encode()).hexdigest()
            out = self.plan_dir / "replans" / name[:12]
            try:
                plan = make_plan(model, devices, out, bindings=dict(self.original.model.bindings),
                                 modes=self.original.modes, sample=sample,
                                 int8_min_cosine=self.original.int8_min_cosine,
                                 generation=self.original.model.generation)
            except NoFitError as e:
                error = e
                continue
            except EdgeError as e:  # any other reason the planner cannot split it there
                raise NoCapacity(
                    f"lost {', '.join(lost) or 'no device'}; cannot re-plan "
                    f"{self.original.model.name} over {', '.join(d.name for d in devices)}: "
                    f"{type(e).__name__}: {e}") from None
            log.info("re-planned %s over %s into %s", model.name,
                     ", ".join(d.name for d in devices), out)
            return Deployment(plan, out, "re-planned")
        assert error is not None
        missing = sum(max(0.0, error.needs[n] - error.has[n]) for n in error.needs)
        devices = tries[-1]
        raise NoCapacity(
            f"lost {', '.join(lost)}; the {len(devices)} device(s) left "
            f"({', '.join(d.name for d in devices)}, {sum(d.memory_mb for d in devices):.0f} "
            f"MiB in all) cannot hold {self.original.model.name}: {missing:.0f} MiB short in "
            f"the closest split. Bring a device back or add standby devices to cluster.yaml."
            f"\n{error}")

    def _sample(self) -> dict | None:
        """The sample input the plan was measured on (``edge plan --sample``), if any."""
        if not self.original.model.sample:
            return None
        with np.load(self.plan_dir / self.original.model.sample, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}

    def _checked_model(self, lost: list[str]) -> Path:
        """The source model, after checking it is the one the plan was made from."""
        why = ""
        if self.model is None:
            why = "plan.json does not say where the source model is"
        elif not self.model.is_file():
            why = f"the source model {self.model} is not there"
        elif not self._model_checked:
            if file_sha256(self.model) != self.original.model.sha256:
                why = f"{self.model} changed since the plan was made (sha256 differs)"
            else:
                self._model_checked = True
        if why:
            raise NoCapacity(f"lost {', '.join(lost)} and cannot re-plan: {why}; pass the "
                             "model with `edge coordinator --model`, or add standby devices "
                             "to cluster.yaml")
        assert self.model is not None
        return self.model
