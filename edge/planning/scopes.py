"""Which tensors an ONNX node reads from its scope, subgraphs included.

An If, Loop or Scan node reads, besides its inputs, every outer name its subgraphs use
(implicit inputs). Cuts, shards and constant folding must all see those reads.
"""

from __future__ import annotations

import onnx

__all__ = ["attr_graphs", "node_reads", "input_counts"]


def _subgraph_refs(g: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from its enclosing scope (implicit inputs)."""
    defined = {i.name for i in g.input} | {t.name for t in g.initializer}
    defined |= {t.name for t in g.sparse_initializer}
    used: set[str] = set()
    for node in g.node:
        used.update(x for x in node.input if x)
        for a in node.attribute:
            for sg in attr_graphs(a):
                used |= _subgraph_refs(sg)
        defined.update(x for x in node.output if x)
    used.update(o.name for o in g.output)
    return used - defined


def attr_graphs(a: onnx.AttributeProto) -> list[onnx.GraphProto]:
    if a.type == onnx.AttributeProto.GRAPH:
        return [a.g]
    if a.type == onnx.AttributeProto.GRAPHS:
        return list(a.graphs)
    return []


def node_reads(node: onnx.NodeProto) -> list[str]:
    """Every outer-scope name a node reads: its inputs plus subgraph implicit inputs."""
    names = [x for x in node.input if x]
    seen = set(names)
    for a in node.attribute:
        for sg in attr_graphs(a):
            for x in sorted(_subgraph_refs(sg)):
                if x not in seen:
                    seen.add(x)
                    names.append(x)
    return names


def input_counts(g: onnx.GraphProto) -> dict[str, int]:
    """How many times the graph's nodes take each name as an input (e.g. whether a weight
    is read by one node only)."""
    counts: dict[str, int] = {}
    for nd in g.node:
        for x in nd.input:
            counts[x] = counts.get(x, 0) + 1
    return counts
