"""Finer cuts: MatMuls split in parts so that the planner can balance stages
(``edge.planning.refine``, used by ``edge.build.make_plan``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edge.build import make_plan
from edge.planning.cluster import cluster_from_profile
from edge.planning.graph import analyze
from edge.planning.planner import partition
from edge.planning.refine import (feed_forwards, heavy_feed_forwards, heavy_matmuls,
                                  split_feed_forwards, split_matmuls)


def chain(path: Path, shared: bool = False, act: str = "Relu") -> Path:
    """x [32, 512] -> three 512x512 MatMuls, each followed by ``act``: over two boards,
    whole MatMuls split 2:1 at best. ``shared``: the last two MatMuls read the same weight.
    (With an elementwise ``act``, a MatMul, its Relu and the next MatMul are a feed-forward
    block; a Softmax mixes columns, so the chain has none.)"""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((512, 512)).astype(np.float32)
                                       / 23, f"w{i}") for i in range(3)]
    nodes, x = [], "x"
    for i in range(3):
        w = "w1" if shared and i == 2 else f"w{i}"
        nodes += [helper.make_node("MatMul", [x, w], [f"m{i}"], name=f"mm{i}"),
                  helper.make_node(act, [f"m{i}"], [f"r{i}"], name=f"act{i}")]
        x = f"r{i}"
    g = helper.make_graph(nodes, "chain",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [32, 512])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [32, 512])],
                          weights[:2] if shared else weights)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def run(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


def run_shards(folder: Path, plan, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every tensor the plan's shards compute from ``x``, each shard in turn."""
    feeds = {"x": x}
    for path in (folder / s.shard for s in plan.stages):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out = sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})
        feeds.update(zip((o.name for o in sess.get_outputs()), out))
    return feeds


def test_split_matmuls_computes_the_same_and_leaves_shared_weights(tmp_path):
    x = np.random.default_rng(1).standard_normal((32, 512)).astype(np.float32)
    m = onnx.load(chain(tmp_path / "c.onnx"))
    finer, count = split_matmuls(m, {"m0": 3, "m2": 2})
    assert count == 2
    ops = [n.op_type for n in finer.graph.node]
    assert ops.count("MatMul") == 3 + 2 + 1 and ops.count("Concat") == 2
    assert {t.name for t in finer.graph.initializer} == {
        "w0/part0", "w0/part1", "w0/part2", "w1", "w2/part0", "w2/part1"}
    np.testing.assert_allclose(run(finer, x), run(m, x), rtol=0, atol=1e-5)

    shared = onnx.load(chain(tmp_path / "s.onnx", shared=True))
    same, count = split_matmuls(shared, {"m1": 2, "m2": 2})
    assert count == 0 and len(same.graph.node) == len(shared.graph.node)


def test_heavy_matmuls_asks_for_parts_of_at_most_a_share_of_the_slowest_stage():
    parts = heavy_matmuls(["MatMul", "Relu", "MatMul", "MatMul"], [["a"], ["b"], ["c"], ["d"]],
                          [100.0, 500.0, 12.0, 1000.0], stage_flops=200.0)
    assert parts == {"a": 4, "c": 2, "d": 4}  # 10 a part at most; no more than 4 parts


