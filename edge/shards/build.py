"""Cut one stage's nodes out of a model into a self-contained ``.onnx`` shard.

A shard holds nodes ``[start, end)`` of the source graph (topological order, as in
GraphCosts), the initializers they use embedded in the file, and as graph inputs only the
tensors crossing the cut at ``start`` that those nodes read; as outputs, the tensors
crossing the cut at ``end`` that it produces. Tensors crossing both cuts without being
produced inside are pass-throughs: the worker forwards them (``Stage.passthrough``), so they
are not part of the shard graph.

Built directly from the protobuf (``onnx.utils.extract_model`` re-infers shapes and takes
seconds per shard).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from edge.errors import GraphError
from edge.planning.graph import GraphCosts, node_reads
from edge.planning.plan import TensorSpec

__all__ = ["ShardInfo", "build_shard", "shard_io"]

log = logging.getLogger(__name__)

# protobuf cannot serialise a message of 2 GiB or more, so embedded weights stop there.
_PROTO_LIMIT = (2 << 30) - 1


@dataclass(frozen=True)
class ShardInfo:
    """A shard file written to disk.

    Attributes:
        path: where it was written.
        sha256: hex digest of the file's bytes.
        size: file size in bytes.
        inputs: names of the shard graph's inputs (consumed crossing tensors at start).
        outputs: names of the shard graph's outputs (produced crossing tensors at end).
        initializers: names of the embedded initializers.
    """

    path: Path
    sha256: str
    size: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    initializers: tuple[str, ...]


def shard_io(costs: GraphCosts, start: int, end: int) -> tuple[list[str], list[str]]:
    """Names of a shard's graph inputs and outputs for nodes ``[start, end)``.

    Args:
        costs: the analysed source graph.
        start, end: the node range.
    """
    n = costs.num_nodes
    if not 0 <= start < end <= n:
        raise GraphError(f"node range: expected 0 <= start < end <= {n}, got [{start}, {end})")
    read = set()
    for p in range(start, end):
        read.update(costs.node_inputs[p])
    inputs = [t for t in costs.crossing(start) if t in read]
    outputs = [t for t in costs.crossing(end) if start <= costs.producer[t] < end]
    return inputs, outputs


def _value_info(spec: TensorSpec, elem_type: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(spec.name, elem_type, list(spec.shape))


def _used_functions(model: onnx.ModelProto, nodes) -> list[onnx.FunctionProto]:
    funcs = {(f.domain, f.name): f for f in model.functions}
    if not funcs:
        return []
    keep: dict[tuple[str, str], onnx.FunctionProto] = {}
    stack = [(nd.domain, nd.op_type) for nd in nodes]
    while stack:
        key = stack.pop()
        if key in funcs and key not in keep:
            keep[key] = funcs[key]
            stack.extend((nd.domain, nd.op_type) for nd in funcs[key].node)
    return [f for f in model.functions if (f.domain, f.name) in keep]


def build_shard(model: onnx.ModelProto | None, costs: GraphCosts, start: int, end: int,
                path: str | Path, check: bool = True) -> ShardInfo:
    """Write nodes ``[start, end)`` of the model as one self-contained ``.onnx`` file.

    Args:
        model: the source model with its weights loaded; None to use ``costs.model``.
        costs: the source model's GraphCosts (node order, crossing tensors, specs).
        start, end: the node range, ``0 <= start < end <= n``.
        path: the file to write; weights are embedded (no external data).
        check: run ``onnx.checker.check_model(path, full_check=True)`` on the result.

    Returns:
        ShardInfo with the file's path, sha256 and size.
    """
    model = costs.model if model is None else model
    src = model.graph
    if len(src.node) != costs.num_nodes:
        raise GraphError(f"model has {len(src.node)} nodes but its costs have "
                         f"{costs.num_nodes}; analyse this model first")
    path = Path(path)
    inputs, outputs = shard_io(costs, start, end)
    nodes = list(src.node[start:end])
    init_needed = []
    seen = set()
    for p in range(start, end):
        for x in costs.node_inits[p]:
            if x not in seen:
                seen.add(x)
                init_needed.append(x)

    g = onnx.GraphProto()
    g.name = f"{src.name or 'graph'}_nodes_{start}_{end}"
    g.node.extend(nodes)
    # The shard's interface keeps the source's symbolic dims ("batch", "sequence") so it
    # stays as dynamic as the source model.
    elem = {vi.name: vi.type.tensor_type.elem_type
            for vi in list(src.input) + list(src.output) + list(src.value_info)}
    for t in inputs + outputs:
        et = elem.get(t) or helper.np_dtype_to_tensor_dtype(np.dtype(costs.specs[t].dtype))
        (g.input if t in inputs else g.output).append(_value_info(costs.specs[t], et))
    init_set = set(init_needed)
    g.initializer.extend(t for t in src.initializer if t.name in init_set)
    io = set(inputs) | set(outputs)
    produced = {o for nd in nodes for o in nd.output}
    g.value_info.extend(vi for vi in src.value_info if vi.name in produced and vi.name not in io)

    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.producer_name = model.producer_name or "edge"
    m.producer_version = model.producer_version
    m.domain = model.domain
    m.model_version = model.model_version
    m.opset_import.extend(model.opset_import)
    m.functions.extend(_used_functions(model, nodes))
    m.graph.CopyFrom(g)
    for t in m.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise GraphError(f"initializer {t.name!r} still points to external data; load "
                             "the model with its weights before building shards")
    data = m.SerializeToString() if m.ByteSize() <= _PROTO_LIMIT else None
    if data is None:
        raise GraphError(
            f"shard for nodes [{start}, {end}) would be {m.ByteSize() / 2**30:.1f} GiB; "
            "embedded weights cannot exceed 2 GiB — use more devices")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if check:
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as e:
            raise GraphError(f"shard {path} for nodes [{start}, {end}) fails the ONNX "
                             f"checker: {e}") from None
    digest = hashlib.sha256(data).hexdigest()
    log.info("shard %s: nodes [%d, %d), %d inputs, %d outputs, %d initializers, %.1f MiB",
             path.name, start, end, len(inputs), len(outputs), len(init_needed),
             len(data) / 2**20)
    return ShardInfo(path=path, sha256=digest, size=len(data), inputs=tuple(inputs),
                     outputs=tuple(outputs), initializers=tuple(init_needed))
