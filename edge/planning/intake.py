"""Intake: turn an ONNX file from the wild into the form the planner and the shard builder
work on, without changing what it computes.

Models that nobody here exported arrive in every form the ONNX spec has allowed:

- **old opsets** (PP-OCR and ddddocr ship opset 11 and 12, the ONNX model zoo 9): they are
  converted to :data:`TARGET_OPSET` with ``onnx.version_converter``; :func:`check_same`
  then runs both in onnxruntime on the same inputs and refuses the model if they differ;
- **IR version 3**, where every initializer is also listed as a graph input: a shard of
  such a graph fails the checker ("in initializer but not in graph input") unless it
  lists them too, so the initializers are taken out of the inputs and the IR version is
  raised to what the opsets need;
- **weights held in Constant nodes** (every Paddle2ONNX model) or **built from constants**
  (ConstantOfShape in the model zoo's light models): every node that depends on constants
  alone is evaluated once here and replaced by initializers. They are then weights like
  any other: they belong to the stage that uses them, count as weights in memory, never
  cross a cut, and int8 quantizes them. onnxruntime would fold them at load anyway;
- **BatchNormalization after a Conv** (ONNX model zoo CNNs, Paddle2ONNX): onnxruntime fuses
  it into the Conv's weights while the session is built, holding the mapped weights and the
  fused copy at once (a ResNet-50 stage peaked 22% over its plan, an Inception one 31%).
  Fused here once, the shard holds the fused weights, mapped, and nothing is copied;
- **input dims without names** (``-1``, ``?``, an empty name): each is named
  ``INPUT:AXIS`` (``x:0``), which is how errors name it and how ``--dim x:0=1`` binds it.
  Unnamed dims elsewhere (``-1`` in Paddle's value_info) are unknown, never a size.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper, version_converter

from edge.errors import GraphError
from edge.planning.scopes import attr_graphs, node_reads

__all__ = ["ANONYMOUS_DIMS", "TARGET_OPSET", "Intake", "normalize", "check_same", "anonymous_dim",
           "default_opset", "set_nodes"]

log = logging.getLogger(__name__)

# The opset models are converted to. The planner's shape and FLOP rules, the shard builder
# and int8 quantization are written against 17+.
TARGET_OPSET = 17

# Never folded: ops whose value differs between runs; quantize/dequantize pairs, which
# onnxruntime keeps to fuse into int8 kernels (folded, an int8 weight would become fp32);
# and transposes of weights, which the planner folds only when big
# (graph._fold_weight_transposes: a small weight's copy costs nothing, a big one's does).
_NOT_FOLDED = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike",
                         "RandomUniformLike", "Multinomial", "Bernoulli",
                         "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
                         "Transpose"})

# Dim names exporters write for "unknown" (Paddle2ONNX writes "?"; others ""). Two such
# dims are not the same size, so they must not share a name.
ANONYMOUS_DIMS = frozenset({"", "?", "-1", "None", "none", "unk"})


@dataclass
class Intake:
    """What :func:`normalize` changed, for people (``notes``) and for the checks after it.

    Attributes:
        converted_from: the model's opset before conversion; None if it was not converted.
        converted: the model right after conversion, before anything else changed it: what
            :func:`check_same` compares with the original (None when not converted; the
            caller drops it once checked).
        notes: one line per change, printed by ``edge plan`` and ``edge profile``.
    """

    converted_from: int | None = None
    converted: onnx.ModelProto | None = None
    notes: list[str] = field(default_factory=list)


def anonymous_dim(input_name: str, axis: int) -> str:
    """The name intake gives an unnamed dim of a graph input, bindable with ``--dim``."""
    return f"{input_name}:{axis}"


def default_opset(m: onnx.ModelProto) -> int | None:
    """The version of the default ('ai.onnx') opset the model imports, or None."""
    for o in m.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return None


def normalize(m: onnx.ModelProto, where: str = "model") -> tuple[onnx.ModelProto, Intake]:
    """A copy of ``m`` in the form the planner expects (see the module docstring).

    Args:
        m: the loaded model, weights included; not changed.
        where: names the model in errors (its path).

    Returns:
        (the normalized model, what was changed). When nothing needed changing the model
        is returned as it is.
    """
    intake = Intake()
    opset = default_opset(m)
    if opset is None:
        raise GraphError(f"{where}: opset_import: expected the default ('ai.onnx') opset, "
                         "the model imports none")
    inits = {t.name for t in m.graph.initializer}
    needs_ir = m.ir_version < 4 and any(i.name in inits for i in m.graph.input)
    foldable = _foldable(m.graph)
    unnamed = _unnamed_input_dims(m.graph, inits)
    nested = _nested_constants(m.graph)
    if (opset >= TARGET_OPSET and not needs_ir and not foldable and not unnamed
            and not nested and not any(nd.op_type == "BatchNormalization" for nd in m.graph.node)):
        return m, intake

    out = onnx.ModelProto()
    out.CopyFrom(m)
    if opset < TARGET_OPSET:
        # Before the IR fix: the converter wants an IR 3 graph's initializers as inputs.
        out = _convert(out, opset, where)
        intake.converted_from = opset
        # Checked as it is: the folds and fusions below change float rounding, and the
        # question is whether the conversion kept the outputs.
        intake.converted = onnx.ModelProto()
        intake.converted.CopyFrom(out)
        intake.notes.append(f"converted from opset {opset} to {TARGET_OPSET}")
    if needs_ir:
        _drop_initializer_inputs(out)
        intake.notes.append(f"IR version {m.ir_version}: initializers are no longer listed "
                            "as graph inputs")
    min_ir = helper.find_min_ir_version_for(list(out.opset_import), ignore_unknown=True)
    if out.ir_version < max(4, min_ir):
        out.ir_version = max(4, min_ir)
    if unnamed:
        _name_dims(out.graph, unnamed)
        names = [anonymous_dim(i, a) for i, axes in unnamed.items() for a in axes]
        intake.notes.append(f"unnamed input dims are named {', '.join(names)} "
                            "(bind them with --dim NAME=SIZE or --sample)")
    hoisted = _hoist_nested_constants(out.graph)
    if hoisted:
        intake.notes.append(f"{hoisted} constants inside subgraphs (If, Loop, Scan) are "
                            "weights of the node that holds them")
    foldable = _foldable(out.graph)
    if foldable:
        _fold(out, foldable, where)
        intake.notes.append(f"{len(foldable)} constant nodes folded into weights")
    fused = _fuse_conv_batchnorm(out.graph)
    if fused:
        intake.notes.append(f"{fused} BatchNormalization nodes fused into the Conv before "
                            "them")
    return out, intake


def set_nodes(g: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> set[str]:
    """Make ``nodes`` the graph's nodes, in place, and drop the initializers no node reads
    any more. Returns the names the graph still reads (its outputs included)."""
    kept = list(nodes)
    del g.node[:]
    g.node.extend(kept)
    used = {x for nd in g.node for x in node_reads(nd)} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return used


# --------------------------------------------------------------------------- IR, opset


def _drop_initializer_inputs(m: onnx.ModelProto) -> None:
    inits = {t.name for t in m.graph.initializer}
    keep = [i for i in m.graph.input if i.name not in inits]
    del m.graph.input[:]
    m.graph.input.extend(keep)


def _convert(m: onnx.ModelProto, opset: int, where: str) -> onnx.ModelProto:
    try:
        out = version_converter.convert_version(m, TARGET_OPSET)
    except Exception as e:  # the converter raises RuntimeError, ValueError, its own kinds
        raise GraphError(f"{where}: model opset: expected >= {TARGET_OPSET}, got {opset}, "
                         f"and onnx.version_converter could not convert it ({e}); re-export "
                         f"with opset_version={TARGET_OPSET} or newer") from None
    log.info("%s: converted from opset %d to %d", where, opset, TARGET_OPSET)
    return out


def check_same(original: onnx.ModelProto, converted: onnx.ModelProto,
               feeds: Mapping[str, np.ndarray], where: str = "model",
               rtol: float = 1e-4) -> float:
    """Run both models in onnxruntime on ``feeds`` and refuse the conversion if any output
    differs by more than ``rtol`` relative to the output's largest magnitude.

    Args:
        original: the model as it came (any opset onnxruntime runs).
        converted: the normalized model.
        feeds: one input per graph input of ``converted`` (the sample, or synthetic).
        where: names the model in errors.
        rtol: the largest relative difference accepted.

    Returns:
        The largest relative difference seen (0.0 when equal). If onnxruntime cannot run
        the original, the check is skipped with a warning and 0.0 returned: there is
        nothing to compare against.
    """
    try:
        ref = _run(original, feeds)
    except Exception as e:  # noqa: BLE001 - any ORT failure: nothing to compare against
        log.warning("%s: onnxruntime cannot run the original model (%s); the converted "
                    "model's outputs are not checked against it", where, e)
        return 0.0
    try:
        got = _run(converted, feeds)
    except Exception as e:  # noqa: BLE001
        raise GraphError(f"{where}: the model converted to opset {TARGET_OPSET} does not run "
                         f"in onnxruntime ({e}); re-export it with opset_version="
                         f"{TARGET_OPSET} or newer") from None
    worst = 0.0
    for name, a in ref.items():
        b = got.get(name)
        if b is None or a.shape != b.shape:
            raise GraphError(f"{where}: output {name!r} after conversion to opset "
                             f"{TARGET_OPSET}: expected shape {a.shape}, got "
                             f"{None if b is None else b.shape}; re-export the model")
        if a.dtype.kind in "fc":
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            if np.isnan(a64).any() or np.isnan(b64).any():
                same = np.array_equal(np.isnan(a64), np.isnan(b64))
                a64, b64 = np.nan_to_num(a64), np.nan_to_num(b64)
                if not same:
                    worst = np.inf
            scale = max(float(np.abs(a64).max(initial=0.0)), 1e-12)
            worst = max(worst, float(np.abs(a64 - b64).max(initial=0.0)) / scale)
        elif not np.array_equal(a, b):
            worst = np.inf
        if worst > rtol:
            raise GraphError(f"{where}: converting to opset {TARGET_OPSET} changed output "
                             f"{name!r}: expected a relative difference <= {rtol:g}, got "
                             f"{worst:.3g}; re-export the model with opset_version="
                             f"{TARGET_OPSET} or newer")
    return worst


def _run(m: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    copy = onnx.ModelProto()
    copy.CopyFrom(m)  # saving with external data rewrites the initializers in place
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.onnx")
        onnx.save(copy, path, save_as_external_data=True, location="model.onnx.data",
                  size_threshold=1024)
        so = ort.SessionOptions()
        so.log_severity_level = 4  # a failure is raised with its message
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        wanted = {i.name for i in sess.get_inputs()}
        outs = sess.run(names, {k: v for k, v in feeds.items() if k in wanted})
    return {k: np.asarray(v) for k, v in zip(names, outs)}


# --------------------------------------------------------------------------- dims


def _unnamed_input_dims(g: onnx.GraphProto, inits: set[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for vi in g.input:
        if vi.name in inits or not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        for k, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                continue
            if d.HasField("dim_param") and d.dim_param.strip() not in ANONYMOUS_DIMS:
                continue
            out.setdefault(vi.name, []).append(k)
    return out


def _name_dims(g: onnx.GraphProto, unnamed: dict[str, list[int]]) -> None:
    for vi in g.input:
        for k in unnamed.get(vi.name, ()):
            d = vi.type.tensor_type.shape.dim[k]
            d.Clear()
            d.dim_param = anonymous_dim(vi.name, k)


# --------------------------------------------------------------------------- folding


def _nested_constants(g: onnx.GraphProto) -> list[tuple[onnx.GraphProto, int]]:
    """(subgraph, position) of every Constant node holding a tensor inside ``g``'s
    subgraphs, at any depth."""
    out = []
    for nd in g.node:
        for a in nd.attribute:
            for sg in attr_graphs(a):
                out.extend((sg, p) for p, c in enumerate(sg.node)
                           if c.op_type == "Constant" and c.domain in ("", "ai.onnx")
                           and len(c.attribute) == 1 and c.attribute[0].name == "value")
                out.extend(_nested_constants(sg))
    return out


def _hoist_nested_constants(g: onnx.GraphProto) -> int:
    """Move the tensors of Constant nodes inside subgraphs to initializers of ``g``.

    Silero VAD keeps all its weights in Constant nodes inside the branches of an If: seen
    from the graph, the If held no weights at all. A subgraph reads outer names, so once
    hoisted the If reads them as initializers: they count as its stage's weights.
    """
    taken = ({i.name for i in g.input} | {t.name for t in g.initializer}
             | {o for nd in g.node for o in nd.output})
    hoisted = 0
    for sg, p in reversed(_nested_constants(g)):  # reversed: positions stay valid
        nd = sg.node[p]
        name = nd.output[0]
        if not name or name in taken:
            continue
        t = onnx.TensorProto()
        t.CopyFrom(nd.attribute[0].t)
        t.name = name
        g.initializer.append(t)
        taken.add(name)
        del sg.node[p]
        hoisted += 1
    return hoisted



def _foldable(g: onnx.GraphProto) -> list[int]:
    """Positions of the top-level nodes whose value depends on initializers alone."""
    const = {t.name for t in g.initializer}
    outputs = {o.name for o in g.output}
    out = []
    # Nodes may come in any order; repeat until no more become constant.
    pending = list(range(len(g.node)))
    changed = True
    while changed:
        changed = False
        rest = []
        for p in pending:
            nd = g.node[p]
            reads = [x for x in nd.input if x]
            if (nd.op_type in _NOT_FOLDED or any(attr_graphs(a) for a in nd.attribute)
                    or nd.domain not in ("", "ai.onnx")
                    or any(x not in const for x in reads)
                    or any(o in outputs for o in nd.output)
                    or (nd.op_type == "Constant"
                        and any(a.name in ("sparse_value", "value_string", "value_strings")
                                for a in nd.attribute))):
                rest.append(p)
                continue
            out.append(p)
            const.update(o for o in nd.output if o)
            changed = True
        pending = rest
    return sorted(out)


def _fold(m: onnx.ModelProto, foldable: list[int], where: str) -> None:
    """Evaluate the foldable nodes once in onnxruntime and replace them by initializers of
    the values that the rest of the graph reads."""
    g = m.graph
    fold_set = set(foldable)
    produced = {o for p in foldable for o in g.node[p].output if o}
    read_by_rest: set[str] = set()
    for p, nd in enumerate(g.node):
        if p not in fold_set:
            read_by_rest.update(node_reads(nd))
    needed = [t for t in _ordered(g, foldable) if t in read_by_rest]

    values: dict[str, np.ndarray] = {}
    if needed:
        probe = onnx.ModelProto()
        probe.ir_version = m.ir_version
        probe.opset_import.extend(m.opset_import)
        probe.graph.name = "fold"
        probe.graph.node.extend(g.node[p] for p in foldable)
        reads = {x for p in foldable for x in g.node[p].input if x}
        probe.graph.initializer.extend(t for t in g.initializer if t.name in reads)
        for t in needed:
            vi = onnx.ValueInfoProto()
            vi.name = t
            probe.graph.output.append(vi)
        try:
            values = _run(probe, {})
        except Exception as e:  # noqa: BLE001
            raise GraphError(f"{where}: cannot evaluate its {len(foldable)} constant nodes "
                             f"in onnxruntime to fold them into weights ({e})") from None
        bad = [t for t, v in values.items() if v.dtype == object]
        if bad:
            raise GraphError(f"{where}: constant nodes make string tensors ({bad[:3]}); "
                             "edge cannot cut such a model")
    for t in needed:
        g.initializer.append(numpy_helper.from_array(np.asarray(values[t]), t))
    set_nodes(g, [nd for p, nd in enumerate(g.node) if p not in fold_set])
    # value_info of folded tensors would now describe initializers: drop it.
    vis = [vi for vi in g.value_info if vi.name not in produced]
    del g.value_info[:]
    g.value_info.extend(vis)
    log.info("%s: folded %d constant nodes into %d initializers", where, len(foldable),
             len(needed))


def _ordered(g: onnx.GraphProto, positions: list[int]) -> list[str]:
    return [o for p in positions for o in g.node[p].output if o]


# --------------------------------------------------------------------------- Conv + BN


def _fuse_conv_batchnorm(g: onnx.GraphProto) -> int:
    """Fold each inference BatchNormalization whose input is a Conv's output into that
    Conv's weights and bias, in place: ``W' = W * s``, ``b' = (b - mean) * s + beta`` with
    ``s = gamma / sqrt(var + eps)`` per output channel. Only where every tensor involved is
    a float32 initializer that no other node reads, and the Conv's output feeds only the
    BatchNormalization. Returns how many were fused."""
    inits = {t.name: t for t in g.initializer}
    outputs = {o.name for o in g.output}
    readers: dict[str, int] = {}
    for nd in g.node:
        for x in node_reads(nd):
            readers[x] = readers.get(x, 0) + 1
    producer = {o: nd for nd in g.node for o in nd.output if o}

    def own_float(name: str) -> bool:
        t = inits.get(name)
        return (t is not None and t.data_type == onnx.TensorProto.FLOAT
                and readers.get(name, 0) == 1)

    fused, drop = 0, set()
    for bn in g.node:
        if (bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx")
                or len(bn.input) != 5 or len([o for o in bn.output if o]) != 1
                or any(a.name == "training_mode" and a.i for a in bn.attribute)):
            continue
        conv = producer.get(bn.input[0])
        if (conv is None or conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx")
                or readers.get(bn.input[0], 0) != 1 or bn.input[0] in outputs
                or len(conv.input) < 2 or not own_float(conv.input[1])
                or (len(conv.input) > 2 and conv.input[2] and not own_float(conv.input[2]))
                or not all(x in inits and inits[x].data_type == onnx.TensorProto.FLOAT
                           for x in bn.input[1:])):
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[x]).astype(np.float64)
                                  for x in bn.input[1:])
        w = numpy_helper.to_array(inits[conv.input[1]])
        if w.shape[0] != gamma.shape[0]:
            continue
        scale = gamma / np.sqrt(var + eps)
        has_bias = len(conv.input) > 2 and bool(conv.input[2])
        b = (numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if has_bias
             else np.zeros_like(scale))
        new_w = (w.astype(np.float64) * scale.reshape(-1, *([1] * (w.ndim - 1))))
        inits[conv.input[1]].CopyFrom(numpy_helper.from_array(new_w.astype(np.float32),
                                                              conv.input[1]))
        bias_name = conv.input[2] if has_bias else f"{bn.output[0]}.fused_bias"
        bias = numpy_helper.from_array(((b - mean) * scale + beta).astype(np.float32),
                                       bias_name)
        if has_bias:
            inits[bias_name].CopyFrom(bias)
        else:
            g.initializer.append(bias)
            while len(conv.input) < 3:
                conv.input.append("")
            conv.input[2] = bias_name
        conv.output[0] = bn.output[0]
        drop.add(id(bn))
        fused += 1
    if fused:
        used = set_nodes(g, [nd for nd in g.node if id(nd) not in drop])
        vis = [vi for vi in g.value_info if vi.name in used]
        del g.value_info[:]
        g.value_info.extend(vis)
    return fused
