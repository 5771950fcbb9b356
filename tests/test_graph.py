"""graph.analyze on small hand-built graphs: crossing sets, weight bookkeeping, errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge.errors import GraphError
from edge.planning.graph import analyze


def _skip_model(opset: int = 18, shuffle: bool = False) -> onnx.ModelProto:
    """x -> relu a -> matmul W -> b; c = b + a (short skip); d = c @ W (tied weight);
    e = d + x (long skip); y = e * s. Outputs y and the intermediate c."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "W")
    s = numpy_helper.from_array(rng.standard_normal((4,)).astype(np.float32), "s")
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="n0"),
        helper.make_node("MatMul", ["a", "W"], ["b"], name="n1"),
        helper.make_node("Add", ["b", "a"], ["c"], name="n2"),
        helper.make_node("MatMul", ["c", "W"], ["d"], name="n3"),
        helper.make_node("Add", ["d", "x"], ["e"], name="n4"),
        helper.make_node("Mul", ["e", "s"], ["y"], name="n5"),
    ]
    if shuffle:
        nodes = [nodes[k] for k in (3, 0, 5, 1, 4, 2)]
    g = helper.make_graph(
        nodes, "skips",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("c", TensorProto.FLOAT, ["batch", 4])],
        initializer=[w, s])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


EXPECTED_CROSSING = [
    {"x"},
    {"x", "a"},
    {"x", "a", "b"},
    {"x", "c"},
    {"x", "c", "d"},
    {"c", "e"},
    {"c", "y"},
]


def test_crossing_sets_exact():
    c = analyze(_skip_model(), {"batch": 3})
    assert c.num_nodes == 6
    for p, want in enumerate(EXPECTED_CROSSING):
        assert set(c.crossing(p)) == want, p
        assert c.cut_bytes[p] == len(want) * 3 * 4 * 4, p
    # live while node p runs = crossing(p) plus its own outputs
    np.testing.assert_array_equal(c.live_bytes, c.cut_bytes[:6] + c.output_bytes)
    assert c.specs["c"].shape == ("batch", 4) and c.specs["c"].dtype == "float32"


def test_weights_counted_once_per_range_and_shared_in_both():
    c = analyze(_skip_model(), {"batch": 1})
    w_bytes, s_bytes = 4 * 4 * 4, 4 * 4
    assert c.param_bytes.sum() == w_bytes + s_bytes == c.total_param_bytes
    assert list(c.param_bytes) == [0, w_bytes, 0, 0, 0, s_bytes]
    assert c.node_inits[3] == ["W"]
    # W is tied: used by n1 and n3, so two stages split between them both hold it.
    assert c.weight_bytes(0, 3) == w_bytes
    assert c.weight_bytes(3, 6) == w_bytes + s_bytes
    assert c.weight_bytes(0, 6) == w_bytes + s_bytes
    assert c.weight_bytes(4, 5) == 0


def test_flops():
    c = analyze(_skip_model(), {"batch": 2})
    assert c.flops[1] == 2 * 2 * 4 * 4  # MatMul [2,4]x[4,4]
    assert c.flops[2] == 2 * 4          # Add: one per output element


def test_nodes_sorted_topologically():
    c = analyze(_skip_model(shuffle=True), {"batch": 1})
    assert c.node_names == ["n0", "n1", "n2", "n3", "n4", "n5"]
    assert [set(c.crossing(p)) for p in range(7)] == EXPECTED_CROSSING


def test_old_opset_converted():
    c = analyze(_skip_model(opset=13), {"batch": 1})
    assert c.notes[0] == "converted from opset 13 to 17"
    assert "largest relative difference 0" in c.notes[-1]
    assert [set(c.crossing(p)) for p in range(7)] == EXPECTED_CROSSING


def test_unbound_dim_named():
    m = _skip_model()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "height"
    with pytest.raises(GraphError, match=r"height.*--dim height=SIZE"):
        analyze(m)
    assert analyze(m, {"height": 2}).bindings == {"height": 2}


def test_batch_defaults_to_one():
    assert analyze(_skip_model()).bindings == {"batch": 1}