def test_plan_splits_a_matmul_when_whole_ones_cannot_be_balanced(tmp_path):
    """Three equal MatMuls over two equal boards: whole, the best split is 2:1; with the
    middle one in parts, 1.5:1.5. The plan is faster by the model, the cut falls inside
    the split MatMul, and the shards compute what the model does. (Softmax between them:
    no feed-forward block to split whole instead.)"""
    model = chain(tmp_path / "c.onnx", act="Softmax")
    devices = cluster_from_profile("rpi4b-2gb", 2,
                                   addresses=["127.0.0.1:1", "127.0.0.1:2"]).devices
    whole = partition(analyze(model), devices)
    assert make_plan(model, devices, tmp_path / "plain").bottleneck_ms == pytest.approx(
        whole.bottleneck_ms)  # only when asked for
    plan = make_plan(model, devices, tmp_path / "plan", finer_cuts=True)
    assert plan.bottleneck_ms < 0.9 * whole.bottleneck_ms
    shards = [onnx.load(tmp_path / "plan" / s.shard) for s in plan.stages]
    assert any("/part" in n.name for n in shards[0].graph.node)
    assert any("/part" in n.name for n in shards[1].graph.node)  # the cut is inside

    x = np.random.default_rng(2).standard_normal((32, 512)).astype(np.float32)
    feeds = run_shards(tmp_path / "plan", plan, x)
    np.testing.assert_allclose(feeds["r2"], run(model, x), rtol=0, atol=1e-5)
    saved = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert saved["bottleneck_ms"] == plan.bottleneck_ms


