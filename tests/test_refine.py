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
from edge.planning.refine import heavy_matmuls, split_matmuls


def chain(path: Path, shared: bool = False) -> Path:
    """x [32, 512] -> three 512x512 MatMuls with Relus: over two boards, whole MatMuls
    split 2:1 at best. ``shared``: the last two MatMuls read the same weight."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((512, 512)).astype(np.float32)
                                       / 23, f"w{i}") for i in range(3)]
    nodes, x = [], "x"
    for i in range(3):
        w = "w1" if shared and i == 2 else f"w{i}"
        nodes += [helper.make_node("MatMul", [x, w], [f"m{i}"], name=f"mm{i}"),
                  helper.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}")]
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
    the split MatMul, and the shards compute what the model does."""
    model = chain(tmp_path / "c.onnx")
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
    feeds = {"x": x}
    for path in (tmp_path / "plan" / s.shard for s in plan.stages):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out = sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})
        feeds.update(zip((o.name for o in sess.get_outputs()), out))
    np.testing.assert_allclose(feeds["r2"], run(model, x), rtol=0, atol=1e-5)
    saved = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert saved["bottleneck_ms"] == plan.bottleneck_ms
