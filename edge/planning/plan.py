"""The plan: pure data that the planning half writes and the running half reads.

A plan is written once by ``edge plan`` as ``plan.json`` next to a ``shards/`` folder, and
read by the coordinator. Nothing in here imports onnx, onnxruntime or grpc, so both halves
(and a worker on a Pi) can use it.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from edge.errors import ConfigError
from edge.planning.schema import FieldError, Schema, Table, is_int, is_number, show_json
from edge.spec import KV_DTYPES, MODES, Dim, TensorSpec

__all__ = [
    "PLAN_VERSION",
    "Dim",
    "TensorSpec",
    "Device",
    "MODES",
    "INT8_MIN_COSINE",
    "ShardFile",
    "StagePrediction",
    "Generation",
    "Stage",
    "ModelInfo",
    "Plan",
    "load_plan",
    "plan_file",
    "dim_expression",
    "dim_value",
    "free_sizes",
]

PLAN_VERSION = 1

# How a stage holds its weights (MODES, in order of preference) and what each mode costs:
# edge.spec.MODE_TABLE.

# The lowest cosine similarity with the fp32 model's outputs that the planner accepts for a
# stage in int8 (measured at plan time on the whole model, that stage quantized:
# edge.shards.accuracy). onnxruntime's dynamic quantization of resnet50 keeps 0.984, which
# is too far; per-channel int8 BERT stages keep >= 0.999.
INT8_MIN_COSINE = 0.99


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
    # Per symbolic dim, the power of its growth that bounds the activations (see
    # GraphCosts.activation_degrees); empty in plans made before it was recorded.
    activation_degrees: dict[str, int] = field(default_factory=dict)
    # Tensor by tensor, the distinct {dim: degree} that bound the activations (see
    # GraphCosts.activation_growth); empty in plans made before it was recorded, which
    # are then bounded by activation_degrees alone.
    activation_growth: tuple[dict[str, int], ...] = ()
    # A decoder's KV caches at the plan's context and sequences (MiB, included in
    # memory_mb), and the time of one decode step (ms; the planner's objective for such
    # a plan: time_ms is then the prefill's). 0 for other models and older plans.
    kv_cache_mb: float = 0.0
    decode_ms: float = 0.0

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "StagePrediction":
        return StagePrediction(**{**d, "activation_growth": tuple(
            dict(v) for v in d.get("activation_growth", ()))})

    def memory_at(self, bindings: dict[str, int], sizes: dict[str, int],
                  derived: Mapping[str, str] | None = None) -> float | None:
        """Predicted peak MiB for a request of ``sizes`` on a plan made at ``bindings``:
        each tensor grows by at most ``(size / planned) ** degree`` in each independent dim
        it grows with (``activation_growth``; in plans without it, every dim's highest
        degree, multiplied), and the activations by at most the most any tensor does; they
        never shrink below the plan. None if the plan does not record how they grow.

        A dim that follows from others (``derived``, or one named by an expression such as
        ``past_sequence_length + 1``) adds no factor of its own: its growth is that of the
        dims it follows from, whose degrees were measured with it moving along. Multiplying
        both (a KV cache's past and total lengths) once bounded a 2.5 MiB decode step by
        20 GiB.

        Args:
            bindings: the sizes the plan was made for (``ModelInfo.bindings``).
            sizes: the request's size of each symbolic dim of the model's inputs.
            derived: dims of ``bindings`` that follow from others (``ModelInfo.derived``).
        """
        derived = derived or {}
        free = free_sizes(bindings, sizes, derived)
        ratio = {}
        for sym, planned in bindings.items():
            if planned <= 0:  # a decoder's empty past at prefill: its cache is the KV term
                continue
            k = free.get(sym, planned) / planned
            if sym not in derived and k > 1:
                if sym not in self.activation_degrees:
                    return None
                ratio[sym] = k
        if self.activation_growth:
            # each tensor grows by its own product; the activations by at most the largest
            scale = max([1.0] + [math.prod(ratio.get(sym, 1.0) ** d for sym, d in v.items())
                                 for v in self.activation_growth])
        else:
            scale = math.prod(k ** self.activation_degrees[sym] for sym, k in ratio.items())
        return self.memory_mb + self.activations_mb * (scale - 1)


def dim_expression(name: str) -> tuple[dict[str, int], int] | None:
    """The linear form of a dim named by an expression of other dims, as exporters write
    them (optimum, torch's dynamo exporter: ``past_sequence_length + 1``,
    ``past_sequence_length + sequence_length``): ``({dim: coefficient}, constant)``.

    None for a plain name, and for anything that is not a sum of integer multiples of
    names and integers (such a dim is then bound like any other).

    Args:
        name: a ``dim_param``.
    """
    if not any(c in name for c in "+-*"):
        return None
    # Dim names need not be identifiers ("x:0", "p2o.DynamicDimension.0"): each name
    # token stands in as one for parsing.
    parts = [p.strip() for p in re.split(r"([+*()-])", name.strip())]
    alias: dict[str, str] = {}
    for k, tok in enumerate(parts):
        if tok and tok not in "+*()-" and not tok.isdigit():
            alias.setdefault(tok, f"_d{len(alias)}")
            parts[k] = alias[tok]
    back = {v: k for k, v in alias.items()}
    try:
        tree = ast.parse("".join(parts), mode="eval").body
    except (SyntaxError, ValueError):
        return None
    terms: dict[str, int] = {}
    const = 0

    def walk(node: ast.AST, sign: int) -> bool:
        nonlocal const
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
            return walk(node.left, sign) and walk(
                node.right, -sign if isinstance(node.op, ast.Sub) else sign)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return walk(node.operand, -sign if isinstance(node.op, ast.USub) else sign)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            for a, b in ((node.left, node.right), (node.right, node.left)):
                if isinstance(a, ast.Constant) and type(a.value) is int:
                    return walk(b, sign * a.value)
            return False
        if isinstance(node, ast.Name) and node.id in back:
            terms[back[node.id]] = terms.get(back[node.id], 0) + sign
            return True
        if isinstance(node, ast.Constant) and type(node.value) is int:
            const += sign * node.value
            return True
        return False

    if not walk(tree, 1):
        return None
    terms = {k: v for k, v in terms.items() if v}
    return (terms, const) if terms else None


def dim_value(expression: str, sizes: Mapping[str, int]) -> int | None:
    """The size of an expression dim (``dim_expression``) at ``sizes``; None if it is not
    one or names a dim ``sizes`` lacks.

    Args:
        expression: e.g. ``past_sequence_length + sequence_length``.
        sizes: sizes of the dims it names.
    """
    form = dim_expression(expression)
    if form is None or any(k not in sizes for k in form[0]):
        return None
    terms, const = form
    return const + sum(c * int(sizes[k]) for k, c in terms.items())


def free_sizes(bindings: Mapping[str, int], sizes: Mapping[str, int],
               derived: Mapping[str, str] | None = None) -> dict[str, int]:
    """A request's sizes of the plan's dims, each dim that follows from others checked
    against them.

    A derived dim larger than its expression of the request's own sizes (a total length
    beyond past + new) is a request the model would reject; until it does, its tensors of
    that length exist, so the excess is counted in every dim the expression grows with,
    which keeps the bound an upper bound.

    Args:
        bindings: the plan's sizes.
        sizes: the request's sizes, by dim name (expression dims included).
        derived: dims of ``bindings`` that follow from others: name -> expression.
    """
    out = {**bindings, **{k: int(v) for k, v in sizes.items() if k in bindings}}
    relations = dict(derived or {})
    for name in sizes:
        if name not in bindings and name not in relations and dim_expression(name):
            relations[name] = name
    for name, expression in relations.items():
        if name not in sizes:
            continue
        form = dim_expression(expression)
        value = dim_value(expression, out)
        if form is None or value is None or int(sizes[name]) <= value:
            continue
        excess = int(sizes[name]) - value
        for k, c in form[0].items():
            if c > 0:
                out[k] += math.ceil(excess / c)
    return out


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
        int8_cosine: for an int8 stage, the cosine similarity of the model's outputs with
            this stage quantized (the rest fp32) against the fp32 model, measured when
            planning; None for other modes and in plans made before it was measured.
        state: for a decoder with KV caches, the stage's (past input, present output)
            pairs (``past_key_values.3.key``, ``present.3.key``): kept on the stage per
            sequence, never sent. Empty for models without state.
        kv_bytes_per_token: bytes those caches grow by per token of one sequence, as the
            stage stores them (``Generation.kv_dtype``: half for fp16).
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
    int8_cosine: float | None = None
    state: tuple[tuple[str, str], ...] = ()
    kv_bytes_per_token: int = 0

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
            int8_cosine=d.get("int8_cosine"),
            state=tuple((a, b) for a, b in d.get("state", ())),
            kv_bytes_per_token=d.get("kv_bytes_per_token", 0),
        )


@dataclass(frozen=True)
class Generation:
    """How a decoder with KV caches is served (``edge plan --context --sequences``).

    Attributes:
        context: tokens per sequence, prompt and generated, that the caches are planned for;
            a longer request is refused before it reaches a worker.
        sequences: sequences whose caches the stages hold at once; more wait in the
            coordinator's queue.
        prefill: the longest prompt the stages' activations were planned for.
        tokenizer: the folder (relative to plan.json) with ``tokenizer.json`` and the chat
            template, copied from beside the model; "" when the model came without one.
        eos_token_ids: tokens that end a sequence.
        kv_dtype: how the stages store the caches between steps, a key of ``KV_DTYPES``
            ("fp32", or "fp16": half the memory, cast back to float32 for each step).
        kv_cosine: for a kv_dtype other than fp32, the worst cosine of the logits with
            caches stored so against fp32 caches, over teacher-forced decode steps,
            measured when planning; None for fp32.
    """

    context: int
    sequences: int
    prefill: int
    tokenizer: str = ""
    eos_token_ids: tuple[int, ...] = ()
    kv_dtype: str = "fp32"
    kv_cosine: float | None = None

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Generation":
        return Generation(context=d["context"], sequences=d["sequences"],
                          prefill=d["prefill"], tokenizer=d.get("tokenizer", ""),
                          eos_token_ids=tuple(d.get("eos_token_ids", ())),
                          kv_dtype=d.get("kv_dtype", "fp32"), kv_cosine=d.get("kv_cosine"))


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
    # A real input the plan was measured on (``edge plan --sample``), copied next to
    # plan.json so that a re-plan after a failover measures on it too. "" when none.
    sample: str = ""
    # What intake changed to make the model plannable (edge.planning.intake), for people.
    notes: tuple[str, ...] = ()
    # Dims of the bindings that follow from others (a KV cache's total length:
    # "total_sequence_length": "past_sequence_length + sequence_length"), as the planner
    # found them: a request's memory grows with the dims they follow from, counted once.
    derived: dict[str, str] = field(default_factory=dict)
    # The largest size of a dim that the model's own weights allow (512 learned positions:
    # {"sequence": 512}); a larger request is refused whatever the memory.
    limits: dict[str, int] = field(default_factory=dict)
    # A decoder served with KV caches (edge generate); None for other models.
    generation: Generation | None = None

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
            sample=d.get("sample", ""),
            notes=tuple(d.get("notes", ())),
            derived=dict(d.get("derived", {})),
            limits=dict(d.get("limits", {})),
            generation=(Generation.from_dict(d["generation"]) if d.get("generation")
                        else None),
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
        int8_min_cosine: the accuracy an int8 stage had to keep (``Stage.int8_cosine``);
            a re-plan keeps it too.
        version: format version of plan.json.
    """

    model: ModelInfo
    stages: tuple[Stage, ...]
    standby: tuple[Device, ...] = ()
    bottleneck_ms: float = 0.0
    latency_ms: float = 0.0
    modes: tuple[str, ...] = MODES
    int8_min_cosine: float = INT8_MIN_COSINE
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
        h = hashlib.sha256()
        for s in self.stages:
            h.update(f"{s.index}:{s.device.name}:{s.sha256};".encode())
        return h.hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["model"].get("generation") is None:
            d["model"].pop("generation", None)  # not a decoder served with KV caches
        return d

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
            int8_min_cosine=d.get("int8_min_cosine", INT8_MIN_COSINE),
        )


