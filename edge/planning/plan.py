"""The plan: pure data that the planning half writes and the running half reads.

A plan is written once by ``edge plan`` as ``plan.json`` next to a ``shards/`` folder, and
read by the coordinator. Nothing in here imports onnx, onnxruntime or grpc, so both halves
(and a worker on a Pi) can use it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

from edge.errors import ConfigError

__all__ = [
    "PLAN_VERSION",
    "Dim",
    "TensorSpec",
    "Device",
    "MODES",
    "ShardFile",
    "StagePrediction",
    "Stage",
    "ModelInfo",
    "Plan",
    "load_plan",
]

PLAN_VERSION = 1

# How a stage holds its weights, from most faithful to most frugal. The planner takes the
# first one that fits the device:
#   fp32       weights memory-mapped from external data files; onnxruntime's arena on;
#   fp32-lean  as fp32, with the arena and memory-pattern planning off (less resident
#              memory for a little speed);
#   int8       weights quantized per channel (onnxruntime dynamic quantization), lean.
MODES = ("fp32", "fp32-lean", "int8")

# A dimension is a fixed size (int), a named symbolic size shared across tensors ("batch"),
# or None when nothing is known about it.
Dim = Union[int, str, None]


@dataclass(frozen=True)
class TensorSpec:
    """Name, numpy dtype name and shape of a tensor that crosses a boundary."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def describe(self) -> str:
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name} {self.dtype}[{dims}]"

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "TensorSpec":
        return TensorSpec(name=d["name"], dtype=d["dtype"], shape=tuple(d["shape"]))


@dataclass(frozen=True)
class Device:
    """One device of the cluster, as the planner sees it.

    Attributes:
        name: the user's name for it (``pi-1``).
        address: ``host:port`` of its worker.
        profile: the device-class profile it was built from (``rpi4b-2gb``).
        memory_mb: memory (MiB) a worker on it may use, runtime floor included.
        gflops: effective fp32 GFLOP/s that onnxruntime reaches on it.
        bandwidth_mbps: link bandwidth in Mbit/s.
        runtime_floor_mb: resident memory (MiB) of an idle worker process on it.
        standby: True for a spare device that holds no stage until a failover.
    """

    name: str
    address: str
    profile: str
    memory_mb: float
    gflops: float
    bandwidth_mbps: float
    runtime_floor_mb: float = 72.0
    standby: bool = False

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Device":
        return Device(**d)


@dataclass(frozen=True)
class ShardFile:
    """An external-data file that a shard's ``.onnx`` references by its file name.

    Attributes:
        path: relative to the plan's folder; the ``.onnx`` names it by ``basename(path)``.
        sha256: hex digest of its bytes.
        size: bytes.
        random_access: True for tables read a few rows at a time (embeddings): the worker
            tells the kernel not to read ahead, so only the touched rows become resident.
    """

    path: str
    sha256: str
    size: int
    random_access: bool = False

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "ShardFile":
        return ShardFile(**d)


@dataclass(frozen=True)
class StagePrediction:
    """What the planner expects a stage to cost on its device."""

    weights_mb: float
    activations_mb: float
    runtime_floor_mb: float
    memory_mb: float
    gflops: float
    compute_ms: float
    transfer_ms: float
    time_ms: float

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "StagePrediction":
        return StagePrediction(**d)


