"""The largest size of each symbolic dim that a model itself can take, whatever the memory.

A BERT exported with 512 learned positions cannot run a sequence of 600, however much
memory the devices have: its position ids are a slice of a 512-long table. Memory bounds
alone (``edge.coordinator.guard``) would advertise "sequence up to 2770". So the limits
the model's own weights set are found here, from the graph, at plan time:

* a ``Slice`` of a weight whose output grows with a dim cannot be longer than the weight
  (HF BERT's ``position_ids`` buffer, a GPT-2 causal-mask buffer);
* a ``Gather`` from a weight table whose indices count along a dim (``Range``, as
  ``torch.arange`` exports) cannot index past the table's rows.

Indices computed from the values of a graph input (token ids, an attention mask's cumsum)
say nothing about the dim: only those computed from shapes and weights count. The result
is a necessary condition, not a proof that larger sizes fail elsewhere.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import onnx

__all__ = ["dim_limits"]

# Ops through which a Range's counting survives (an index tensor reshaped, cast or offset).
_KEEPS_RANGE = {"Unsqueeze", "Squeeze", "Reshape", "Expand", "Cast", "Add", "Sub",
                "Identity", "Slice", "Flatten", "Tile"}


def dim_limits(nodes: Iterable[onnx.NodeProto], inits: Mapping[str, onnx.TensorProto],
               graph_inputs: Iterable[str], degrees: Mapping[str, Mapping[str, int]],
               bindings: Mapping[str, int], shapes: Mapping[str, tuple[int, ...]],
               ) -> dict[str, tuple[int, str]]:
    """Per symbolic dim, the largest size the model's weights allow, and why.

    Args:
        nodes: the model's nodes, in topological order.
        inits: its initializers by name.
        graph_inputs: names of its inputs (initializers excluded).
        degrees: per tensor, how its size grows with each dim (``GraphCosts.tensor_degrees``).
        bindings: the sizes the costs were computed at.
        shapes: per tensor, its shape at those sizes.

    Returns:
        {dim: (largest size, one line naming the weight that sets it)}; dims the weights
        do not limit are absent.
    """
    from_values = set(graph_inputs)  # tensors whose values depend on an input's values
    counting: set[str] = set()       # tensors that count along a dim (from a Range)
    found: dict[str, tuple[int, str]] = {}

    def limit(dim: str, size: int, why: str) -> None:
        if size >= 1 and (dim not in found or size < found[dim][0]):
            found[dim] = (size, why)

    for node in nodes:
        reads = [x for x in node.input if x]
        if node.op_type not in ("Shape", "Size") and any(x in from_values for x in reads):
            from_values.update(o for o in node.output if o)
        if node.op_type == "Range" or (node.op_type in _KEEPS_RANGE
                                        and any(x in counting for x in reads)):
            counting.update(o for o in node.output if o)
        if not reads or not node.output or not node.output[0]:
            continue
        out = node.output[0]
        table = inits.get(reads[0])
        if table is None or out in from_values:
            continue
        if node.op_type == "Slice":
            # numel(out) = c * dim**k at every size, and cannot exceed the weight's numel.
            numel = math.prod(table.dims)
            for dim, k in degrees.get(out, {}).items():
                planned = bindings.get(dim)
                if not planned or out not in shapes:
                    continue
                c = math.prod(shapes[out]) / planned ** k
                if c > 0:
                    limit(dim, int(math.floor((numel / c) ** (1 / k) + 1e-9)),
                          f"a slice of the weight {table.name} "
                          f"{list(table.dims)}")
        elif node.op_type == "Gather" and len(reads) > 1 and reads[1] in counting \
                and reads[1] not in from_values:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            rows = table.dims[axis] if -len(table.dims) <= axis < len(table.dims) else 0
            for dim, k in degrees.get(reads[1], {}).items():
                if k == 1:
                    limit(dim, int(rows), f"positions index the {rows}-row table "
                                          f"{table.name}")
    return found
