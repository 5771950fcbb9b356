"""Offline profile: layer grouping, exact parameter bytes, cut classification, report.json."""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

from edge.planning.graph import analyze
from edge.planning.memory import stage_memory_mb
from edge.profiling.offline import (DEFAULT_FLOOR_MB, 
    CHEAP_MAX_RATIO,
    MODERATE_MAX_RATIO,
    classify_cut,
    profile_model,
    render_offline,
    write_offline,
)


def _init_bytes(model: onnx.ModelProto) -> int:
    """Initializer bytes computed independently of edge, from the arrays themselves."""
    return sum(int(numpy_helper.to_array(t).nbytes) for t in model.graph.initializer)


def _layered_model() -> onnx.ModelProto:
    """embed -> three residual MLP blocks -> head -> logits with the embedding tied.

    Block 2's MatMul weight is anonymous (``val_7``, as dynamo names transposed weights),
    so the MatMul must still open block 2; the tied embedding at the end must not reopen
    the ``embed`` group.
    """
    rng = np.random.default_rng(0)

    def w(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    inits = [w("net.embed.weight", 10, 8),
             w("net.blocks.0.fc.weight", 8, 8), w("net.blocks.0.fc.bias", 8),
             w("net.blocks.1.fc.weight", 8, 8), w("net.blocks.1.fc.bias", 8),
             w("val_7", 8, 8), w("net.blocks.2.fc.bias", 8),
             w("net.head.weight", 8, 8)]
    mk = helper.make_node
    nodes = [
        mk("Gather", ["net.embed.weight", "ids"], ["e"], name="n0"),
        mk("MatMul", ["e", "net.blocks.0.fc.weight"], ["a0"], name="n1"),
        mk("Add", ["a0", "net.blocks.0.fc.bias"], ["b0"], name="n2"),
        mk("Relu", ["b0"], ["r0"], name="n3"),
        mk("Add", ["r0", "e"], ["s0"], name="n4"),
        mk("MatMul", ["s0", "net.blocks.1.fc.weight"], ["a1"], name="n5"),
        mk("Add", ["a1", "net.blocks.1.fc.bias"], ["b1"], name="n6"),
        mk("Relu", ["b1"], ["r1"], name="n7"),
        mk("MatMul", ["r1", "val_7"], ["a2"], name="n8"),
        mk("Add", ["a2", "net.blocks.2.fc.bias"], ["b2"], name="n9"),
        mk("Relu", ["b2"], ["r2"], name="n10"),
        mk("MatMul", ["r2", "net.head.weight"], ["h"], name="n11"),
        mk("Transpose", ["net.embed.weight"], ["wt"], name="n12", perm=[1, 0]),
        mk("MatMul", ["h", "wt"], ["logits"], name="n13"),
    ]
    g = helper.make_graph(
        nodes, "layered",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4, 10])],
        initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def _check_groups(profile, num_nodes: int) -> None:
    groups = profile.groups
    assert groups[0].start == 0 and groups[-1].end == num_nodes
    for a, b in zip(groups, groups[1:]):
        assert a.end == b.start and a.start < a.end
    assert [g.index for g in groups] == list(range(len(groups)))
    assert sum(g.num_ops for g in groups) == num_nodes
    cum = np.cumsum([g.param_bytes for g in groups])
    assert [g.cum_param_bytes for g in groups] == cum.tolist()
    mb = [g.cum_predicted_mb for g in groups]
    assert mb == sorted(mb)


def test_layered_model_groups(tmp_path):
    m = _layered_model()
    path = tmp_path / "layered.onnx"
    onnx.save(m, path)
    p = profile_model(path, {"batch": 2})
    _check_groups(p, 14)
    assert [(g.name, g.start, g.end) for g in p.groups] == [
        ("embed", 0, 1), ("blocks.0", 1, 5), ("blocks.1", 5, 8), ("blocks.2", 8, 11),
        ("head", 11, 14)]
    assert [g.param_bytes for g in p.groups] == [320, 288, 288, 288, 256]
    assert sum(g.param_bytes for g in p.groups) == _init_bytes(m) == p.total_param_bytes

    costs = analyze(m, {"batch": 2})
    assert [c.position for c in p.cuts] == [1, 5, 8, 11]
    for c in p.cuts:
        assert c.bytes == costs.cut_bytes[c.position]
        assert c.num_tensors == len(costs.crossing(c.position)) == len(c.tensors)
        assert sum(b for _, b in c.tensors) == c.bytes
    # the residual keeps `e` alive across the first block's MatMul/Add/Relu, not past it
    assert {t for t, _ in p.cuts[0].tensors} == {"e"}
    assert {t for t, _ in p.cuts[1].tensors} == {"s0"}
    assert p.groups[1].flops == pytest.approx(costs.flops[1:5].sum())