def feed_forward_chain(path: Path, blocks: int = 3, d: int = 64, f: int = 256,
                       shared: bool = False, leak: bool = False) -> Path:
    """x [16, d] -> ``blocks`` residual feed-forward blocks as BERT's exporter writes
    them (MatMul, bias Add, GELU as Div/Erf/Add/Mul/Mul, MatMul, bias Add, residual Add).
    ``shared``: the last block's W2 is the first block's. ``leak``: the first block's
    hidden layer is also an output of the model."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in
             (("sqrt2", 2 ** 0.5), ("one", 1.0), ("half", 0.5))]
    nodes, x = [], "x"
    for i in range(blocks):
        w2 = "w2_0" if shared and i == blocks - 1 else f"w2_{i}"
        inits += [numpy_helper.from_array(rng.standard_normal((d, f)).astype(np.float32)
                                          / d ** 0.5, f"w1_{i}"),
                  numpy_helper.from_array(rng.standard_normal(f).astype(np.float32), f"b1_{i}"),
                  numpy_helper.from_array(rng.standard_normal(d).astype(np.float32), f"b2_{i}")]
        if w2 == f"w2_{i}":
            inits.append(numpy_helper.from_array(
                rng.standard_normal((f, d)).astype(np.float32) / f ** 0.5, w2))
        nodes += [helper.make_node("MatMul", [x, f"w1_{i}"], [f"h{i}"]),
                  helper.make_node("Add", [f"h{i}", f"b1_{i}"], [f"hb{i}"]),
                  helper.make_node("Div", [f"hb{i}", "sqrt2"], [f"hd{i}"]),
                  helper.make_node("Erf", [f"hd{i}"], [f"he{i}"]),
                  helper.make_node("Add", [f"he{i}", "one"], [f"hp{i}"]),
                  helper.make_node("Mul", ["half", f"hp{i}"], [f"hh{i}"]),
                  helper.make_node("Mul", [f"hb{i}", f"hh{i}"], [f"g{i}"]),
                  helper.make_node("MatMul", [f"g{i}", w2], [f"y{i}"]),
                  helper.make_node("Add", [f"y{i}", f"b2_{i}"], [f"yb{i}"]),
                  helper.make_node("Add", [f"yb{i}", x], [f"r{i}"])]
        x = f"r{i}"
    outputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [16, d])]
    if leak:
        outputs.append(helper.make_tensor_value_info("g0", TensorProto.FLOAT, [16, f]))
    g = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [16, d])], outputs, inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_split_feed_forwards_computes_the_same_with_partial_sums(tmp_path):
    m = onnx.load(feed_forward_chain(tmp_path / "f.onnx"))
    blocks = feed_forwards(m.graph)
    assert [(m.graph.node[b.first].output[0], m.graph.node[b.last].output[0])
            for b in blocks] == [("h0", "y0"), ("h1", "y1"), ("h2", "y2")]
    assert [m.graph.node[j].op_type for j in blocks[0].body] == [
        "Add", "Div", "Erf", "Add", "Mul", "Mul"]
    finer, count = split_feed_forwards(m, {"h1": 4})
    assert count == 1
    ops = [n.op_type for n in finer.graph.node]
    assert ops.count("MatMul") == 2 * 2 + 2 * 4 and ops.count("Erf") == 2 + 4
    names = {t.name for t in finer.graph.initializer}
    assert {"w1_1", "w2_1", "b1_1"}.isdisjoint(names)  # only their parts are left
    assert {"w1_1/ffn3", "w2_1/ffn3", "b1_1/y1/ffn3", "b2_1", "sqrt2"} <= names
    # Each part adds to the sum so far; the last sum keeps the block's output name.
    sums = [n for n in finer.graph.node if n.name.startswith("y1/sum")]
    assert [list(n.output) for n in sums] == [["y1/sum1"], ["y1/sum2"], ["y1"]]
    x = np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32)
    np.testing.assert_allclose(run(finer, x), run(m, x), rtol=0, atol=1e-4)


def test_blocks_that_do_not_split_by_columns_are_left_whole(tmp_path):
    shared = onnx.load(feed_forward_chain(tmp_path / "s.onnx", shared=True))
    assert [shared.graph.node[b.first].output[0] for b in feed_forwards(shared.graph)] == ["h1"]
    leak = onnx.load(feed_forward_chain(tmp_path / "l.onnx", leak=True))
    assert [leak.graph.node[b.first].output[0] for b in feed_forwards(leak.graph)] == [
        "h1", "h2"]
    same, count = split_feed_forwards(leak, {"h0": 4})
    assert count == 0 and len(same.graph.node) == len(leak.graph.node)
    # A hidden layer also read by an op that mixes its columns (a Softmax) is no block.
    soft = onnx.load(feed_forward_chain(tmp_path / "x.onnx", blocks=1))
    soft.graph.node.append(helper.make_node("Softmax", ["hd0"], ["p0"]))
    soft.graph.output.append(helper.make_tensor_value_info("p0", TensorProto.FLOAT, [16, 256]))
    assert feed_forwards(soft.graph) == []


def test_plan_cuts_inside_a_feed_forward_block_when_whole_blocks_cannot_balance(tmp_path):
    """Three equal blocks over two equal boards: whole, 2:1 at best; with the middle block
    in parts, the cut falls inside it and carries the sum so far beside x."""
    model = feed_forward_chain(tmp_path / "f.onnx", d=256, f=1024)
    devices = cluster_from_profile("rpi4b-2gb", 2,
                                   addresses=["127.0.0.1:1", "127.0.0.1:2"]).devices
    whole = partition(analyze(model), devices)
    plan = make_plan(model, devices, tmp_path / "plan", finer_cuts=True)
    assert plan.bottleneck_ms < 0.9 * whole.bottleneck_ms
    shards = [onnx.load(tmp_path / "plan" / s.shard) for s in plan.stages]
    assert any("/ffn" in n.name for n in shards[0].graph.node)
    assert any("/ffn" in n.name for n in shards[1].graph.node)
    cut = {i.name for i in shards[1].graph.input}
    assert "r0" in cut and any(name.startswith("y1/") for name in cut), cut
    x = np.random.default_rng(2).standard_normal((16, 256)).astype(np.float32)
    feeds = run_shards(tmp_path / "plan", plan, x)
    np.testing.assert_allclose(feeds["r2"], run(model, x), rtol=0, atol=1e-4)


def test_heavy_feed_forwards_asks_for_parts_of_at_most_a_share_of_the_slowest_stage(tmp_path):
    m = onnx.load(feed_forward_chain(tmp_path / "f.onnx", blocks=2))
    g = m.graph
    flops = {n.output[0]: 0.0 for n in g.node}
    flops.update(h0=10.0, y0=10.0, hb0=0.5, h1=3.0, y1=3.0)  # block 0: 20.5, block 1: 6
    assert heavy_feed_forwards(g, flops, stage_flops=100.0) == {"h0": 4, "h1": 2}
    assert heavy_feed_forwards(g, flops, stage_flops=1000.0) == {}  # parts of 50 at most