@dataclass(frozen=True)
class Stage:
    """One contiguous range of the model's nodes, on one device.

    Attributes:
        index: position in the pipeline, from 0.
        device: where it runs.
        node_range: ``[start, end)`` in the topological order of the source graph.
        inputs: every tensor the stage receives, i.e. every tensor live across the cut at
            ``start``. Some of them it only passes on.
        outputs: every tensor the stage sends on: those live across the cut at ``end``, or
            the model's outputs for the last stage.
        shard: path of the stage's ``.onnx`` file, relative to the plan's folder.
        sha256: hex digest of that file.
        shard_bytes: its size.
        predicted: memory and time the planner expects.
        data_files: external-data files the ``.onnx`` references, in the same folder.
        mode: how the stage holds its weights, one of :data:`MODES`.
    """

    index: int
    device: Device
    node_range: tuple[int, int]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    shard: str
    sha256: str
    shard_bytes: int
    predicted: StagePrediction
    data_files: tuple[ShardFile, ...] = ()
    mode: str = "fp32"

    @property
    def total_bytes(self) -> int:
        """Bytes to upload: the ``.onnx`` and its data files."""
        return self.shard_bytes + sum(f.size for f in self.data_files)

    @property
    def passthrough(self) -> tuple[str, ...]:
        """Names the stage receives and sends on unchanged (for example an open skip)."""
        outs = {t.name for t in self.outputs}
        return tuple(t.name for t in self.inputs if t.name in outs)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Stage":
        return Stage(
            index=d["index"],
            device=Device.from_dict(d["device"]),
            node_range=tuple(d["node_range"]),
            inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            shard=d["shard"],
            sha256=d["sha256"],
            shard_bytes=d["shard_bytes"],
            predicted=StagePrediction.from_dict(d["predicted"]),
            data_files=tuple(ShardFile.from_dict(f) for f in d.get("data_files", ())),
            mode=d.get("mode", "fp32"),
        )


@dataclass(frozen=True)
class ModelInfo:
    """The source model the plan was made from."""

    name: str
    sha256: str
    num_nodes: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # The concrete sizes the costs were computed for, e.g. {"batch": 1, "sequence": 128}.
    bindings: dict[str, int] = field(default_factory=dict)
    # Where the source .onnx was, relative to plan.json's folder when it can be: a
    # coordinator re-plans from it when a device is lost. "" when unknown.
    path: str = ""

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "ModelInfo":
        return ModelInfo(
            name=d["name"],
            sha256=d["sha256"],
            num_nodes=d["num_nodes"],
            inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            bindings=dict(d.get("bindings", {})),
            path=d.get("path", ""),
        )


@dataclass(frozen=True)
class Plan:
    """A model split into stages, one per device, in pipeline order.

    Attributes:
        model: the source model.
        stages: one per device, in pipeline order.
        standby: spare devices listed in the cluster that hold no stage.
        bottleneck_ms: predicted time of the slowest stage (the pipeline's period).
        latency_ms: predicted end-to-end time of one request.
        modes: the modes the stages were allowed, in order of preference (a re-plan
            after a failover keeps them).
        version: format version of plan.json.
    """

    model: ModelInfo
    stages: tuple[Stage, ...]
    standby: tuple[Device, ...] = ()
    bottleneck_ms: float = 0.0
    latency_ms: float = 0.0
    modes: tuple[str, ...] = MODES
    version: int = PLAN_VERSION

    @property
    def devices(self) -> tuple[Device, ...]:
        """The devices holding a stage, in pipeline order."""
        return tuple(s.device for s in self.stages)

    def source_model(self, plan_dir: str | Path) -> Path | None:
        """The source model's path (``model.path`` resolved against ``plan_dir``), or None."""
        if not self.model.path:
            return None
        return (Path(plan_dir) / self.model.path).resolve()

    @property
    def plan_id(self) -> str:
        """A short id that changes whenever any stage's shard changes."""
        import hashlib

        h = hashlib.sha256()
        for s in self.stages:
            h.update(f"{s.index}:{s.device.name}:{s.sha256};".encode())
        return h.hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Plan":
        return Plan(
            version=d["version"],
            model=ModelInfo.from_dict(d["model"]),
            stages=tuple(Stage.from_dict(s) for s in d["stages"]),
            standby=tuple(Device.from_dict(x) for x in d.get("standby", ())),
            bottleneck_ms=d.get("bottleneck_ms", 0.0),
            latency_ms=d.get("latency_ms", 0.0),
            modes=tuple(d.get("modes", MODES)),
        )


def load_plan(path: str | Path) -> Plan:
    """Read ``plan.json``, with errors that name the file and the field.

    Args:
        path: the plan file.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such plan file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    version = raw.get("version")
    if version != PLAN_VERSION:
        raise ConfigError(
            f"{path}: field 'version': expected {PLAN_VERSION}, got {version!r} "
            "(re-run `edge plan` with this version of edge)")
    try:
        return Plan.from_dict(raw)
    except KeyError as e:
        raise ConfigError(f"{path}: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: malformed field ({e})") from None
