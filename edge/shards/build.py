"""Cut one stage's nodes out of a model into a self-contained shard.

A shard holds nodes ``[start, end)`` of the source graph (topological order, as in
GraphCosts) and only the initializers they use, and as graph inputs only the
tensors crossing the cut at ``start`` that those nodes read; as outputs, the tensors
crossing the cut at ``end`` that it produces. Tensors crossing both cuts without being
produced inside are pass-throughs: the worker forwards them (``Stage.passthrough``), so they
are not part of the shard graph. A decoder's KV caches are the exception to "only what
crosses": a stage takes its layers' pasts as inputs and gives their presents as outputs,
which its worker keeps per sequence (``stage_state``).

Built directly from the protobuf (``onnx.utils.extract_model`` re-infers shapes and takes
seconds per shard).

The weights go to external-data files next to the ``.onnx`` (``stage-0.onnx.data``, and
``stage-0.onnx.gather.data`` for tables that Gather nodes index, i.e. embeddings), which
onnxruntime maps instead of copying: a BERT-base stage peaks at ~160 MiB this way against
~320 MiB with the weights inside the ``.onnx`` (benchmarks/shard_memory_modes.py). Gather
tables get a file of their own so the worker can tell the kernel to read them at random:
a request touches a few rows of an 89 MiB table.
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

__all__ = ["DataFile", "ShardInfo", "build_shard", "shard_io", "stage_state", "externalize", "gather_tables",
           "save_shard"]

log = logging.getLogger(__name__)

# protobuf cannot serialise a message of 2 GiB or more: the graph alone must stay below.
_PROTO_LIMIT = (2 << 30) - 1
# Initializers smaller than this stay inside the .onnx (shape constants, biases of toys).
_EXTERNAL_MIN_BYTES = 1024
# Offsets of tensors in the data files: page-aligned, so each tensor maps on its own pages.
_ALIGN = 4096


@dataclass(frozen=True)
class DataFile:
    """An external-data file written next to a shard."""

    path: Path
    sha256: str
    size: int
    random_access: bool


@dataclass(frozen=True)
class ShardInfo:
    """A shard file written to disk.

    Attributes:
        path: where it was written.
        sha256: hex digest of the file's bytes.
        size: file size in bytes.
        inputs: names of the shard graph's inputs (consumed crossing tensors at start).
        outputs: names of the shard graph's outputs (produced crossing tensors at end).
        initializers: names of the shard's initializers.
        data_files: the external-data files the ``.onnx`` references, same folder.
    """

    path: Path
    sha256: str
    size: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    initializers: tuple[str, ...]
    data_files: tuple[DataFile, ...] = ()


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
    # The KV caches of the layers it holds: the past in, the present out (state never
    # crosses a cut, so a pair is wholly inside one stage).
    for past, present in stage_state(costs, start, end):
        if past in read:
            inputs.append(past)
        outputs.append(present)
    return inputs, outputs


def stage_state(costs: GraphCosts, start: int, end: int) -> list[tuple[str, str]]:
    """The (past, present) pairs of the layers that nodes ``[start, end)`` hold.

    Args:
        costs: the analysed source graph.
        start, end: the node range.
    """
    return [(a, b) for a, b in costs.state if start <= costs.producer[b] < end]


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
        path: the ``.onnx`` to write; its weights go to external-data files beside it.
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
    digest, size, data_files = save_shard(m, path, check=check,
                                          what=f"shard for nodes [{start}, {end})")
    log.info("shard %s: nodes [%d, %d), %d inputs, %d outputs, %d initializers, %.1f MiB "
             "of weights", path.name, start, end, len(inputs), len(outputs),
             len(init_needed), sum(f.size for f in data_files) / 2**20)
    return ShardInfo(path=path, sha256=digest, size=size, inputs=tuple(inputs),
                     outputs=tuple(outputs), initializers=tuple(init_needed),
                     data_files=tuple(data_files))


def save_shard(m: onnx.ModelProto, path: Path, check: bool = True,
               what: str = "shard") -> tuple[str, int, list[DataFile]]:
    """Write a shard as ``path`` plus its external-data files (``externalize``), in place.

    Args:
        m: the shard with its weights loaded; its initializers end up referencing the files.
        path: the ``.onnx`` to write.
        check: run ``onnx.checker.check_model(path, full_check=True)`` on the result (the
            path form, so the external data resolves).
        what: names the shard in errors.

    Returns:
        (sha256 of the .onnx, its size in bytes, the data files written).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_files = externalize(m, path)
    if m.ByteSize() > _PROTO_LIMIT:
        raise GraphError(f"{what} is {m.ByteSize() / 2**30:.1f} GiB without its weights; "
                         "ONNX cannot hold that")
    data = m.SerializeToString()
    path.write_bytes(data)
    if check:
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as e:
            raise GraphError(f"{what} ({path}) fails the ONNX checker: {e}") from None
    return hashlib.sha256(data).hexdigest(), len(data), data_files


