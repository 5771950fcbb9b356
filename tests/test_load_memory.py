"""A worker's whole life stays within the plan: its peak RSS since it started (upload, load,
first run, serving) is within 15% of the memory the planner predicted for its stage.

Two models whose load used to peak far above the plan: a CNN with wide 3x3 convolutions
(onnxruntime's NCHWc layout transform copied every conv weight several times while the
session was built: a stage with 47 MiB of conv weights peaked near twice its plan), and a
big MatMul head (held mapped and prepacked at once while it is packed), though both
stages then served at the plan.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge.coordinator.pipeline import Pipeline
from edge.build import make_plan
from edge.planning.cluster import cluster_from_profile
from edge.profiling.memory import peak_rss_bytes
from edge.transport.codec import decode_tensors
from edge.worker.launch import LocalWorkers

TOL = 1e-4
CHANNELS = 512  # a 3x3 conv of 512 -> 512 channels holds 9 MiB of fp32 weights
CONVS = 10
SIDE = 16
WITHIN = 0.15


def wide_cnn(path: Path) -> Path:
    """image [1, 3, H, W] -> conv 3 -> CHANNELS, then CONVS wide 3x3 convs with ReLU."""
    rng = np.random.default_rng(0)
    nodes, inits, x, cin = [], [], "image", 3
    for i in range(CONVS + 1):
        w = (rng.standard_normal((CHANNELS, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32)
        b = rng.standard_normal(CHANNELS, dtype=np.float32) * 0.01
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1] * 4),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        x, cin = f"r{i}", CHANNELS
    graph = helper.make_graph(
        nodes, "wide_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", CHANNELS, "h", "w"])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save_model(model, path, save_as_external_data=True, location=path.name + ".data")
    return path


def big_head(path: Path) -> Path:
    """features [batch, 1024] -> a small MatMul -> a 96 MiB MatMul, as a classifier's or a
    language model's output head: the stage holding it peaks while onnxruntime prepacks
    that one weight at load, with the mapped original and the packed copy both resident."""
    rng = np.random.default_rng(0)
    w0 = (rng.standard_normal((1024, 1024)) / 32).astype(np.float32)
    w1 = (rng.standard_normal((1024, 24576)) / 32).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["image", "w0"], ["h"]),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w1"], ["logits"])], "big_head",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1024])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 24576])],
        [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(w1, "w1")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save_model(model, path, save_as_external_data=True, location=path.name + ".data")
    return path


@pytest.mark.parametrize("build, shape, bindings, mode", [
    (wide_cnn, (1, 3, SIDE, SIDE), {"batch": 1, "h": SIDE, "w": SIDE}, "fp32"),
    (big_head, (1, 1024), {"batch": 1}, "fp32"),
    # Prepacking off: no load peak, the head held once, mapped (edge.spec, Mode.prepack).
    (big_head, (1, 1024), {"batch": 1}, "fp32-lean"),
], ids=["wide-convs", "big-matmul-head", "big-matmul-head-lean"])
def test_worker_peak_from_start_to_serving_is_within_the_plan(tmp_path, build, shape, bindings,
                                                              mode):
    model = build(tmp_path / "model.onnx")
    x = {"image": np.random.default_rng(1).random(shape, dtype=np.float32)}
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    want = session.run(None, x)[0]
    del session
    with LocalWorkers(2, tmp_path / "workers", device="rpi4b-2gb") as workers:
        cluster = cluster_from_profile("rpi4b-2gb", 2, addresses=workers.addresses)
        plan = make_plan(model, cluster.devices, tmp_path / "plan", bindings=bindings,
                         modes=(mode,))
        with Pipeline(plan, tmp_path / "plan") as pipeline:
            pipeline.start()
            with ThreadPoolExecutor(2) as pool:
                results = list(pool.map(pipeline.infer, [x] * 6))
        for r in results:
            (got,) = decode_tensors(r.outputs).values()
            np.testing.assert_allclose(got, want, atol=TOL * max(1.0, np.abs(want).max()),
                                       rtol=0)
        peaks = [peak_rss_bytes(w.process.pid) / 2**20 for w in workers.workers]
    planned = [st.predicted.memory_mb for st in plan.stages]
    weights = [st.predicted.weights_mb for st in plan.stages]
    assert max(weights) > 30, weights  # a stage holds wide convs or the big head
    for i, (peak, plan_mb) in enumerate(zip(peaks, planned)):
        assert abs(peak / plan_mb - 1) <= WITHIN, (
            f"stage {i}: peak RSS {peak:.1f} MiB since the worker started, planned "
            f"{plan_mb:.1f} MiB ({(peak / plan_mb - 1) * 100:+.0f}%); all: peaks "
            f"{[round(p, 1) for p in peaks]}, planned {[round(p, 1) for p in planned]}")
