"""Measuring a device: how fast onnxruntime computes on it, for its device profile."""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort

from edge.shards.runtime import session_options

__all__ = ["measure_gflops"]


def _mlp_model(tokens: int, hidden: int, inner: int) -> bytes:
    """A BERT-like feed-forward block (two MatMuls and a GELU-ish Relu), as ONNX bytes."""
    # onnx only while calibrating: the worker imports this module and must not load it.
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((hidden, inner)) * 0.02).astype(np.float32)
    w2 = (rng.standard_normal((inner, hidden)) * 0.02).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])],
        "calibrate",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [tokens, hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [tokens, hidden])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def measure_gflops(seconds: float = 3.0, threads: int | None = None, tokens: int = 128,
                   hidden: int = 768, inner: int = 3072) -> tuple[float, int]:
    """Effective fp32 GFLOP/s of onnxruntime on a BERT-base-sized MLP block.

    Matrix multiplies are where BERT, GPT-2 and CNNs spend their time, so this is the
    number the planner divides FLOPs by.

    Args:
        seconds: how long to keep running after one warm-up run.
        threads: onnxruntime intra-op threads (None: all cores), as the worker uses.

    Returns:
        (GFLOP/s, number of timed runs).
    """
    session = ort.InferenceSession(_mlp_model(tokens, hidden, inner),
                                   sess_options=session_options(threads),
                                   providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((tokens, hidden)).astype(np.float32)
    session.run(None, {"x": x})
    flops = 2 * 2 * tokens * hidden * inner
    runs, start = 0, time.perf_counter()
    while True:
        session.run(None, {"x": x})
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and runs >= 3:
            return flops * runs / elapsed / 1e9, runs