def externalize(model: onnx.ModelProto, path: Path) -> list[DataFile]:
    """Move the model's initializers into data files next to ``path``, in place.

    Tensors that Gather nodes index (input 0) go to ``<name>.gather.data``, the rest to
    ``<name>.data``, each at a page-aligned offset. Files that would be empty are not
    written. onnx's own ``save_model(save_as_external_data=True)`` neither aligns nor
    splits.

    Args:
        model: a model whose initializers hold their data; changed to reference the files.
        path: where the ``.onnx`` will be written.

    Returns:
        The files written.
    """
    gathered = gather_tables(model.graph)
    groups: dict[bool, list[onnx.TensorProto]] = {False: [], True: []}
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise GraphError(f"initializer {t.name!r} still points to external data; load "
                             "the model with its weights before building shards")
        if not t.HasField("raw_data"):
            if _nbytes(t) < _EXTERNAL_MIN_BYTES:
                continue
            t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t), t.name))
        if len(t.raw_data) >= _EXTERNAL_MIN_BYTES:
            groups[t.name in gathered].append(t)
    written = []
    for random_access, tensors in groups.items():
        target = path.with_name(path.name + (".gather.data" if random_access else ".data"))
        target.unlink(missing_ok=True)  # a stale file from an earlier build
        if not tensors:
            continue
        h = hashlib.sha256()
        offset = 0
        with open(target, "wb") as f:
            for t in tensors:
                pad = (-offset) % _ALIGN
                if pad:
                    f.write(b"\0" * pad)
                    h.update(b"\0" * pad)
                    offset += pad
                raw = t.raw_data
                f.write(raw)
                h.update(raw)
                del t.external_data[:]
                for key, value in (("location", target.name), ("offset", str(offset)),
                                   ("length", str(len(raw)))):
                    entry = t.external_data.add()
                    entry.key, entry.value = key, value
                t.data_location = onnx.TensorProto.EXTERNAL
                t.ClearField("raw_data")
                offset += len(raw)
        written.append(DataFile(target, h.hexdigest(), offset, random_access))
    return written


def gather_tables(graph: onnx.GraphProto) -> set[str]:
    """Initializers of ``graph`` read only as the table (input 0) of Gather nodes.

    These are embeddings: a request touches a few rows. A table that some other node also
    reads whole (a tied embedding feeding the output MatMul in the same shard) is not one.
    """
    inits = {t.name for t in graph.initializer}
    table, other = set(), set()
    for nd in graph.node:
        if nd.op_type == "Gather" and nd.input and nd.input[0] in inits:
            table.add(nd.input[0])
            rest = node_reads(nd)[1:] if list(nd.input).count(nd.input[0]) == 1 else node_reads(nd)
        else:
            rest = node_reads(nd)
        other.update(x for x in rest if x in inits)
    return table - other


def _nbytes(t: onnx.TensorProto) -> int:
    count = int(np.prod(t.dims)) if len(t.dims) else 1
    return count * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
