"""onnxruntime settings shared by everything that runs a shard (worker, planner checks,
benchmarks), so measured memory and time match what workers do."""

from __future__ import annotations

import onnxruntime as ort

__all__ = ["session_options"]


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Session options for running a shard.

    Args:
        threads: intra-op threads; None or 0 lets onnxruntime use every core.
    """
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or 0
    so.inter_op_num_threads = 1
    # Idle thread pools spin and steal the cores from the other sessions on a small board
    # (or from the other workers on one machine): a 2x slowdown measured with spinning on.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return so
