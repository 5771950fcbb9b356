"""Graph costs: what each node of an ONNX model weighs, computes and produces, and what
crosses each possible cut.

Positions: node ``p`` is the p-th node in topological order; a *cut* at position ``p``
(0..n) lies just before node ``p`` (``p == n`` is after the last node). The planner only ever
sees the arrays computed here; the shard builder uses the tensor bookkeeping.

Shapes are made concrete by binding the model's symbolic input dims (``bindings``), then
running ONNX shape inference with data propagation; tensors whose shape is still unknown are
measured by running the model once in onnxruntime with every intermediate as an output.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnx import helper, shape_inference

from edge.errors import GraphError
from edge.planning.intake import (ANONYMOUS_DIMS as _ANONYMOUS_DIMS, TARGET_OPSET,
                                  anonymous_dim, check_same, default_opset, normalize,
                                  set_nodes)
from edge.planning.plan import Dim, TensorSpec, dim_expression, dim_value
from edge.planning.limits import dim_limits
from edge.planning.scopes import node_reads
from edge.planning.state import apply_state, kv_bytes_per_token, share_shape_reads, state_pairs

__all__ = [
    "MIN_OPSET",
    "BATCH_DIM_NAMES",
    "GraphCosts",
    "WeightIndex",
    "analyze",
    "load_model",
]

log = logging.getLogger(__name__)

MIN_OPSET = TARGET_OPSET

# Symbolic input dims with one of these names default to 1 when not bound; every other
# unbound symbolic dim is an error, because guessing a sequence length or an image size
# would silently change every cost.
BATCH_DIM_NAMES = frozenset({"batch", "batch_size", "batchsize", "n", "b", "bs"})

# Small initializers (shape constants, axes, scalars) stay in the model used for shape
# inference so data propagation can compute Reshape/Expand targets; big ones are replaced
# by typed graph inputs so we never copy weights just to infer shapes.
_KEEP_INIT_BYTES = 4096

# Rough per-element flop counts for ops that do more than one op per output element.
_FLOPS_PER_ELEMENT = {
    "Softmax": 5, "LogSoftmax": 5, "LayerNormalization": 8, "BatchNormalization": 4,
    "InstanceNormalization": 8, "GroupNormalization": 8, "Erf": 4, "Gelu": 8, "Tanh": 4,
    "Sigmoid": 4, "Exp": 2, "Log": 2, "Pow": 2, "Sqrt": 2, "Div": 1,
}

_MiB = float(1 << 20)



@dataclass
class WeightIndex:
    """Which initializers each node range uses, for range queries over unique weights.

    ``init_bytes[k]`` is the size of initializer ``k`` and ``init_uses[k]`` the sorted node
    positions that use it. A range ``[i, j)`` holds initializer ``k`` iff some use lies in
    it; a tied weight used by two stages counts in both. (The planner sweeps all ranges
    with its own incremental structure; this answers single queries.)
    """

    n: int
    init_bytes: np.ndarray
    init_uses: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        # Flattened (position, initializer) pairs sorted by position: a scalar range query
        # is then a slice plus np.unique.
        if self.init_uses:
            pos = np.concatenate([np.asarray(u, dtype=np.int64) for u in self.init_uses])
            ids = np.concatenate([np.full(len(u), k, dtype=np.int64)
                                  for k, u in enumerate(self.init_uses)])
        else:
            pos = np.zeros(0, dtype=np.int64)
            ids = np.zeros(0, dtype=np.int64)
        order = np.argsort(pos, kind="stable")
        self._pos = pos[order]
        self._ids = ids[order]

    def weight_bytes(self, i: int, j: int) -> int:
        """Bytes of the unique initializers used by nodes in ``[i, j)``."""
        lo = np.searchsorted(self._pos, i, side="left")
        hi = np.searchsorted(self._pos, j, side="left")
        if hi <= lo:
            return 0
        return int(self.init_bytes[np.unique(self._ids[lo:hi])].sum())


@dataclass
class GraphCosts:
    """Per-node and per-cut costs of a model at concrete (bound) shapes.

    Attributes:
        model: the loaded model (weights included), reused by the shard builder.
        bindings: concrete sizes of the symbolic dims the costs were computed at.
        node_names, op_types: per node, topological order.
        param_bytes: per node, bytes of initializers it is the first to use (sums to the
            total initializer bytes).
        node_inits: per node, names of the initializers it uses (subgraphs included).
        node_inputs: per node, the non-initializer tensors it reads (subgraph implicit
            inputs included).
        node_outputs: per node, the tensors it produces.
        flops: per node, estimated floating point operations.
        output_bytes: per node, bytes of the tensors it produces.
        cut_bytes: per position 0..n, bytes of ``crossing(p)``.
        live_bytes: per node, bytes live while it runs: ``crossing(p)`` plus its outputs.
        specs: per tensor (graph inputs, node outputs), its symbolic TensorSpec.
        tensor_bytes: per tensor, bytes at the bound shapes.
        producer: per tensor, producing node position (-1 for graph inputs).
        last_use: per tensor, last consuming position (n for graph outputs, -1 if unused).
        graph_inputs, graph_outputs: names, in model order (initializers excluded).
        init_bytes, init_uses, init_names: see WeightIndex.
        init_table_uses: per initializer, the sorted positions (a subset of ``init_uses``)
            where it is read only as the table of a Gather (input 0): an embedding, of which
            a request touches a few rows. Empty tuple: no such uses.
        init_int8_bytes: per initializer, its bytes once the shard is quantized to int8
            (``edge.shards.quantize``): a quarter for MatMul/Conv weights and Gather tables,
            which dynamic quantization stores as 8-bit; unchanged for the rest. None: same
            as ``init_bytes``.
        tensor_degrees: per tensor, how its size grows with each independent dim of the
            bindings (see ``activation_degrees``).
        derived: dims of the bindings that follow from others, found by measuring (a KV
            cache's ``total_sequence_length``: ``past_sequence_length + sequence_length``);
            their growth is counted in the dims they follow from.
        notes: what intake changed to make the model plannable (a converted opset, folded
            constants, named dims), one line each for people.
        prepack_bytes, prepack_int8_bytes: per node, bytes of the weight a MatMul or Gemm
            prepacks when its shard is loaded (0 for other nodes), in fp32 and in int8.
        dim_limits: the largest size of a dim that the model's own weights allow (512
            learned positions: ``{"sequence": 512}``; see ``edge.planning.limits``).
        state: a decoder's (past input, present output) pairs (``edge.planning.state``):
            they stay on the stage holding their layer and never cross a cut, so
            ``producer``/``last_use`` start a past at its first consumer and end a
            present at its last one, and ``cut_bytes``/``live_bytes`` never count them.
        cut_ok: (n + 1,) bool, None when every cut is allowed: False where a cut would
            split a state pair over two stages.
        kv_token_bytes: (n,) per node, bytes per token of one sequence of the presents it
            produces; None for a model without state.
    """

    model: onnx.ModelProto
    bindings: dict[str, int]
    node_names: list[str]
    op_types: list[str]
    param_bytes: np.ndarray
    node_inits: list[list[str]]
    node_inputs: list[list[str]]
    node_outputs: list[list[str]]
    flops: np.ndarray
    output_bytes: np.ndarray
    cut_bytes: np.ndarray
    live_bytes: np.ndarray
    specs: dict[str, TensorSpec]
    tensor_bytes: dict[str, int]
    producer: dict[str, int]
    last_use: dict[str, int]
    graph_inputs: list[str]
    graph_outputs: list[str]
    init_names: list[str]
    init_bytes: np.ndarray
    init_uses: tuple[np.ndarray, ...]
    concrete_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    init_table_uses: tuple[np.ndarray, ...] = ()
    init_int8_bytes: np.ndarray | None = None
    tensor_degrees: dict[str, dict[str, int]] = field(default_factory=dict)
    prepack_bytes: np.ndarray | None = None
    prepack_int8_bytes: np.ndarray | None = None
    derived: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    dim_limits: dict[str, int] = field(default_factory=dict)
    state: tuple[tuple[str, str], ...] = ()
    cut_ok: np.ndarray | None = None
    kv_token_bytes: np.ndarray | None = None
    # Set when planning for generation (edge.build): the caches' bytes per node at the
    # plan's context and sequences, and the costs of one decode step (edge.planner).
    kv_bytes: np.ndarray | None = None
    # The part of kv_bytes that is the caches kept between steps; the rest is what a batch
    # of decode steps holds while it runs (edge.build).
    kv_stored_fraction: float = 1.0
    decode_flops: np.ndarray | None = None
    decode_cut_bytes: np.ndarray | None = None

    def __post_init__(self) -> None:
        self._weights = WeightIndex(self.num_nodes, self.init_bytes, self.init_uses)

    @property
    def num_nodes(self) -> int:
        return len(self.node_names)

    def crossing(self, p: int) -> list[str]:
        """Tensors live across the cut before node ``p``, in a stable order.

        A tensor crosses ``p`` when it is produced before ``p`` (graph inputs count as
        produced before 0) and consumed at or after ``p`` or is a graph output.
        Initializers never cross: each shard embeds the ones it uses.
        """
        if not 0 <= p <= self.num_nodes:
            raise IndexError(f"cut position must be in [0, {self.num_nodes}], got {p}")
        return [t for t in self._tensor_order if self.producer[t] < p <= self.last_use[t]]

    @property
    def travelling_inputs(self) -> list[str]:
        """The graph inputs that travel (stage 0 receives them): all but state."""
        pasts = {a for a, _ in self.state}
        return [t for t in self.graph_inputs if t not in pasts]

    @property
    def travelling_outputs(self) -> list[str]:
        """The graph outputs that travel (the last stage sends them): all but state."""
        presents = {b for _, b in self.state}
        return [t for t in self.graph_outputs if t not in presents]

    def crossing_specs(self, p: int) -> tuple[TensorSpec, ...]:
        """TensorSpecs (symbolic shapes) of ``crossing(p)``."""
        return tuple(self.specs[t] for t in self.crossing(p))

    def weight_bytes(self, i: int, j: int) -> int:
        """Bytes of the unique initializers used by nodes in ``[i, j)``."""
        return self._weights.weight_bytes(i, j)

    def activation_peak(self, i: int, j: int) -> int:
        """Peak bytes of live activations while a stage runs nodes ``[i, j)``."""
        return int(self.live_bytes[i:j].max()) if j > i else 0

    def activation_degrees(self, i: int, j: int) -> dict[str, int]:
        """Per symbolic dim of the bindings, the highest power of it that any tensor a stage
        over nodes ``[i, j)`` holds grows with (hidden states: 1 in ``sequence``; attention
        scores: 2). At ``k`` times a planned size, the stage's activations are then at most
        ``k ** degree`` times the planned ones (``tensor_degrees``). Dims that follow from
        others (``derived``) have none of their own."""
        out = {sym: 0 for sym in self.bindings if sym not in self.derived}
        held = list(self.crossing(i)) + [t for outs in self.node_outputs[i:j] for t in outs]
        for t in held:
            for sym, d in self.tensor_degrees.get(t, {}).items():
                out[sym] = max(out.get(sym, 0), d)
        return out

    def activation_growth(self, i: int, j: int) -> list[dict[str, int]]:
        """How the tensors a stage over nodes ``[i, j)`` holds grow, tensor by tensor: the
        distinct ``{dim: degree}`` of its tensors, less those another one covers (in
        every dim at least as high). At sizes ``k[dim]`` times the planned ones, every
        tensor, and so the stage's activations, grows by at most the largest
        ``prod(k[dim] ** degree)`` over them.

        Tighter than the per-dim maxima of ``activation_degrees`` multiplied, when no tensor
        grows with all dims at once: a decoder's cache grows with the past length and its
        mask with the total length, and none with both."""
        held = list(self.crossing(i)) + [t for outs in self.node_outputs[i:j] for t in outs]
        vectors = {tuple(sorted(self.tensor_degrees.get(t, {}).items())) for t in held}
        vectors = [dict(v) for v in vectors if v]

        def covers(a: dict[str, int], b: dict[str, int]) -> bool:
            return a != b and all(a.get(k, 0) >= d for k, d in b.items())

        kept = [v for v in vectors if not any(covers(w, v) for w in vectors)]
        return sorted(kept, key=lambda v: sorted(v.items()))

    @property
    def _tensor_order(self) -> list[str]:
        order = getattr(self, "_order_cache", None)
        if order is None:
            order = list(self.graph_inputs)
            for outs in self.node_outputs:
                order.extend(outs)
            self._order_cache = order
        return order

    @property
    def total_param_bytes(self) -> int:
        return int(self.init_bytes.sum())

    def summary(self) -> str:
        return (f"{self.num_nodes} nodes, {self.total_param_bytes / _MiB:.1f} MiB weights, "
                f"{self.flops.sum() / 1e9:.2f} GFLOP at {self.bindings}")


# --------------------------------------------------------------------------- loading


def load_model(model: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    """Load an ONNX model with its external data and check that it has an opset.

    Models older than ``MIN_OPSET`` are converted by :func:`analyze`
    (``edge.planning.intake``), not refused.

    Args:
        model: a path or an already loaded ModelProto.
    """
    if isinstance(model, onnx.ModelProto):
        m, where = model, "model"
    else:
        path = Path(model)
        where = str(path)
        if not path.is_file():
            raise GraphError(f"{path}: no such ONNX file")
        try:
            m = onnx.load(str(path), load_external_data=True)
        except DecodeError as e:
            raise GraphError(f"{path}: not an ONNX model: expected a serialized "
                             f"onnx.ModelProto, got bytes that do not parse (a truncated "
                             f"file, or another kind of file?): {e}") from None
        except Exception as e:  # protobuf and onnx raise many kinds
            raise GraphError(f"{path}: cannot load ONNX model ({e})") from None
        if not m.graph.node and not m.opset_import:
            raise GraphError(f"{path}: not an ONNX model: expected a graph and opset_import, "
                             f"the file has neither ({path.stat().st_size} bytes)")
    if default_opset(m) is None:
        raise GraphError(f"{where}: opset_import: expected the default ('ai.onnx') opset, "
                         "the model imports none")
    return m


# --------------------------------------------------------------------------- structure


def _toposort(m: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The graph's nodes in topological order (the given order when it already is one)."""
    g = m.graph
    available = {i.name for i in g.input} | {t.name for t in g.initializer}
    available |= {t.name for t in g.sparse_initializer}
    nodes = list(g.node)
    reads = [node_reads(n) for n in nodes]
    ok = True
    avail = set(available)
    for n, r in zip(nodes, reads):
        if any(x not in avail for x in r):
            ok = False
            break
        avail.update(x for x in n.output if x)
    if ok:
        return nodes
    log.info("nodes are not in topological order; sorting them")
    producers = {}
    for k, n in enumerate(nodes):
        for o in n.output:
            if o:
                producers[o] = k
    indeg = [0] * len(nodes)
    users: list[list[int]] = [[] for _ in nodes]
    for k, r in enumerate(reads):
        deps = {producers[x] for x in r if x in producers and x not in available}
        for d in deps:
            users[d].append(k)
        indeg[k] = len(deps)
        missing = [x for x in r if x not in producers and x not in available]
        if missing:
            raise GraphError(f"node {n_name(nodes[k], k)} reads undefined tensors {missing}")
    ready = [k for k in range(len(nodes)) if indeg[k] == 0]
    heapq.heapify(ready)
    out = []
    while ready:
        k = heapq.heappop(ready)
        out.append(nodes[k])
        for u in users[k]:
            indeg[u] -= 1
            if indeg[u] == 0:
                heapq.heappush(ready, u)
    if len(out) != len(nodes):
        raise GraphError("graph has a cycle; cannot order its nodes")
    return out


