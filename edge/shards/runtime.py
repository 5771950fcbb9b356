"""onnxruntime session settings shared by the planner's measurements and the worker.

Imports onnxruntime only (no onnx, no torch), so a worker on a Pi can use it.
"""

from __future__ import annotations

import onnxruntime as ort

__all__ = ["session_options"]


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """SessionOptions every shard is run with.

    Args:
        threads: intra-op threads; None lets onnxruntime use one per core.
    """
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or 0
    so.inter_op_num_threads = 1
    # Idle intra-op threads spin by default and steal the cores from other sessions and
    # from the gRPC threads on a 4-core board (measured 2x slowdown with two sessions).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return so