def test_no_named_initializers_is_one_group(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    c = numpy_helper.from_array(np.ones(3, np.float32), "onnx::Add_1")
    g = helper.make_graph([helper.make_node("Add", ["x", "onnx::Add_1"], ["a"]),
                           helper.make_node("Relu", ["a"], ["y"])], "g", [x], [y],
                          initializer=[c])
    p = profile_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))
    assert p.model == "g"
    assert [(g.name, g.start, g.end) for g in p.groups] == [("model", 0, 2)]
    assert p.groups[0].param_bytes == 12 and p.cuts == ()


@pytest.mark.parametrize("nbytes, cost", [
    (0, "cheap"), (100, "cheap"), (100 * CHEAP_MAX_RATIO, "cheap"),
    (100 * CHEAP_MAX_RATIO + 1, "moderate"), (100 * MODERATE_MAX_RATIO, "moderate"),
    (100 * MODERATE_MAX_RATIO + 1, "costly")])
def test_classify_cut(nbytes, cost):
    ratio, got = classify_cut(nbytes, 100.0)
    assert got == cost and ratio == pytest.approx(nbytes / 100.0)


def test_bert_tiny(bert_tiny, tmp_path):
    p = profile_model(bert_tiny, {"batch": 1, "sequence": 16})
    costs = analyze(bert_tiny, {"batch": 1, "sequence": 16})
    _check_groups(p, costs.num_nodes)
    names = [g.name for g in p.groups]
    assert names[0] == "embeddings" and names[-1] == "pooler"
    assert [n for n in names if n.startswith("encoder.layer.")] == [
        "encoder.layer.0", "encoder.layer.1"]
    model = onnx.load(str(bert_tiny), load_external_data=True)
    assert sum(g.param_bytes for g in p.groups) == _init_bytes(model)
    # every layer holds its own MatMul weights: tiny BERT layers are identical in size
    layers = [g.param_bytes for g in p.groups if g.name.startswith("encoder.layer.")]
    assert abs(layers[0] - layers[1]) <= 1024 and layers[0] > 4 * 128 * 128 * 4
    assert p.groups[-1].cum_param_bytes == p.total_param_bytes
    peak = int(costs.live_bytes.max())
    assert p.whole_model_mb == pytest.approx(stage_memory_mb(p.total_param_bytes, peak, DEFAULT_FLOOR_MB),
                                             abs=1e-3)

    # cuts: one per boundary, classified consistently with their ratio to the median
    assert [c.position for c in p.cuts] == [g.start for g in p.groups[1:]]
    assert p.median_cut_bytes == np.median(costs.cut_bytes[1:costs.num_nodes])
    for c in list(p.cuts) + list(p.cheapest_cuts):
        assert c.bytes == costs.cut_bytes[c.position]
        assert c.num_tensors == len(costs.crossing(c.position))
        assert c.cost == classify_cut(c.bytes, p.median_cut_bytes)[1]
    # a layer boundary carries the hidden state and the mask: never costly
    assert all(c.cost != "costly" for c in p.cuts)
    cheapest = [c.bytes for c in p.cheapest_cuts]
    assert cheapest == sorted(cheapest) and 0 < len(cheapest) <= 5
    assert cheapest[0] == min(costs.cut_bytes[1:costs.num_nodes])

    buf = io.StringIO()
    render_offline(p, Console(file=buf, width=160, color_system=None))
    assert "encoder.layer.1" in buf.getvalue() and "cheap" in buf.getvalue()

    path = write_offline(p, tmp_path / "offline")
    doc = json.loads(path.read_text())
    assert doc == json.loads(json.dumps(p.to_dict()))
    assert len(doc["groups"]) == len(p.groups) and doc["bindings"]["sequence"] == 16