def plan_file(path: str | Path) -> Path:
    """``path`` itself, or ``path/plan.json`` if it is a folder (``edge plan --out``)."""
    path = Path(path)
    return path / "plan.json" if path.is_dir() else path


def load_plan(path: str | Path) -> Plan:
    """Read ``plan.json``, with errors that name the file and the field.

    Args:
        path: the plan file, or the folder ``edge plan --out`` wrote it to.
    """
    path = plan_file(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such plan file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the plan ({e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    version = raw.get("version")
    if version != PLAN_VERSION:
        raise ConfigError(
            f"{path}: field 'version': expected {PLAN_VERSION}, got {version!r} "
            "(re-run `edge plan` with this version of edge)")
    _SCHEMA.check(raw, _PLAN, str(path))
    plan = Plan.from_dict(raw)
    seen: dict[str, int] = {}
    for st in plan.stages:
        if st.device.address in seen:
            raise ConfigError(
                f"{path}: field 'stages[{st.index}].device.address': expected one address "
                f"per stage, got {st.device.address!r}, which stage {seen[st.device.address]} "
                "has too (one worker serves one stage)")
        seen[st.device.address] = st.index
    return plan


# --- what plan.json must hold -----------------------------------------------------------
# A table per object: field -> (kind, required), checked by edge.planning.schema like
# cluster.yaml and device profiles. Kinds are names below or in schema.SCALARS, nested
# tables, ("list", kind), or functions for values whose checks reach inside them.

_FieldError = FieldError  # the name plan.json's checks used before edge.planning.schema


def _is_relpath(v: Any) -> bool:
    return (isinstance(v, str) and bool(v) and "\0" not in v and not v.startswith("/")
            and ".." not in v.replace("\\", "/").split("/"))


_PLAN_KINDS: dict[str, tuple[str, Any]] = {
    # plan.json's strings are written by `edge plan`: any non-empty one will do.
    "str": ("a non-empty string", lambda v: isinstance(v, str) and bool(v)),
    "sha256": ("a sha256 as 64 lowercase hex digits",
               lambda v: isinstance(v, str) and len(v) == 64
               and all(c in "0123456789abcdef" for c in v)),
    "relpath": ("a path inside the plan's folder (relative, no '..')", _is_relpath),
    "optpath": ("\"\" or a path inside the plan's folder (relative, no '..')",
                lambda v: v == "" or _is_relpath(v)),
    "dim": ("a size >= 0, a symbol or null",
            lambda v: v is None or (isinstance(v, str) and bool(v)) or (is_int(v) and v >= 0)),
    "mode": (f"one of {', '.join(MODES)}", lambda v: v in MODES),
    "kv_dtype": (f"one of {', '.join(KV_DTYPES)}", lambda v: v in KV_DTYPES),
    "cosine": ("a cosine similarity in [-1, 1]", lambda v: is_number(v) and -1 <= v <= 1),
    "cosine?": ("a cosine similarity in [-1, 1] or null",
                lambda v: v is None or (is_number(v) and -1 <= v <= 1)),
    "range": ("[start, end] with 0 <= start <= end",
              lambda v: isinstance(v, list) and len(v) == 2 and all(is_int(x) for x in v)
              and 0 <= v[0] <= v[1]),
}
_SCHEMA = Schema(kinds=_PLAN_KINDS, show=show_json, label="field {!r}")


def _each(what: str, ok: Any, expected: str) -> Any:
    """A kind: an object whose every value passes ``ok``."""
    def check(v: Any, where: str) -> None:
        if not isinstance(v, dict):
            raise FieldError(where, f"expected {what}, got {_SCHEMA.got(v)}")
        for k, item in v.items():
            if not ok(item):
                raise FieldError(f"{where}.{k}", f"expected {expected}, got {_SCHEMA.got(item)}")
    check.what = what  # type: ignore[attr-defined]
    return check


_DEGREES = _each("an object of powers", lambda d: is_int(d) and 0 <= d <= 8,
                 "an integer 0-8")
_DERIVED = _each("an object of dim expressions",
                 lambda e: isinstance(e, str) and bool(dim_expression(e)),
                 "a sum of dims and integers (past_sequence_length + sequence_length)")
_BINDINGS = _each("an object of sizes", lambda n: is_int(n) and n > 0, "an integer > 0")
# A decoder is costed at its prefill, with an empty past (past_sequence 0).
_SIZES = _each("an object of sizes", lambda n: is_int(n) and n >= 0, "an integer >= 0")


def _stages(v: Any, where: str) -> None:
    """The stage list: at least one, each checked, their indexes in order."""
    _SCHEMA.fields(v, ("list", _STAGE), where)
    if not v:
        raise FieldError(where, "expected at least one stage, got none")
    for i, stage in enumerate(v):
        if stage["index"] != i:
            raise FieldError(f"{where}[{i}].index",
                             f"expected {i} (stages in order), got {stage['index']}")


_stages.what = "a list"  # type: ignore[attr-defined]

_TENSOR = Table({"name": ("str", True), "dtype": ("str", True),
                 "shape": (("list", "dim"), True)})
_DEVICE = Table({"name": ("str", True), "address": ("str", True), "profile": ("str", True),
                 "memory_mb": ("positive", True), "gflops": ("positive", True),
                 "bandwidth_mbps": ("positive", True), "runtime_floor_mb": ("number", False),
                 "standby": ("bool", False)})
_PREDICTION = Table({k: ("number", True) for k in (
    "weights_mb", "activations_mb", "runtime_floor_mb", "memory_mb", "gflops", "compute_ms",
    "transfer_ms", "time_ms")} | {"activation_degrees": (_DEGREES, False),
                                "activation_growth": (("list", _DEGREES), False),
                                "kv_cache_mb": ("number", False),
                                "decode_ms": ("number", False)})
_SHARD_FILE = Table({"path": ("relpath", True), "sha256": ("sha256", True),
                     "size": ("int", True), "random_access": ("bool", False)})
_STAGE = Table({"index": ("int", True), "device": (_DEVICE, True),
                "node_range": ("range", True), "inputs": (("list", _TENSOR), True),
                "outputs": (("list", _TENSOR), True), "shard": ("relpath", True),
                "sha256": ("sha256", True), "shard_bytes": ("count", True),
                "predicted": (_PREDICTION, True), "data_files": (("list", _SHARD_FILE), False),
                "mode": ("mode", False), "int8_cosine": ("cosine?", False),
                "state": (("list", ("list", "text")), False),
                "kv_bytes_per_token": ("int", False)})
_GENERATION = Table({"context": ("count", True), "sequences": ("count", True),
                     "prefill": ("count", True), "tokenizer": ("optpath", False),
                     "eos_token_ids": (("list", "int"), False),
                     "kv_dtype": ("kv_dtype", False), "kv_cosine": ("cosine?", False)})
_MODEL = Table({"name": ("text", True), "sha256": ("text", True), "num_nodes": ("int", True),
                "inputs": (("list", _TENSOR), True), "outputs": (("list", _TENSOR), True),
                "bindings": (_SIZES, False), "path": ("text", False),
                "sample": ("optpath", False), "notes": (("list", "text"), False),
                "derived": (_DERIVED, False), "limits": (_BINDINGS, False),
                "generation": (_GENERATION, False)})
_PLAN = Table({"version": ("int", True), "model": (_MODEL, True), "stages": (_stages, True),
               "standby": (("list", _DEVICE), False), "bottleneck_ms": ("number", False),
               "latency_ms": ("number", False), "modes": (("list", "mode"), False),
               "int8_min_cosine": ("cosine", False)})


def _check(v: Any, kind: Any, where: str) -> None:
    """Raise FieldError naming the first field of ``v`` that is not of ``kind``."""
    _SCHEMA.fields(v, kind, where)
