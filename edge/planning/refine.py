"""Finer cuts: split a model's heaviest MatMuls so that the planner can balance its stages.

The planner cuts between nodes, so no stage can be balanced more finely than the model's
largest node. In BERT-base each feed-forward MatMul is a fifth of what a stage holds over
eight boards: the best split alternates 280 ms and 230 ms stages (emulated Pi 4s) where
257 would be even, and the pipeline runs at the pace of the longer ones. Splitting such a
MatMul by its weight's columns into parts (``MatMul(x, W[:, a:b])`` each, then ``Concat``)
computes the same values, and lets a cut fall between the parts: the stage before the cut
sends ``x`` and the parts it computed, the next computes the rest.

Only MatMuls whose second input is a 2-D weight read by no other node are split. With
``edge plan --finer-cuts`` the planner asks for it (:func:`heavy_matmuls`) only when its
split is further than ``IMBALANCE`` from even and some MatMul takes more than
``PART_SHARE`` of the slowest stage, and keeps the finer model only if its split is faster
by the cost model (``edge.build``). It is not the default: the cut between parts carries
the MatMul's input as well, and in edge lab the CPU of sending and receiving it (which
the model does not count) cancelled the better balance (BENCHMARKS.md).
"""

from __future__ import annotations

import logging
import math
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edge.planning.intake import set_nodes
from edge.planning.scopes import input_counts

__all__ = ["IMBALANCE", "PART_SHARE", "MAX_PARTS", "heavy_matmuls", "split_matmuls"]

log = logging.getLogger(__name__)

# A split whose slowest stage is this much over the even share is worth refining.
IMBALANCE = 0.05
# A part takes at most this share of the slowest stage's time (so a stage can be evened
# out to within about half of it).
PART_SHARE = 0.05
# Parts of one MatMul at most: each adds a Concat copy of its output.
MAX_PARTS = 4


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
    out = onnx.ModelProto()
    out.CopyFrom(m)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
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