def n_name(node: onnx.NodeProto, k: int) -> str:
    return node.name or f"#{k} ({node.op_type})"


# --------------------------------------------------------------------------- shapes & dtypes


def _np_dtype_name(elem_type: int) -> str:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name
    except Exception:
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def _itemsize(elem_type: int) -> int:
    if elem_type == onnx.TensorProto.STRING:
        return 8  # unknown; strings are rare in the graphs we cut
    try:
        return int(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except Exception:
        return 4


def _vi_shape(vi: onnx.ValueInfoProto) -> tuple[Dim, ...] | None:
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
        return None
    dims: list[Dim] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            # Paddle2ONNX writes -1 for "unknown": a non-positive dim is never a size.
            dims.append(int(d.dim_value) if d.dim_value > 0 else None)
        elif (d.HasField("dim_param") and d.dim_param.strip() not in _ANONYMOUS_DIMS
              and not d.dim_param.startswith("unk__")):
            # "unk__N" names are made up by shape inference, not shared model dims; "?"
            # is Paddle's "unknown", which two dims of one tensor may both be.
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


def _vi_map(g: onnx.GraphProto) -> dict[str, onnx.ValueInfoProto]:
    out = {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        if vi.type.HasField("tensor_type"):
            out[vi.name] = vi
    return out


def _light_model(m: onnx.ModelProto, inputs: Sequence[onnx.ValueInfoProto] | None,
                 keep_value_info: bool) -> onnx.ModelProto:
    """A weight-free copy for shape inference: big initializers become typed inputs."""
    g = m.graph
    light = onnx.ModelProto()
    light.ir_version = m.ir_version
    light.opset_import.extend(m.opset_import)
    light.functions.extend(m.functions)
    lg = light.graph
    lg.name = g.name
    lg.node.extend(g.node)
    init_names = {t.name for t in g.initializer}
    lg.input.extend(inputs if inputs is not None
                    else [i for i in g.input if i.name not in init_names])
    for t in g.initializer:
        nbytes = _tensor_nbytes(t)
        if nbytes <= _KEEP_INIT_BYTES and t.data_location != onnx.TensorProto.EXTERNAL:
            lg.initializer.append(t)
        else:
            lg.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    if keep_value_info:
        lg.value_info.extend(g.value_info)
        lg.output.extend(g.output)
    else:
        for o in g.output:
            lg.output.append(helper.make_tensor_value_info(
                o.name, o.type.tensor_type.elem_type, None))
    return light


def _tensor_nbytes(t: onnx.TensorProto) -> int:
    return int(math.prod(t.dims)) * _itemsize(t.data_type)


def _bind_inputs(m: onnx.ModelProto, init_names: set[str],
                 bindings: dict[str, int]) -> tuple[list[onnx.ValueInfoProto], dict[str, int]]:
    """Graph inputs with every dim made concrete; the full binding map that was used."""
    used = dict(bindings)
    derived = _expression_dims(m, init_names, used)
    unbound: dict[str, list[str]] = {}
    out = []
    for vi in m.graph.input:
        if vi.name in init_names:
            continue
        shape = _vi_shape(vi)
        tt = vi.type.tensor_type
        if shape is None:
            raise GraphError(f"graph input {vi.name!r} has no tensor shape; cannot cost it")
        dims = []
        for k, d in enumerate(shape):
            if isinstance(d, int):
                dims.append(d)
            elif isinstance(d, str):
                if d in used:
                    dims.append(int(used[d]))
                elif d in derived:
                    dims.append(derived[d])
                elif d.lower() in BATCH_DIM_NAMES or d == anonymous_dim(vi.name, 0):
                    # An unnamed leading dim is the batch in every model we have seen.
                    used[d] = 1
                    dims.append(1)
                else:
                    unbound.setdefault(d, []).append(f"{vi.name}[{k}]")
                    dims.append(1)
            else:
                name = anonymous_dim(vi.name, k)
                if name in used:
                    dims.append(int(used[name]))
                else:
                    unbound.setdefault(name, []).append(f"{vi.name}[{k}] (unnamed)")
                    dims.append(1)
        out.append(helper.make_tensor_value_info(vi.name, tt.elem_type, dims))
    if unbound:
        listing = "; ".join(f"{k} (used by {', '.join(v)})" for k, v in unbound.items())
        example = " ".join(f"--dim {k}=SIZE" for k in unbound)
        raise GraphError(
            f"the model's inputs have unbound symbolic dims: {listing}. Costs need concrete "
            f"sizes: bind them with {example}, or give a real input with --sample FILE.npz "
            f"(only batch-like dims default to 1)")
    return out, used


def _expression_dims(m: onnx.ModelProto, init_names: set[str],
                     bindings: dict[str, int]) -> dict[str, int]:
    """Sizes of the input dims named by an expression of other dims, from ``bindings``.

    Exporters name a length that follows from others so (optimum and torch's dynamo
    exporter: an attention mask over ``past_sequence_length + 1`` or ``past_sequence_length
    + sequence_length``). Such a dim is derived, never bound on its own: binding it apart
    from its terms could only make the model's inputs disagree. An expression counts only
    if it names the model's own dims (a plain name like ``batch-size`` is not one).
    """
    names = {d for vi in m.graph.input if vi.name not in init_names
             for d in (_vi_shape(vi) or ()) if isinstance(d, str)}
    # A dim an expression names that is not bound yet is reported as unbound itself (batch
    # ones default to 1), so 1 stands in for it here: the error then asks for
    # past_sequence_length, not for past_sequence_length + 1.
    sizes = {d: 1 for d in names} | dict(bindings)
    out = {}
    for d in names:
        form = dim_expression(d)
        if d in bindings or form is None or not all(k in sizes for k in form[0]):
            continue
        value = dim_value(d, sizes)
        if value is not None and value > 0:
            out[d] = value
    return out


def _check_dim_names(m: onnx.ModelProto, init_names: set[str],
                     bindings: Mapping[str, int]) -> None:
    """A size given for a dim that no graph input has is a typo, not something to ignore."""
    names = {d for vi in m.graph.input if vi.name not in init_names
             for d in (_vi_shape(vi) or ()) if isinstance(d, str)}
    unknown = sorted(set(bindings) - names)
    if unknown:
        raise GraphError(f"--dim {', '.join(unknown)}: expected dims of the model's inputs "
                         f"({', '.join(sorted(names)) or 'it has none'}), got "
                         f"{'a name' if len(unknown) == 1 else 'names'} it does not have")


def _concrete_shapes(m: onnx.ModelProto, nodes: list[onnx.NodeProto],
                     bound_inputs: list[onnx.ValueInfoProto],
                     sample: Mapping[str, np.ndarray] | None = None,
                     ) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """Concrete shapes and elem types of every tensor, inference first, then measurement
    (on ``sample`` resized to the bound shapes, or on zeros without one)."""
    light = _light_model(m, bound_inputs, keep_value_info=False)
    del light.graph.node[:]
    light.graph.node.extend(nodes)
    try:
        inferred = shape_inference.infer_shapes(light, data_prop=True)
    except Exception as e:
        log.warning("ONNX shape inference failed (%s); measuring every shape instead", e)
        inferred = light
    shapes: dict[str, tuple[int, ...]] = {}
    types: dict[str, int] = {}
    for name, vi in _vi_map(inferred.graph).items():
        types[name] = vi.type.tensor_type.elem_type
        s = _vi_shape(vi)
        if s is not None and all(isinstance(d, int) for d in s):
            shapes[name] = tuple(int(d) for d in s)
    wanted = [o for n in nodes for o in n.output if o]
    missing = [t for t in wanted if t not in shapes or not types.get(t)]
    if missing:
        log.info("%d of %d tensor shapes unknown after inference (e.g. %s); measuring them "
                 "with one onnxruntime run", len(missing), len(wanted), missing[:3])
        measured = _measure_shapes(m, bound_inputs, missing, types, sample)
        for t, (shape, et) in measured.items():
            shapes[t] = shape
            types[t] = et
    for vi in bound_inputs:
        shapes[vi.name] = tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
        types[vi.name] = vi.type.tensor_type.elem_type
    return shapes, types


def input_feeds(bound_inputs: Sequence[onnx.ValueInfoProto],
                sample: Mapping[str, np.ndarray] | None = None,
                seed: int | None = None) -> dict[str, np.ndarray]:
    """One array per bound graph input: the sample's, cropped or tiled to the bound shape;
    without a sample, :func:`_dummy_input` (zeros), or seeded random values if ``seed`` is
    given (floats N(0, 1), masks ones, integers zeros), for checks that zeros would pass
    trivially.

    Args:
        bound_inputs: graph inputs with concrete shapes (``_bind_inputs``).
        sample: a real input per graph input name, e.g. from ``--sample FILE.npz``.
        seed: seed of the random values when there is no sample.
    """
    out = {}
    rng = np.random.default_rng(seed) if seed is not None else None
    for vi in bound_inputs:
        shape = tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
        if sample is not None and vi.name in sample:
            out[vi.name] = _fit(np.asarray(sample[vi.name]), shape)
            continue
        x = _dummy_input(vi)
        if rng is not None and x.dtype.kind == "f" and "mask" not in vi.name.lower():
            x = rng.standard_normal(shape).astype(x.dtype)
        out[vi.name] = x
    return out


def _fit(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``a`` cropped or tiled along each axis to ``shape`` (same rank): a sample of sequence
    128 serves to measure sequence 64 or 256 with real values (token ids stay valid)."""
    if a.shape == shape or a.ndim != len(shape):
        return a
    for axis, (have, want) in enumerate(zip(a.shape, shape)):
        if have == want or have == 0:
            continue
        if want < have:
            a = np.take(a, np.arange(want), axis=axis)
        else:
            reps = [1] * a.ndim
            reps[axis] = -(-want // have)
            a = np.take(np.tile(a, reps), np.arange(want), axis=axis)
    return np.require(a, requirements="C")


def sample_bindings(m: onnx.ModelProto, sample: Mapping[str, np.ndarray],
                    given: Mapping[str, int] | None = None) -> dict[str, int]:
    """The sizes of the model's symbolic input dims in a sample input.

    Args:
        m: the (normalized) model.
        sample: one array per graph input, keyed by the input's name.
        given: sizes bound otherwise (``--dim``); a different size in the sample is an
            error.

    Raises:
        GraphError: the sample lacks an input or has one the model does not, or an
            array's dtype, rank or fixed dims differ from the model's input.
    """
    inits = {t.name for t in m.graph.initializer}
    inputs = [vi for vi in m.graph.input if vi.name not in inits]
    names = [vi.name for vi in inputs]
    missing = [n for n in names if n not in sample]
    extra = [k for k in sample if k not in names]
    if missing or extra:
        raise GraphError(f"sample: expected one array per model input {names}, got "
                         f"{sorted(sample)}" + (f"; missing {missing}" if missing else "")
                         + (f"; the model has no input {extra}" if extra else ""))
    out: dict[str, int] = {}
    for vi in inputs:
        a = np.asarray(sample[vi.name])
        tt = vi.type.tensor_type
        want = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        shape = _vi_shape(vi) or ()
        spec = "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"
        if a.dtype != want or a.ndim != len(shape):
            raise GraphError(f"sample {vi.name!r}: expected {want.name}{spec}, got "
                             f"{a.dtype.name}{list(a.shape)}")
        for k, (d, size) in enumerate(zip(shape, a.shape)):
            if isinstance(d, int) and d != size:
                raise GraphError(f"sample {vi.name!r}: expected {want.name}{spec}, got "
                                 f"{a.dtype.name}{list(a.shape)} (axis {k})")
            if isinstance(d, str):
                if d in out and out[d] != size:
                    raise GraphError(f"sample: dim {d!r} is {out[d]} in one input and "
                                     f"{size} in {vi.name!r}[{k}]; expected one size")
                out[d] = int(size)
    for d, size in (given or {}).items():
        if d in out and out[d] != size:
            raise GraphError(f"--dim {d}={size} contradicts the sample, where {d} is "
                             f"{out[d]}; drop one of them")
    return out


def _dummy_input(vi: onnx.ValueInfoProto) -> np.ndarray:
    tt = vi.type.tensor_type
    shape = [d.dim_value for d in tt.shape.dim]
    dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
    name = vi.name.lower()
    # Masks must be ones (a zero mask makes softmax rows all -inf → NaN, harmless for
    # shapes but it also changes which branches some exporters take); ids, positions and
    # everything else are zeros, which index validly into any table.
    if "mask" in name:
        return np.ones(shape, dtype=dtype)
    return np.zeros(shape, dtype=dtype)


def _measure_shapes(m: onnx.ModelProto, bound_inputs: list[onnx.ValueInfoProto],
                    names: list[str], types: dict[str, int],
                    sample: Mapping[str, np.ndarray] | None = None,
                    ) -> dict[str, tuple[tuple[int, ...], int]]:
    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    known_out = {o.name for o in probe.graph.output}
    for t in names:
        if t not in known_out:
            # An untyped output is accepted by onnxruntime, which fills in the real type.
            vi = onnx.ValueInfoProto()
            vi.name = t
            probe.graph.output.append(vi)
    del probe.graph.value_info[:]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "probe.onnx")
        onnx.save(probe, path, save_as_external_data=True, location="probe.onnx.data",
                  size_threshold=1024)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.log_severity_level = 4  # failed size trials are expected, not news
        try:
            sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            feeds = input_feeds(bound_inputs, sample)
            outs = sess.run(names, feeds)
        except Exception as e:
            hint = ("" if sample is not None else "; the model ran on zeros: if it needs "
                    "real values (a sample rate, a mode flag), give one with --sample FILE.npz")
            raise GraphError(f"cannot measure tensor shapes with onnxruntime: {e}{hint}") from None
    res = {}
    for t, v in zip(names, outs):
        v = np.asarray(v)
        res[t] = (tuple(int(x) for x in v.shape), helper.np_dtype_to_tensor_dtype(v.dtype))
    return res


# --------------------------------------------------------------------------- flops


def _node_flops(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]],
                out_elems: int) -> float:
    op = node.op_type
    ins = [shapes.get(x) if x else None for x in node.input]
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul"):
        a = ins[0] if op != "QLinearMatMul" else ins[0]
        k = a[-1] if a else 1
        return 2.0 * out_elems * k
    if op == "Gemm":
        a = ins[0]
        trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
        k = (a[0] if trans_a else a[-1]) if a else 1
        return 2.0 * out_elems * k + (out_elems if len(ins) > 2 else 0)
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w = ins[1] if op != "QLinearConv" else ins[3]
        per = math.prod(w[1:]) if w else 1
        return 2.0 * out_elems * per
    if op == "ConvTranspose":
        x, w = ins[0], ins[1]
        if x and w:
            return 2.0 * math.prod(x) * math.prod(w[1:])
        return 2.0 * out_elems
    if op == "Einsum":
        total = max([math.prod(s) for s in ins if s] + [out_elems])
        return 2.0 * total
    return float(_FLOPS_PER_ELEMENT.get(op, 1) * out_elems)


# --------------------------------------------------------------------------- analyze


def analyze(model: str | Path | onnx.ModelProto,
            bindings: dict[str, int] | None = None,
            sample: Mapping[str, np.ndarray] | None = None, state: bool = False) -> GraphCosts:
    """Compute per-node and per-cut costs of an ONNX model at concrete sizes.

    The model is first normalized (``edge.planning.intake``): an older opset is converted
    and the conversion checked in onnxruntime on the sample (or seeded random inputs),
    constants are folded into weights, unnamed input dims get ``INPUT:AXIS`` names.

    Args:
        model: path to an ``.onnx`` file (external data is loaded) or a ModelProto.
        bindings: sizes of the model's symbolic dims, e.g. ``{"batch": 1, "sequence": 128}``.
            Unbound batch-like dims (``batch``, ``batch_size``, ``x:0``, ...) default to 1;
            any other unbound symbolic input dim raises GraphError naming it.
        sample: a real input, one array per graph input name: it binds every symbolic
            dim, and shapes are measured on it instead of on zeros.
        state: keep a decoder's KV caches off the cuts (``edge.planning.state``).

    Returns:
        GraphCosts with arrays indexed by node position and cut position.
    """
    where = "model" if isinstance(model, onnx.ModelProto) else str(model)
    normalized, intake = normalize(original := load_model(model), where)
    m, nodes = _sorted_model(_fold_weight_transposes(normalized))
    g, n = m.graph, len(nodes)
    inits, init_names, init_bytes = _initializers(g)
    graph_inputs = [i.name for i in g.input if i.name not in inits]
    graph_outputs = [o.name for o in g.output]
    pairs = state_pairs(graph_inputs, graph_outputs) if state else []
    nodes = list(g.node) if share_shape_reads(g, pairs) else nodes

    bound_inputs, used_bindings, notes = _bind(m, inits, bindings, sample, original, intake,
                                               where)
    shapes, types = _concrete_shapes(m, nodes, bound_inputs, sample)
    for name, t in inits.items():
        shapes[name] = tuple(int(d) for d in t.dims)
        types[name] = t.data_type

    tensor_bytes_of = _sizer(shapes, types)
    scan = _scan_nodes(nodes, inits, init_bytes, graph_inputs, shapes, tensor_bytes_of)
    for o in graph_outputs:
        if o in inits:
            raise GraphError(f"graph output {o!r} is an initializer; cannot cut such a model")
        scan.last_use[o] = n
    cut_ok = apply_state(scan.producer, scan.last_use, scan.node_inputs, pairs, n)
    tensor_bytes, cut_bytes = _cut_bytes(scan.producer, scan.last_use, n, tensor_bytes_of)
    specs = _specs(scan.producer, _symbolic_value_info(m, nodes), shapes, types)

    degrees, derived = _tensor_degrees(m, nodes, set(inits), used_bindings,
                                       {t: tensor_bytes[t] for t in scan.producer}, sample)
    limits = {d: v for d, v in dim_limits(nodes, inits, graph_inputs, degrees, used_bindings,
                                          shapes).items() if d not in derived}
    for d, (size, why) in limits.items():
        notes.append(f"{d} is at most {size}: {why}")

    int8_bytes = np.where(scan.quantized, (init_bytes + 3) // 4, init_bytes)
    costs = GraphCosts(
        model=m, bindings=used_bindings,
        node_names=[nd.name or f"{nd.op_type}_{p}" for p, nd in enumerate(nodes)],
        op_types=[nd.op_type for nd in nodes],
        param_bytes=scan.param_bytes, node_inits=scan.node_inits,
        node_inputs=scan.node_inputs, node_outputs=scan.node_outputs, flops=scan.flops,
        output_bytes=scan.output_bytes, cut_bytes=cut_bytes,
        live_bytes=cut_bytes[:n] + scan.output_bytes, specs=specs, tensor_bytes=tensor_bytes,
        producer=scan.producer, last_use=scan.last_use, graph_inputs=graph_inputs,
        graph_outputs=graph_outputs, init_names=init_names, init_bytes=init_bytes,
        init_uses=tuple(np.asarray(u, dtype=np.int64) for u in scan.init_uses),
        concrete_shapes={t: shapes[t] for t in scan.producer},
        init_table_uses=tuple(np.asarray(u, dtype=np.int64) for u in scan.table_uses),
        init_int8_bytes=int8_bytes,
        tensor_degrees=degrees, derived=derived,
        dim_limits={d: size for d, (size, _) in limits.items()},
        prepack_bytes=np.where(scan.prepack >= 0, np.append(init_bytes, 0)[scan.prepack], 0),
        prepack_int8_bytes=np.where(scan.prepack >= 0, np.append(int8_bytes, 0)[scan.prepack], 0),
        notes=notes, state=tuple(pairs), cut_ok=cut_ok,
        kv_token_bytes=_kv_token_bytes(specs, scan.producer, pairs, n),
    )
    log.info("analysed model: %s", costs.summary())
    return costs


def _initializers(g: onnx.GraphProto) -> tuple[dict[str, onnx.TensorProto], list[str],
                                                np.ndarray]:
    """The graph's initializers by name, their names and their bytes."""
    inits = {t.name: t for t in g.initializer}
    for st in g.sparse_initializer:
        raise GraphError(f"sparse initializers are not supported (found {st.values.name!r})")
    init_names = list(inits)
    return inits, init_names, np.array([_tensor_nbytes(inits[t]) for t in init_names],
                                       dtype=np.int64)


def _kv_token_bytes(specs: Mapping[str, TensorSpec], producer: Mapping[str, int],
                    pairs: Sequence[tuple[str, str]], n: int) -> np.ndarray | None:
    """Per node, the bytes per token of one sequence of the presents it produces (its
    layer's KV cache); None for a model without state."""
    if not pairs:
        return None
    out = np.zeros(n, dtype=np.int64)
    for _, present in pairs:
        out[producer[present]] += kv_bytes_per_token(specs, [present])
    return out


def _sizer(shapes: Mapping[str, tuple[int, ...]], types: Mapping[str, int]):
    """A function giving a tensor's bytes at its measured shape."""
    def tensor_bytes_of(t: str) -> int:
        s = shapes.get(t)
        if s is None:
            raise GraphError(f"shape of tensor {t!r} is unknown even after measuring")
        return int(math.prod(s)) * _itemsize(types.get(t, onnx.TensorProto.FLOAT))
    return tensor_bytes_of


def _sorted_model(m: onnx.ModelProto) -> tuple[onnx.ModelProto, list[onnx.NodeProto]]:
    """``m`` with its nodes in topological order, and those nodes."""
    nodes = _toposort(m)
    if list(nodes) != list(m.graph.node):
        m = _with_nodes(m, nodes)
    if not nodes:
        raise GraphError("model has no nodes")
    return m, list(nodes)


def _bind(m: onnx.ModelProto, inits: Mapping[str, onnx.TensorProto],
          bindings: dict[str, int] | None, sample: Mapping[str, np.ndarray] | None,
          original: onnx.ModelProto, intake, where: str):
    """Bind the model's symbolic dims (from ``bindings`` and the sample), and check a
    converted model against its original on the bound inputs.

    Returns:
        (bound input shapes, the bindings used, intake notes).
    """
    bindings = dict(bindings or {})
    _check_dim_names(m, set(inits), bindings)
    if sample is not None:
        bindings.update(sample_bindings(m, sample, bindings))
    bound_inputs, used_bindings = _bind_inputs(m, set(inits), bindings)
    notes = list(intake.notes)
    if intake.converted_from is not None:
        diff = check_same(original, intake.converted,
                          input_feeds(bound_inputs, sample, seed=0), where)
        intake.converted = None
        notes.append(f"outputs checked against opset {intake.converted_from} in onnxruntime "
                     f"on {'the sample' if sample is not None else 'seeded random inputs'}: "
                     f"largest relative difference {diff:.2g}")
    for note in notes:
        log.info("%s: %s", where, note)
    return bound_inputs, used_bindings, notes


def _symbolic_value_info(m: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> dict:
    """Symbolic shapes for the plan's TensorSpecs: the model's own value_info first (dynamo
    writes symbolic shapes there), then symbolic inference to fill gaps."""
    sym = dict(_vi_map(m.graph))
    if any(o not in sym for nd in nodes for o in nd.output if o):
        try:
            inf = shape_inference.infer_shapes(_light_model(m, None, keep_value_info=True))
            for name, vi in _vi_map(inf.graph).items():
                sym.setdefault(name, vi)
        except Exception as e:
            log.warning("symbolic shape inference failed (%s); unknown dims become None", e)
    return sym


@dataclass
class _NodeScan:
    """Per node and per initializer facts gathered in one pass over the sorted nodes."""

    producer: dict[str, int]
    last_use: dict[str, int]
    node_inits: list[list[str]]
    node_inputs: list[list[str]]
    node_outputs: list[list[str]]
    param_bytes: np.ndarray
    init_uses: list[list[int]]
    table_uses: list[list[int]]
    quantized: np.ndarray
    flops: np.ndarray
    output_bytes: np.ndarray
    prepack: np.ndarray  # per node, the initializer it prepacks, or -1


def _scan_nodes(nodes: list[onnx.NodeProto], inits: Mapping[str, onnx.TensorProto],
                init_bytes: np.ndarray, graph_inputs: list[str],
                shapes: Mapping[str, tuple[int, ...]], tensor_bytes_of) -> _NodeScan:
    """Who produces and last reads each tensor, and each node's weights, flops, outputs."""
    n = len(nodes)
    init_index = {name: k for k, name in enumerate(inits)}
    scan = _NodeScan(
        producer={t: -1 for t in graph_inputs},
        last_use={t: 0 for t in graph_inputs},  # every model input enters stage 0
        node_inits=[], node_inputs=[], node_outputs=[],
        param_bytes=np.zeros(n, dtype=np.int64), init_uses=[[] for _ in inits],
        table_uses=[[] for _ in inits], quantized=np.zeros(len(inits), dtype=bool),
        flops=np.zeros(n, dtype=np.float64), output_bytes=np.zeros(n, dtype=np.int64),
        prepack=np.full(n, -1, dtype=np.int64))
    seen_inits: set[str] = set()
    for p, node in enumerate(nodes):
        reads = node_reads(node)
        my_inits = [x for x in reads if x in inits]
        my_inputs = [x for x in reads if x not in inits]
        for x in my_inputs:
            if x not in scan.producer:
                raise GraphError(f"node {n_name(node, p)} reads {x!r}, which nothing produces")
            scan.last_use[x] = max(scan.last_use[x], p)
        for x in my_inits:
            scan.init_uses[init_index[x]].append(p)
            if x not in seen_inits:
                seen_inits.add(x)
                scan.param_bytes[p] += init_bytes[init_index[x]]
        table = _gather_table(node, inits)
        if table is not None:
            scan.table_uses[init_index[table]].append(p)
        for x in _int8_weights(node, inits):
            scan.quantized[init_index[x]] = True
        packed = _prepacked_weight(node, inits)
        if packed is not None:
            scan.prepack[p] = init_index[packed]
        outs = [o for o in node.output if o]
        for o in outs:
            scan.producer[o] = p
            scan.last_use[o] = -1
        scan.node_inits.append(my_inits)
        scan.node_inputs.append(my_inputs)
        scan.node_outputs.append(outs)
        scan.output_bytes[p] = sum(tensor_bytes_of(o) for o in outs)
        first = outs[0] if outs else None
        out_elems = int(math.prod(shapes[first])) if first in shapes else 0
        scan.flops[p] = _node_flops(node, shapes, out_elems)
    return scan


def _cut_bytes(producer: Mapping[str, int], last_use: Mapping[str, int], n: int,
               tensor_bytes_of) -> tuple[dict[str, int], np.ndarray]:
    """Bytes of every tensor, and (n + 1,) bytes crossing each cut."""
    # A difference array: tensor t is in crossing(p) for p in (producer, last_use].
    tensor_bytes: dict[str, int] = {}
    diff = np.zeros(n + 2, dtype=np.int64)
    for t, d in producer.items():
        b = tensor_bytes_of(t)
        tensor_bytes[t] = b
        lu = last_use[t]
        if lu > d:
            diff[d + 1] += b
            diff[lu + 1] -= b
    return tensor_bytes, np.cumsum(diff)[: n + 1]


def _specs(producer: Mapping[str, int], sym: Mapping, shapes: Mapping, types: Mapping
           ) -> dict[str, TensorSpec]:
    """A TensorSpec per tensor: symbolic dims where known, None for the others."""
    specs: dict[str, TensorSpec] = {}
    for t in producer:
        vi = sym.get(t)
        shape = _vi_shape(vi) if vi is not None else None
        if shape is None or len(shape) != len(shapes[t]):
            shape = tuple(None for _ in shapes[t])
        specs[t] = TensorSpec(name=t, dtype=_np_dtype_name(types[t]), shape=shape)
    return specs


def _tensor_degrees(m: onnx.ModelProto, nodes: list[onnx.NodeProto], init_names: set[str],
                    bindings: dict[str, int], sizes: dict[str, int],
                    sample: Mapping[str, np.ndarray] | None = None,
                    ) -> tuple[dict[str, dict[str, int]], dict[str, str]]:
    """How each tensor's size grows with each symbolic dim: the power ``d`` with
    ``size(k * n) <= k**d * size(n)``, from its size with that dim halved or doubled.
    Rounded up, so a size like ``a + b * n`` counts as ``n``.

    This lets the coordinator bound a request's memory by arithmetic: running the model at
    a request's own sizes, as an earlier memory guard did, exhausted the coordinator on the
    very requests it was meant to refuse.

    Some dims cannot change alone: a decoder with a KV cache takes a past length, a new
    length and a total length that must be their sum. Those are linked
    (``_linked_dims``): the total is derived from the others, which are then measured with
    it moving along, so that its growth is not counted a second time.

    A dim whose size cannot be changed even so (the model fails at every size tried) gets
    degree 2 for every tensor, which errs on the side of refusing.

    Returns:
        (per tensor, {dim: degree}; the derived dims, name -> expression).
    """
    def measure(trial: dict[str, int]):
        try:
            bound, _ = _bind_inputs(m, init_names, trial)
            return _concrete_shapes(m, nodes, bound, sample)
        except Exception as e:  # noqa: BLE001 - any failure: not measurable at these sizes
            log.info("sizes at %s not measurable (%s)", trial, e)
            return None

    found = {sym: _vary(sym, {}, bindings, measure) for sym in bindings}
    stuck = [sym for sym in bindings if found[sym] is None]
    derived = _linked_dims(stuck, bindings, measure) if len(stuck) >= 2 else {}
    for d, expression in list(derived.items()):
        parts = dim_expression(expression)[0]
        for sym in parts:
            found[sym] = _vary(sym, derived, bindings, measure)
        if any(found[sym] is None for sym in parts):
            log.info("%s = %s does not hold at other sizes; not derived", d, expression)
            del derived[d]
    if derived:
        log.info("dims that follow from others: %s",
                 ", ".join(f"{d} = {e}" for d, e in derived.items()))

    out: dict[str, dict[str, int]] = {t: {} for t in sizes}
    for sym, n in bindings.items():
        if sym in derived:
            continue
        other, (shapes, types) = found[sym] or (None, (None, None))
        for t, size in sizes.items():
            if other is None or shapes.get(t) is None or size == 0:
                degree = 2
            else:
                size_k = (int(math.prod(shapes[t]))
                          * _itemsize(types.get(t, onnx.TensorProto.FLOAT)))
                degree = _degree(size, n, size_k, other)
            if degree:
                out[t][sym] = degree
    return out, derived


def _vary(sym: str, relations: dict[str, str], bindings: dict[str, int], measure):
    """Measure the shapes with ``sym`` moved off its binding (and the dims derived from it,
    ``relations``, following): ``(its new size, measure's result)``, or None when no size
    tried runs."""
    n = bindings[sym]
    # Halved where that is still a real size (cheaper: it runs the model smaller);
    # doubled for small ones (batch 1), where 1 may be special (broadcasting).
    tries = (n // 2, 2 * n) if n >= 16 else (2 * n, n // 2) if n >= 2 else (2 * n,)
    for k in tries:
        trial = {**bindings, sym: k}
        for d, expression in relations.items():
            trial[d] = dim_value(expression, trial)
        if min(trial.values()) < 1:
            continue
        got = measure(trial)
        if got is not None:
            return k, got
    return None


def _degree(size: int, n: int, size_k: int, k: int) -> int:
    """The power ``d`` with ``size_k / size == (k / n) ** d``, rounded up (0: no growth)."""
    big, small, ratio = (size_k, size, k / n) if k > n else (size, size_k, n / k)
    # ratio**d = big/small; rounded up, with slack for sizes like n + 1
    return (0 if big <= small else
            max(1, math.ceil(math.log(big / max(small, 1), ratio) - 0.05)))


def _linked_dims(stuck: list[str], bindings: dict[str, int], measure) -> dict[str, str]:
    """Among dims that cannot change alone, those that follow from others, as
    ``{dim: "a + b + c"}``; the rest stay independent.

    Two dims are linked when the model runs with both moved by the same amount (past and
    total length; new and total length). A dim linked to several that are not linked to
    each other is their sum plus a constant (total = past + new); of two linked only to
    each other, the larger is the smaller plus a constant (total = past + 1). The
    constant is what the bindings give: the relation is then checked by measuring each
    part with the sum moving along (``_tensor_degrees``).

    Args:
        stuck: dims whose size could not be changed alone, in bindings order.
        bindings: the sizes the costs are computed at.
        measure: runs shape inference at a full set of sizes; None where that fails.
    """
    linked: dict[str, set[str]] = {d: set() for d in stuck}
    for a, b in itertools.combinations(stuck, 2):
        lo = min(bindings[a], bindings[b])
        for delta in ((-(lo // 2), lo) if lo >= 16 else (lo,)):
            if measure({**bindings, a: bindings[a] + delta, b: bindings[b] + delta}) is not None:
                linked[a].add(b)
                linked[b].add(a)
                break
    order = {d: k for k, d in enumerate(bindings)}
    out: dict[str, str] = {}
    for d in stuck:
        parts = sorted(linked[d], key=order.get)
        if len(parts) >= 2:
            if any(q in linked[p] for p, q in itertools.combinations(parts, 2)):
                continue  # no sum: some parts also move together
        elif len(parts) == 1:
            (p,) = parts
            if linked[p] != {d} or (bindings[d], order[d]) < (bindings[p], order[p]):
                continue  # the other one is the sum, or the larger of the two
        else:
            continue
        const = bindings[d] - sum(bindings[p] for p in parts)
        # "+ 0" where the sizes are equal (two batch dims): still an expression, not a name
        out[d] = " + ".join(parts) + (f" + {const}" if const > 0 else
                                        f" - {-const}" if const < 0 else
                                        " + 0" if len(parts) == 1 else "")
    return out


# Transposes of weights at least this big are folded (``_fold_weight_transposes``).
_FOLD_MIN_BYTES = 1 << 20


def _fold_weight_transposes(m: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every ``Transpose`` of an initializer replaced by the transposed
    initializer (a copy when there is any; the given model is not changed).

    onnxruntime folds such a node at load into an anonymous copy of the weight, which a
    MatMul then prepacks: GPT-2's output head, tied to the 147 MiB embedding, cost twice
    its size that way, and the planner counted the copy as an activation. Folded here,
    the shard's data file holds the transposed weight, mapped, and it counts as a weight.
    Weights under ``_FOLD_MIN_BYTES`` are left alone: their copy costs nothing.
    """
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    outputs = {o.name for o in g.output}
    fold = [p for p, nd in enumerate(g.node)
            if nd.op_type == "Transpose" and nd.domain in ("", "ai.onnx") and len(nd.input) == 1
            and nd.input[0] in inits and nd.output[0] not in outputs
            and _tensor_nbytes(inits[nd.input[0]]) >= _FOLD_MIN_BYTES]
    if not fold:
        return m
    out = onnx.ModelProto()
    out.CopyFrom(m)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    for p in fold:
        nd = m.graph.node[p]
        perm = next((list(a.ints) for a in nd.attribute if a.name == "perm"), None)
        w = onnx.numpy_helper.to_array(inits[nd.input[0]])
        g.initializer.append(onnx.numpy_helper.from_array(
            np.ascontiguousarray(np.transpose(w, perm)), nd.output[0]))
    drop = set(fold)
    set_nodes(g, [nd for p, nd in enumerate(m.graph.node) if p not in drop])
    log.info("folded %d transposes of weights into transposed weights", len(fold))
    return out


def _gather_table(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> str | None:
    """The initializer this node reads only as a Gather table (input 0), if any."""
    if node.op_type != "Gather" or not node.input or node.input[0] not in inits:
        return None
    t = node.input[0]
    return t if t not in node_reads(node)[1:] else None


# Weight inputs that onnxruntime's dynamic quantization stores as 8-bit (its integer-ops
# registry: MatMul -> MatMulInteger, Conv -> ConvInteger, Gather -> Gather of uint8), plus
# Gemm weights and transposed weights, which edge.shards.quantize rewrites into MatMul ones.
_INT8_WEIGHT_INPUT = {"MatMul": 1, "Conv": 1, "Gather": 0, "Gemm": 1, "Transpose": 0}


def _prepacked_weight(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> str | None:
    """The initializer a MatMul or Gemm reads as its B matrix, which onnxruntime prepacks
    into a copy at load; None for other nodes."""
    if (node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx")
            or len(node.input) < 2 or node.input[1] not in inits):
        return None
    return node.input[1]


def _int8_weights(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> list[str]:
    k = _INT8_WEIGHT_INPUT.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    if k is None or len(node.input) <= k or node.input[k] not in inits:
        return []
    t = inits[node.input[k]]
    return [t.name] if t.data_type == onnx.TensorProto.FLOAT else []


def _with_nodes(m: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(m)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out
