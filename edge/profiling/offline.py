"""Offline memory profile of a model: what each layer weighs, computes and holds, and what
each possible cut between layers would send, without running a worker.

Everything is derived from :func:`edge.planning.graph.analyze`, so the numbers are the
planner's own numbers, grouped into layers a person can read.

**Grouping rule** (generic: the runtime knows graphs, not model names).

1. A *named* initializer is one whose name is a dotted module path (``a.b.weight``);
   exporter constants (``val_95``, ``onnx::MatMul_12``, ``zeros``) are anonymous.
2. The path components shared by every named initializer are dropped (``model.`` in a
   Hugging Face export). A name's *key* is then its prefix up to and including the first
   numeric component (``encoder.layer.3.attention.self.query.bias`` -> ``encoder.layer.3``,
   ``enc.1.0.weight`` -> ``enc.1``), or its first component when none is numeric
   (``embeddings.word_embeddings.weight`` -> ``embeddings``).
3. A node is *keyed* by the first named initializer it is the first user of (tied
   weights do not re-open an old group). Consecutive keyed nodes with the same key belong
   to one group.
4. Between the last node of key A and the next node of key B, the boundary goes just
   before the first node that reads *any* initializer. Pure ops that follow a layer's last
   weight (activations, residual adds, pooling) stay with it; the op that multiplies by a
   weight the exporter left anonymous (dynamo's transposed MatMul weights) opens the next
   group together with the bias that names it. Leading nodes join the first group, trailing
   nodes the last. A model without named initializers is one group.

Groups are therefore contiguous node ranges that cover the graph, and each group's
parameter bytes are the bytes of the initializers its nodes are the first to use, so they
sum exactly to the model's initializer bytes.

**Cut classification.** A cut's cost is compared with the median of ``cut_bytes`` over all
interior positions (1..n-1) of the graph, the size of a "typical" cut (for a transformer,
between the hidden state plus the attention mask at a layer boundary and the several
tensors live inside attention): ``cheap`` up to 1.25x the median (within a quarter of a
typical cut, about the same time on the wire), ``moderate`` up to 2.5x, ``costly`` above.
The median, not the mean, so a few huge cuts (a UNet's open skips) do not make every other
cut look cheap.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx

from edge.planning.graph import GraphCosts, analyze
from edge.planning.memory import MiB, stage_memory_mb

__all__ = [
    "DEFAULT_FLOOR_MB",
    "CHEAP_MAX_RATIO",
    "MODERATE_MAX_RATIO",
    "NodeGroup",
    "Cut",
    "OfflineProfile",
    "group_nodes",
    "classify_cut",
    "profile_model",
    "render_offline",
    "write_offline",
]

# Idle worker RSS on a Pi-class board (numpy + onnxruntime + grpc imported), MiB.
DEFAULT_FLOOR_MB = 72.0

# Cut cost relative to the median interior cut (see module docstring).
CHEAP_MAX_RATIO = 1.25
MODERATE_MAX_RATIO = 2.5

_NUMERIC = re.compile(r"^\d+$")


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class NodeGroup:
    """A contiguous range of nodes ``[start, end)`` that reads as one layer.

    Attributes:
        index: position of the group in the graph.
        name: the group key (see module docstring), e.g. ``encoder.layer.3``.
        start, end: node range, topological order.
        num_ops: ``end - start``.
        top_ops: the most frequent op types, ``(op, count)``, most frequent first.
        param_bytes: bytes of the initializers the group's nodes are first to use.
        peak_activation_bytes: peak live activation bytes while the group runs.
        flops: estimated floating point operations.
        cum_param_bytes: parameter bytes of groups ``0..index``.
        cum_peak_activation_bytes: peak live activations over groups ``0..index``.
        cum_bytes: ``cum_param_bytes + cum_peak_activation_bytes``.
        cum_predicted_mb: predicted peak RSS of one worker running groups ``0..index``
            (``stage_memory_mb`` with the profile's floor).
    """

    index: int
    name: str
    start: int
    end: int
    num_ops: int
    top_ops: tuple[tuple[str, int], ...]
    param_bytes: int
    peak_activation_bytes: int
    flops: float
    cum_param_bytes: int
    cum_peak_activation_bytes: int
    cum_bytes: int
    cum_predicted_mb: float


@dataclass(frozen=True)
class Cut:
    """A cut at node position ``position`` (just before that node).

    Attributes:
        position: cut position, 1..n-1.
        before_group, after_group: names of the groups on either side (equal when the cut
            falls inside a group).
        bytes: bytes of every tensor crossing the cut (``GraphCosts.cut_bytes``).
        num_tensors: how many tensors cross it.
        tensors: ``(name, bytes)`` of each crossing tensor, largest first.
        ratio: ``bytes`` over the median interior cut.
        cost: ``cheap`` / ``moderate`` / ``costly`` (see :func:`classify_cut`).
    """

    position: int
    before_group: str
    after_group: str
    bytes: int
    num_tensors: int
    tensors: tuple[tuple[str, int], ...]
    ratio: float
    cost: str


@dataclass(frozen=True)
class OfflineProfile:
    """Offline memory profile of one model at concrete input sizes.

    Attributes:
        model: the model file's path (the graph's name for an in-memory model).
        bindings: the symbolic dims' sizes the costs were computed at.
        num_nodes: nodes in the graph.
        total_param_bytes: bytes of all initializers.
        total_flops: estimated floating point operations of one run.
        peak_activation_bytes: peak live activations over the whole graph.
        floor_mb: runtime floor used for the predictions (MiB).
        whole_model_mb: predicted peak RSS of one worker running the whole model.
        median_cut_bytes: median of ``cut_bytes`` over interior positions.
        groups: the node groups, in graph order.
        cuts: one per group boundary, in graph order.
        cheapest_cuts: the cheapest interior cut positions, cheapest first, at most one
            per group (the cheapest cut before one of its nodes).
        notes: what intake changed to make the model plannable (a converted opset,
            folded constants, named dims).
    """

    model: str
    bindings: dict[str, int]
    num_nodes: int
    total_param_bytes: int
    total_flops: float
    peak_activation_bytes: int
    floor_mb: float
    whole_model_mb: float
    median_cut_bytes: float
    groups: tuple[NodeGroup, ...]
    cuts: tuple[Cut, ...]
    cheapest_cuts: tuple[Cut, ...]
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """A dict of plain values (``json.dumps`` writes its tuples as lists)."""
        return asdict(self)


# --------------------------------------------------------------------------- grouping


def _is_named(init: str) -> bool:
    # A module path has dots and no exporter punctuation ("onnx::MatMul_12" has neither
    # meaning nor a module).
    return "." in init and "::" not in init


def _common_prefix(names: Sequence[str]) -> int:
    """How many leading non-numeric path components every name shares (leaving at least
    one component before the leaf, so a key never becomes empty)."""
    parts = [n.split(".") for n in names]
    if not parts:
        return 0
    k = 0
    shortest = min(len(p) for p in parts)
    while (k < shortest - 2 and not _NUMERIC.match(parts[0][k])
           and all(p[k] == parts[0][k] for p in parts)):
        k += 1
    return k


def _key(init: str, strip: int) -> str:
    parts = init.split(".")[strip:]
    for i, c in enumerate(parts[:-1]):  # the last component is the leaf (weight, bias)
        if _NUMERIC.match(c):
            return ".".join(parts[: i + 1])
    return parts[0]


def group_nodes(costs: GraphCosts) -> list[tuple[str, int, int]]:
    """Split the graph into contiguous node ranges that read as layers.

    Args:
        costs: the analysed graph.

    Returns:
        ``(name, start, end)`` per group, covering ``0..num_nodes`` without gaps; see the
        module docstring for the rule.
    """
    n = costs.num_nodes
    named = [t for t in costs.init_names if _is_named(t)]
    strip = _common_prefix(named)
    seen: set[str] = set()
    keys: list[str | None] = []
    for inits in costs.node_inits:
        key = None
        for t in inits:
            if t not in seen:
                seen.add(t)
                if key is None and _is_named(t):
                    key = _key(t, strip)
        keys.append(key)

    keyed = [p for p in range(n) if keys[p] is not None]
    if not keyed:
        return [("model", 0, n)]
    starts = [(keys[keyed[0]], 0)]
    prev = keyed[0]
    for p in keyed[1:]:
        if keys[p] != keys[prev]:
            # Boundary before the first node after `prev` that reads any initializer.
            b = next(q for q in range(prev + 1, p + 1) if costs.node_inits[q])
            starts.append((keys[p], b))
        prev = p
    out = []
    for k, (name, s) in enumerate(starts):
        e = starts[k + 1][1] if k + 1 < len(starts) else n
        out.append((name, s, e))
    return out


def classify_cut(nbytes: float, median_bytes: float) -> tuple[float, str]:
    """Cost class of a cut carrying ``nbytes`` when the median interior cut carries
    ``median_bytes``.

    Args:
        nbytes: bytes crossing the cut.
        median_bytes: median of ``cut_bytes`` over interior positions.

    Returns:
        ``(ratio, cost)``, cost one of ``cheap`` (ratio <= 1.25), ``moderate`` (<= 2.5),
        ``costly``.
    """
    ratio = float(nbytes) / median_bytes if median_bytes > 0 else (0.0 if nbytes == 0
                                                                   else float("inf"))
    if ratio <= CHEAP_MAX_RATIO:
        return ratio, "cheap"
    if ratio <= MODERATE_MAX_RATIO:
        return ratio, "moderate"
    return ratio, "costly"


# --------------------------------------------------------------------------- profile


def _cut(costs: GraphCosts, p: int, median: float, group_of: np.ndarray,
         names: list[str]) -> Cut:
    tensors = sorted(((t, int(costs.tensor_bytes[t])) for t in costs.crossing(p)),
                     key=lambda x: (-x[1], x[0]))
    ratio, cost = classify_cut(int(costs.cut_bytes[p]), median)
    return Cut(position=p, before_group=names[group_of[p - 1]], after_group=names[group_of[p]],
               bytes=int(costs.cut_bytes[p]), num_tensors=len(tensors), tensors=tuple(tensors),
               ratio=round(ratio, 4), cost=cost)


def profile_model(model_path: str | Path | onnx.ModelProto, bindings: dict[str, int] | None = None, *,
                  floor_mb: float = DEFAULT_FLOOR_MB, top_k: int = 5,
                  sample: Mapping[str, np.ndarray] | None = None) -> OfflineProfile:
    """Profile a model's memory by layer and by cut, offline.

    Args:
        model_path: the ``.onnx`` file (external data is loaded), or a loaded model.
        bindings: sizes of the symbolic input dims, e.g. ``{"batch": 1, "sequence": 128}``
            (see :func:`edge.planning.graph.analyze`).
        floor_mb: idle worker RSS (MiB) added to every memory prediction.
        top_k: how many of the cheapest interior cut positions to list (one per group).
        sample: a real input per model input name: binds the dims, shapes measured on it.

    Returns:
        The frozen OfflineProfile.
    """
    costs = analyze(model_path, bindings, sample)
    n = costs.num_nodes
    spans = group_nodes(costs)
    names = [s[0] for s in spans]
    group_of = np.zeros(n, dtype=np.int64)
    for k, (_, s, e) in enumerate(spans):
        group_of[s:e] = k

    groups = []
    cum_params = 0
    cum_act = 0
    for k, (name, s, e) in enumerate(spans):
        params = int(costs.param_bytes[s:e].sum())
        act = costs.activation_peak(s, e)
        cum_params += params
        cum_act = max(cum_act, act)
        ops = Counter(costs.op_types[s:e]).most_common(3)
        groups.append(NodeGroup(
            index=k, name=name, start=s, end=e, num_ops=e - s,
            top_ops=tuple((o, int(c)) for o, c in ops), param_bytes=params,
            peak_activation_bytes=act, flops=float(costs.flops[s:e].sum()),
            cum_param_bytes=cum_params, cum_peak_activation_bytes=cum_act,
            cum_bytes=cum_params + cum_act,
            cum_predicted_mb=round(float(stage_memory_mb(cum_params, cum_act, floor_mb)), 3)))

    interior = costs.cut_bytes[1:n]
    median = float(np.median(interior)) if len(interior) else 0.0
    cuts = tuple(_cut(costs, s, median, group_of, names) for _, s, _ in spans[1:])

    # Cheapest positions: the cheapest cut before a node of each group (its boundary
    # included), then the K cheapest of those. One per group spreads the list over the
    # graph; otherwise the handful of nearly equal cuts around one layer's residual fill it.
    best = []
    for _, s, e in spans:
        ps = range(max(s, 1), min(e, n))
        if ps:
            best.append(min(ps, key=lambda p: (int(costs.cut_bytes[p]), len(costs.crossing(p)),
                                                p)))
    best.sort(key=lambda p: (int(costs.cut_bytes[p]), len(costs.crossing(p)), p))
    cheapest = tuple(_cut(costs, p, median, group_of, names) for p in best[:top_k])

    total = costs.total_param_bytes
    peak = costs.activation_peak(0, n)
    return OfflineProfile(
        model=(model_path.graph.name or "model") if isinstance(model_path, onnx.ModelProto)
        else str(model_path), bindings=dict(costs.bindings), num_nodes=n,
        total_param_bytes=int(total), total_flops=float(costs.flops.sum()),
        peak_activation_bytes=int(peak), floor_mb=float(floor_mb),
        whole_model_mb=round(float(stage_memory_mb(total, peak, floor_mb)), 3),
        median_cut_bytes=median, groups=tuple(groups), cuts=cuts, cheapest_cuts=cheapest,
        notes=tuple(costs.notes))


# --------------------------------------------------------------------------- output


def _fmt_bytes(b: float) -> str:
    if b >= MiB:
        return f"{b / MiB:.2f} MiB"
    if b >= 1024:
        return f"{b / 1024:.1f} KiB"
    return f"{int(b)} B"


def _fmt_flops(f: float) -> str:
    if f >= 1e9:
        return f"{f / 1e9:.2f} G"
    if f >= 1e6:
        return f"{f / 1e6:.1f} M"
    if f >= 1e3:
        return f"{f / 1e3:.1f} k"
    return f"{f:.0f}"


_COST_STYLE = {"cheap": "green", "moderate": "yellow", "costly": "red"}


def render_offline(profile: OfflineProfile, console) -> None:
    """Print the layer table, the cut table and the cheapest cut positions.

    Args:
        profile: from :func:`profile_model`.
        console: a ``rich.console.Console``.
    """
    from rich.table import Table

    p = profile
    for note in p.notes:
        console.print(f"[yellow]intake:[/yellow] {note}")
    binds = ", ".join(f"{k}={v}" for k, v in p.bindings.items()) or "static shapes"
    t = Table(title=f"{Path(p.model).name} at {binds}: {p.num_nodes} nodes, "
                    f"{_fmt_bytes(p.total_param_bytes)} weights, "
                    f"{_fmt_flops(p.total_flops)}FLOP; whole model on one worker "
                    f"≈ {p.whole_model_mb:.0f} MiB (floor {p.floor_mb:g})",
              title_justify="left")
    t.add_column("#", justify="right")
    t.add_column("group")
    t.add_column("nodes", justify="right")
    t.add_column("ops", justify="right")
    t.add_column("main ops")
    t.add_column("params", justify="right")
    t.add_column("act. peak", justify="right")
    t.add_column("FLOP", justify="right")
    t.add_column("cum. params+act", justify="right")
    t.add_column("cum. MiB", justify="right")
    for g in p.groups:
        t.add_row(str(g.index), g.name, f"{g.start}–{g.end - 1}", str(g.num_ops),
                  ", ".join(f"{o}×{c}" for o, c in g.top_ops),
                  _fmt_bytes(g.param_bytes), _fmt_bytes(g.peak_activation_bytes),
                  _fmt_flops(g.flops), _fmt_bytes(g.cum_bytes), f"{g.cum_predicted_mb:.1f}")
    console.print(t)

    def cut_table(title: str, cuts: Sequence[Cut]) -> Table:
        ct = Table(title=title, title_justify="left")
        ct.add_column("before node", justify="right")
        ct.add_column("between")
        ct.add_column("bytes", justify="right")
        ct.add_column("tensors", justify="right")
        ct.add_column("largest")
        ct.add_column("× median", justify="right")
        ct.add_column("cost")
        for c in cuts:
            between = (c.before_group if c.before_group == c.after_group
                       else f"{c.before_group} | {c.after_group}")
            largest = c.tensors[0][0] if c.tensors else "—"
            style = _COST_STYLE.get(c.cost, "")
            ct.add_row(str(c.position), between, _fmt_bytes(c.bytes), str(c.num_tensors),
                       largest, f"{c.ratio:.2f}", f"[{style}]{c.cost}[/]")
        return ct

    median = _fmt_bytes(p.median_cut_bytes)
    if p.cuts:
        console.print(cut_table(f"Cuts at group boundaries (median interior cut {median}; "
                                f"cheap ≤ {CHEAP_MAX_RATIO:g}×, moderate ≤ "
                                f"{MODERATE_MAX_RATIO:g}×, costly above)", p.cuts))
    if p.cheapest_cuts:
        console.print(cut_table(f"Cheapest {len(p.cheapest_cuts)} cut positions "
                                f"(the best one per group)", p.cheapest_cuts))


def write_offline(profile: OfflineProfile, out_dir: str | Path) -> Path:
    """Write ``report.json`` (``profile.to_dict()``) into ``out_dir``.

    Args:
        profile: from :func:`profile_model`.
        out_dir: directory, created if missing.

    Returns:
        The path of ``report.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    path.write_text(json.dumps(profile.to_dict(), indent=2) + "\n")
    return path
