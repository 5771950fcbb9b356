"""Finer cuts: a model's heavy blocks computed in parts so that the planner can balance
its stages.

The planner cuts between nodes, so no stage can be balanced more finely than the model's
largest node. In BERT-base a feed-forward block (MatMul by W1, GELU, MatMul by W2) is two
fifths of what a stage holds over eight boards: the best split of whole nodes alternates
284 ms and 234 ms stages (emulated Pi 4s) where 257 would be even, and the pipeline runs
at the pace of the longer ones.

**Feed-forward blocks** (the default, ``edge.build.make_plan(block_cuts=True)``) are
split whole (:func:`split_feed_forwards`): part i computes
``act(x @ W1[:, Ii] + b1[Ii]) @ W2[Ii, :]`` over its share Ii of the hidden columns, and
the parts are summed in order into the block's output. A cut between parts carries ``x``
and the sum so far: twice the block's output, where a cut inside a split W2 would carry
its four-times-wider input. In edge lab BERT-base over 8 Pi 4s ran 3-8% faster so.

**MatMuls by columns** (``edge plan --finer-cuts``, for models without such blocks):
``MatMul(x, W[:, a:b])`` each, then ``Concat``. Only MatMuls whose second input is a 2-D
weight read by no other node are split. It is not the default: the cut between parts
carries the MatMul's input as well, and in edge lab the CPU of sending and receiving it
(which the cost model does not count) cancelled the better balance (BENCHMARKS.md).

Either is asked for only when the split of whole nodes is further than ``IMBALANCE``
from even, in parts of at most ``PART_SHARE`` of the slowest stage, and kept only if its
split is faster by the cost model (``edge.build``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edge.planning.intake import set_nodes
from edge.planning.scopes import input_counts, node_reads

__all__ = ["IMBALANCE", "PART_SHARE", "MAX_PARTS", "FeedForward", "feed_forwards",
           "heavy_feed_forwards", "heavy_matmuls", "split_feed_forwards", "split_matmuls"]

log = logging.getLogger(__name__)

# A split whose slowest stage is this much over the even share is worth refining.
IMBALANCE = 0.05
# A part takes at most this share of the slowest stage's time (so a stage can be evened
# out to within about half of it).
PART_SHARE = 0.05
# Parts of one MatMul at most: each adds a Concat copy of its output.
MAX_PARTS = 4


def _copy(m: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.GraphProto, dict]:
    """A copy of ``m`` to rewrite, its graph, and its initializers by name."""
    out = onnx.ModelProto()
    out.CopyFrom(m)
    return out, out.graph, {t.name: t for t in out.graph.initializer}


def heavy_matmuls(op_types: Sequence[str], node_outputs: Sequence[Sequence[str]],
                  flops: Sequence[float], stage_flops: float) -> dict[str, int]:
    """The MatMuls worth splitting, by output name, with how many parts each.

    Args:
        op_types, node_outputs, flops: per node, as in ``GraphCosts``.
        stage_flops: the flops of the slowest stage of the current split.
    """
    part = PART_SHARE * stage_flops
    out = {}
    for op, outputs, f in zip(op_types, node_outputs, flops):
        if op == "MatMul" and part > 0 and f > part:
            out[outputs[0]] = min(MAX_PARTS, math.ceil(f / part))
    return out


def split_matmuls(m: onnx.ModelProto, parts: Mapping[str, int]) -> tuple[onnx.ModelProto, int]:
    """A copy of ``m`` with each MatMul named in ``parts`` (by its output) computed in that
    many parts of its weight's columns, joined by a Concat that keeps the output's name.

    Args:
        m: the model, weights loaded.
        parts: output name -> parts (>= 2 to split).

    Returns:
        The new model, and how many MatMuls were split.
    """
    out, g, inits = _copy(m)
    reads = input_counts(g)
    nodes, added, split = [], [], 0
    for nd in g.node:
        k = parts.get(nd.output[0], 1) if nd.op_type == "MatMul" else 1
        w = inits.get(nd.input[1]) if k > 1 else None
        if w is None or len(w.dims) != 2 or reads[w.name] != 1 or w.dims[1] < 2 * k:
            nodes.append(nd)
            continue
        weight = numpy_helper.to_array(w)
        bounds = np.linspace(0, weight.shape[1], k + 1).astype(int)
        names = []
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            part = numpy_helper.from_array(np.ascontiguousarray(weight[:, a:b]),
                                           f"{w.name}/part{i}")
            added.append(part)
            names.append(f"{nd.output[0]}/part{i}")
            nodes.append(helper.make_node("MatMul", [nd.input[0], part.name], [names[-1]],
                                          name=f"{nd.name or nd.output[0]}/part{i}"))
        nodes.append(helper.make_node("Concat", names, [nd.output[0]], axis=-1,
                                      name=f"{nd.name or nd.output[0]}/concat"))
        split += 1
    g.initializer.extend(added)
    set_nodes(g, nodes)  # drops the whole weights no node reads any more
    return out, split


# Elementwise ops a feed-forward block's activation may be made of (GELU as exported:
# Div, Erf, Add, Mul; or Gelu, Relu, Sigmoid...): each column of the hidden layer is
# computed from the same column alone, so the block splits by columns.
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Erf", "Tanh", "Sigmoid", "Relu",
                         "Gelu", "Pow", "Sqrt", "Neg", "Exp", "Abs", "Identity"})


@dataclass(frozen=True)
class FeedForward:
    """A block ``MatMul(x, W1) -> elementwise ops -> MatMul(h, W2)`` that splits by the
    hidden layer's columns: ``first`` and ``last`` index its MatMuls in the graph's nodes,
    ``body`` the elementwise nodes between them, in graph order."""
    first: int
    body: tuple[int, ...]
    last: int


def feed_forwards(g: onnx.GraphProto) -> list[FeedForward]:
    """The graph's feed-forward blocks that :func:`split_feed_forwards` can split.

    A block qualifies when W1 [d, f] and W2 [f, e] are initializers read by no other node,
    every node between the MatMuls is elementwise (:data:`ELEMENTWISE`) and is read only
    inside the block, and every other input of those nodes is an initializer that is a
    scalar or a vector of the f columns (a bias).
    """
    inits = {t.name: t for t in g.initializer}
    reads = input_counts(g)
    readers: dict[str, list[int]] = {}
    for i, nd in enumerate(g.node):
        for x in node_reads(nd):
            readers.setdefault(x, []).append(i)
    graph_outputs = {o.name for o in g.output}
    found, taken = [], set()
    for i, nd in enumerate(g.node):
        w1 = inits.get(nd.input[1]) if nd.op_type == "MatMul" else None
        if w1 is None or len(w1.dims) != 2 or reads[w1.name] != 1 or i in taken:
            continue
        block = _block_after(g, i, int(w1.dims[1]), inits, reads, readers, graph_outputs)
        if block is not None:  # blocks do not share nodes: a MatMul ends one or begins one
            found.append(block)
            taken.update((block.first, *block.body, block.last))
    return found


def _block_after(g: onnx.GraphProto, first: int, f: int, inits: dict, reads: dict,
                 readers: dict, graph_outputs: set) -> FeedForward | None:
    """The feed-forward block whose first MatMul is node ``first`` (hidden width ``f``)."""
    body: set[int] = set()
    last = None
    frontier = [g.node[first].output[0]]
    while frontier:  # every reader of the hidden layer, up to the second MatMul
        name = frontier.pop()
        if name in graph_outputs or not readers.get(name):
            return None  # an output of the model, or read by nothing
        for j in readers[name]:
            nd = g.node[j]
            if j in body or j == last:
                continue
            if nd.op_type == "MatMul" and last is None and nd.input[0] == name:
                w2 = inits.get(nd.input[1])
                if w2 is None or len(w2.dims) != 2 or w2.dims[0] != f or reads[w2.name] != 1:
                    return None
                last = j
            elif nd.op_type in ELEMENTWISE and len(nd.output) == 1:
                body.add(j)
                frontier.append(nd.output[0])
            else:
                return None  # read by something that does not split by columns
    inside = {g.node[first].output[0]} | {g.node[j].output[0] for j in body}
    for j in body:
        for x in g.node[j].input:
            if x not in inside and not (x in inits and _column_constant(inits[x], f)):
                return None
    if last is None or not body or max(body) > last:
        return None
    return FeedForward(first, tuple(sorted(body)), last)


def _column_constant(t: onnx.TensorProto, f: int) -> bool:
    """A scalar, or a vector of ``f`` (leading ones allowed): what a column split can
    share or slice."""
    dims = list(t.dims)
    return all(d == 1 for d in dims) or (dims[-1] == f and all(d == 1 for d in dims[:-1]))


def heavy_feed_forwards(g: onnx.GraphProto, flops: Mapping[str, float],
                        stage_flops: float) -> dict[str, int]:
    """The feed-forward blocks worth splitting, by their first MatMul's output, with how
    many parts each (parts of at most ``PART_SHARE`` of ``stage_flops``, at most
    ``MAX_PARTS``).

    Args:
        g: the graph.
        flops: a node's flops by its first output.
        stage_flops: the flops of the slowest stage of the current split.
    """
    part = PART_SHARE * stage_flops
    out = {}
    for b in feed_forwards(g):
        total = sum(flops.get(g.node[j].output[0], 0.0) for j in (b.first, *b.body, b.last))
        if part > 0 and total > part:
            out[g.node[b.first].output[0]] = min(MAX_PARTS, math.ceil(total / part))
    return out


def split_feed_forwards(m: onnx.ModelProto, parts: Mapping[str, int]
                        ) -> tuple[onnx.ModelProto, int]:
    """A copy of ``m`` with each feed-forward block (:func:`feed_forwards`) named in
    ``parts`` by its first MatMul's output computed in that many parts of its hidden
    columns, whose outputs are summed in order into the block's output.

    Returns:
        The new model, and how many blocks were split.
    """
    out, g, inits = _copy(m)
    blocks = {}  # by the index of its last MatMul, where its parts go: (block, parts)
    for b in feed_forwards(g):
        first = g.node[b.first]
        k = min(parts.get(first.output[0], 1), int(inits[first.input[1]].dims[1]) // 2)
        if k > 1:
            blocks[b.last] = (b, k)
    dropped = {j for b, _ in blocks.values() for j in (b.first, *b.body)}
    nodes, added = [], []
    for i, nd in enumerate(g.node):
        if i in dropped:
            continue
        if i not in blocks:
            nodes.append(nd)
            continue
        new_nodes, new_inits = _split_block(g, *blocks[i], inits)
        nodes += new_nodes
        added += new_inits
    g.initializer.extend(added)
    set_nodes(g, nodes)  # drops the whole weights no node reads any more
    return out, len(blocks)


def _split_block(g: onnx.GraphProto, b: FeedForward, k: int, inits: dict
                 ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The nodes and weights of block ``b`` in ``k`` parts, summed in order."""
    first, last = g.node[b.first], g.node[b.last]
    w1 = numpy_helper.to_array(inits[first.input[1]])
    w2 = numpy_helper.to_array(inits[last.input[1]])
    f = w1.shape[1]
    bounds = np.linspace(0, f, k + 1).astype(int)
    tag = last.output[0]
    nodes, added, total = [], [], None
    for p, (a, z) in enumerate(zip(bounds[:-1], bounds[1:])):
        rename = {first.output[0]: f"{first.output[0]}/ffn{p}"}
        added.append(numpy_helper.from_array(np.ascontiguousarray(w1[:, a:z]),
                                             f"{first.input[1]}/ffn{p}"))
        nodes.append(helper.make_node("MatMul", [first.input[0], added[-1].name],
                                      [rename[first.output[0]]],
                                      name=f"{first.name or first.output[0]}/ffn{p}"))
        for j in b.body:
            nd = g.node[j]
            ins = []
            for x in nd.input:
                if x in rename:
                    ins.append(rename[x])
                elif x in inits and list(inits[x].dims)[-1:] == [f] and f > 1:
                    v = numpy_helper.to_array(inits[x])
                    added.append(numpy_helper.from_array(  # a bias may serve two blocks
                        np.ascontiguousarray(v[..., a:z]), f"{x}/{tag}/ffn{p}"))
                    ins.append(added[-1].name)
                else:
                    ins.append(x)
            rename[nd.output[0]] = f"{nd.output[0]}/ffn{p}"
            copy = helper.make_node(nd.op_type, ins, [rename[nd.output[0]]],
                                    name=f"{nd.name or nd.output[0]}/ffn{p}")
            copy.attribute.extend(nd.attribute)
            nodes.append(copy)
        added.append(numpy_helper.from_array(np.ascontiguousarray(w2[a:z, :]),
                                             f"{last.input[1]}/ffn{p}"))
        part = f"{tag}/ffn{p}"
        nodes.append(helper.make_node("MatMul", [rename[last.input[0]], added[-1].name],
                                      [part], name=f"{last.name or tag}/ffn{p}"))
        if total is not None:  # the sum so far: what a cut after this part carries
            done = tag if p == k - 1 else f"{tag}/sum{p}"
            nodes.append(helper.make_node("Add", [total, part], [done],
                                          name=f"{last.name or tag}/sum{p}"))
            part = done
        total = part
    return nodes, added
