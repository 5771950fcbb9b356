"""State that stays on a stage: a decoder's KV caches (past input <-> present output).

A decoder exported with its cache as graph I/O (``past_key_values.N.key`` in,
``present.N.key`` out) reads each layer's past and writes that layer's present. At run time
the stage that holds layer N keeps the present as the sequence's cache and feeds it back as
the past on the next step: neither ever travels between stages. So for the planner:

- a past input is *available at its first consumer* (it does not cross the cuts before it,
  as an ordinary graph input "entering stage 0" would);
- a present output *ends at its producer* (it is not a graph output travelling to the last
  stage);
- no cut may fall between the first and last node that touch a pair (``cut_ok``): the pair
  lives on one stage.

Exporters often read the cache length once, early, with ``Shape`` of *one* layer's past
(torch's dynamo reads the last layer's value at node 4), which would pin every cut before
that layer. ``share_shape_reads`` points such reads at the earliest-used past declared with
the same shape instead: ONNX gives equal ``dim_param`` names equal sizes, so the shape read
is the same, and only the first layer's span is pinned.

Pure functions of names, positions and the graph's protobuf; no onnxruntime.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

import numpy as np
import onnx

from edge.spec import TensorSpec

__all__ = ["state_pairs", "share_shape_reads", "apply_state", "kv_bytes_per_token"]

# past_key_values.3.key / past.3.key / past_key_values_3_key / past.3 (GPT-2's fused k,v)
_PAST = re.compile(r"^(?:past_key_values|past)(?P<rest>[._].+)$")


def state_pairs(inputs: Sequence[str], outputs: Sequence[str]) -> list[tuple[str, str]]:
    """The (past input, present output) pairs of a graph, in input order.

    ``past_key_values.N.key`` pairs with ``present.N.key``, ``past.N.value`` with
    ``present.N.value`` (any separator, the same suffix). An input without its present is
    not state: it is an ordinary input.

    Args:
        inputs: the graph's input names (initializers excluded).
        outputs: the graph's output names.
    """
    outs = set(outputs)
    pairs = []
    for name in inputs:
        m = _PAST.match(name)
        if m and f"present{m['rest']}" in outs:
            pairs.append((name, f"present{m['rest']}"))
    return pairs


def _declared(vi: onnx.ValueInfoProto) -> tuple:
    t = vi.type.tensor_type
    return (t.elem_type, tuple(d.dim_param or d.dim_value for d in t.shape.dim))


def share_shape_reads(graph: onnx.GraphProto, pairs: Sequence[tuple[str, str]]) -> int:
    """Point ``Shape`` nodes that read a past at the past (declared with the same shape)
    whose data is read first, in place; nodes must be in topological order.

    Args:
        graph: the model's graph, changed in place.
        pairs: its (past, present) pairs (``state_pairs``).

    Returns:
        How many nodes were rewired.
    """
    pasts = {p for p, _ in pairs}
    if not pasts:
        return 0
    first_data: dict[str, int] = {}
    for k, node in enumerate(graph.node):
        if node.op_type != "Shape":
            for x in node.input:
                if x in pasts:
                    first_data.setdefault(x, k)
    declared = {vi.name: _declared(vi) for vi in graph.input if vi.name in pasts}
    rewired = 0
    for k, node in enumerate(graph.node):
        if node.op_type != "Shape" or node.input[0] not in pasts:
            continue
        same = [p for p in pasts if declared[p] == declared[node.input[0]] and p in first_data]
        if not same:
            continue
        best = min(same, key=lambda p: first_data[p])
        if best != node.input[0] and first_data[best] < first_data.get(node.input[0], k + 1):
            node.input[0] = best
            rewired += 1
    return rewired


def apply_state(producer: dict[str, int], last_use: dict[str, int],
                node_inputs: Sequence[Sequence[str]], pairs: Sequence[tuple[str, str]],
                n: int) -> np.ndarray:
    """Make state never cross a cut, in place, and say which cuts are allowed.

    Each past is produced just at its first consumer and each present ends at its last
    consumer inside the graph (or its producer), not at the graph's end: both then cross
    only cuts inside the pair's span, and those are forbidden.

    Args:
        producer, last_use: per tensor, as ``GraphCosts`` (graph outputs at ``n``).
        node_inputs: per node, the tensors it reads.
        pairs: (past, present) pairs (``state_pairs``).
        n: number of nodes.

    Returns:
        (n + 1,) bool: ``cut_ok[p]`` is False when a cut before node ``p`` would split a
        pair's span over two stages.
    """
    cut_ok = np.ones(n + 1, dtype=bool)
    uses: dict[str, list[int]] = {t: [] for pair in pairs for t in pair}
    for p, reads in enumerate(node_inputs):
        for x in reads:
            if x in uses:
                uses[x].append(p)
    for past, present in pairs:
        made = producer[present]
        lo = min(uses[past] + [made])
        hi = max(uses[past] + uses[present] + [made])
        producer[past] = lo
        last_use[past] = max(uses[past] + [lo])
        last_use[present] = max(uses[present] + [made])
        cut_ok[lo + 1:hi + 1] = False
    return cut_ok


def kv_bytes_per_token(specs: Mapping[str, TensorSpec], presents: Sequence[str],
                       stored: str | None = None) -> int:
    """Bytes the given presents grow by per token of one sequence: the product of their
    static dims (kv heads x head dim) times the item size, summed.

    Args:
        specs: symbolic TensorSpecs by name.
        presents: present output names.
        stored: the numpy dtype the caches are kept in ("float16"); None for the
            presents' own.
    """
    total = 0
    for name in presents:
        spec = specs[name]
        static = math.prod(d for d in spec.shape if isinstance(d, int))
        total += static * np.dtype(stored or spec.dtype).itemsize
    return int(total)