def test_external_data(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save(_skip_model(), str(path), save_as_external_data=True, location="ext.onnx.data",
              size_threshold=0)
    assert (tmp_path / "ext.onnx.data").stat().st_size >= 80
    c = analyze(path, {"batch": 1})
    assert c.total_param_bytes == 80
    assert all(len(t.raw_data) > 0 for t in c.model.graph.initializer)


def test_subgraph_implicit_input_is_a_use():
    # `If` whose then-branch reads `a` from the outer scope: a must cross into the If.
    then_g = helper.make_graph([helper.make_node("Identity", ["a"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["u"])], "else", [],
                               [helper.make_tensor_value_info("u", TensorProto.FLOAT, [2])])
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("ReduceSum", ["x"], ["r"], keepdims=0),
        helper.make_node("Greater", ["r", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g),
    ]
    g = helper.make_graph(
        nodes, "if", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        initializer=[numpy_helper.from_array(np.zeros((), np.float32), "zero")])
    c = analyze(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))
    assert set(c.crossing(3)) == {"x", "a", "cond"}


def test_weight_transposes_folded_tables_and_int8_sizes():
    """A Transpose of a weight becomes a transposed weight (not an activation); Gather
    tables and int8 sizes are recorded per initializer."""
    rng = np.random.default_rng(0)
    # big enough to be folded (1 MiB); the graph's other tensors stay small
    emb = numpy_helper.from_array(rng.standard_normal((65536, 4)).astype(np.float32), "E")
    ln = numpy_helper.from_array(np.ones(4, np.float32), "g")
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["h"], name="embed"),
        helper.make_node("LayerNormalization", ["h", "g"], ["n"], name="ln"),
        helper.make_node("Transpose", ["E"], ["Et"], name="tied_t", perm=[1, 0]),
        helper.make_node("MatMul", ["n", "Et"], ["logits"], name="head"),
    ]
    g = helper.make_graph(
        nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, 65536])],
        initializer=[emb, ln])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    c = analyze(m, {"batch": 1})
    assert c.op_types == ["Gather", "LayerNormalization", "MatMul"]
    assert len(m.graph.node) == 4  # the caller's model is not changed
    k = {name: i for i, name in enumerate(c.init_names)}
    assert set(k) == {"E", "g", "Et"}
    # the transposed weight is a weight of the head, not a live tensor
    assert c.node_inits[2] == ["Et"]
    assert c.live_bytes.max() == 3 * 65536 * 4 + 3 * 4 * 4  # n + logits at the head
    assert list(c.init_table_uses[k["E"]]) == [0]
    assert len(c.init_table_uses[k["Et"]]) == 0 and len(c.init_table_uses[k["g"]]) == 0
    assert c.init_int8_bytes[k["E"]] == 65536 * 4 == c.init_int8_bytes[k["Et"]]  # 1 byte each
    assert c.init_int8_bytes[k["g"]] == 16  # LayerNorm scale stays fp32


def test_activation_degrees_follow_the_sizes(bert_tiny, unet_tiny):
    """How each tensor grows with each size: hidden states with the sequence, attention
    scores with its square, feature maps with height and width, shapes with nothing."""
    bert = analyze(bert_tiny, {"batch": 1, "sequence": 16})
    scores = [t for t, s in bert.concrete_shapes.items() if len(s) == 4 and s[-2:] == (16, 16)]
    assert scores and all(bert.tensor_degrees[t] == {"batch": 1, "sequence": 2} for t in scores)
    hidden = [t for t, s in bert.concrete_shapes.items() if s == (1, 16, 128)]
    # (position embeddings are the same for every row of a batch)
    assert hidden and all(bert.tensor_degrees[t].get("sequence") == 1 for t in hidden)
    assert sum(bert.tensor_degrees[t] == {"batch": 1, "sequence": 1} for t in hidden) > 10
    # shape tensors (a handful of int64s) do not grow
    fixed = [t for t, s in bert.concrete_shapes.items() if len(s) == 1 and bert.producer[t] >= 0
             and bert.op_types[bert.producer[t]] == "Shape"]
    assert fixed and all(bert.tensor_degrees[t] == {} for t in fixed)
    # a stage holding attention grows with the square; the whole model too
    assert bert.activation_degrees(0, bert.num_nodes) == {"batch": 1, "sequence": 2}
    unet = analyze(unet_tiny, {"batch": 1, "height": 64, "width": 64})
    assert unet.activation_degrees(0, unet.num_nodes) == {"batch": 1, "height": 1, "width": 1}
    # and the bound holds: at 4x the sequence, every tensor is within 4**degree of its size
    big = analyze(bert_tiny, {"batch": 1, "sequence": 64})
    for t, size in bert.tensor_bytes.items():
        assert big.tensor_bytes[t] <= size * 4 ** bert.tensor_degrees[t].get("sequence", 0), t


def test_degrees_at_the_longest_sequence(bert_tiny):
    """At its longest sequence (512 positions) the model may not run at twice that; the
    degrees come out the same (measured halved instead)."""
    costs = analyze(bert_tiny, {"batch": 1, "sequence": 512})
    assert costs.activation_degrees(0, costs.num_nodes) == {"batch": 1, "sequence": 2}
