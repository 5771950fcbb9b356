"""onnxruntime session settings shared by the planner's measurements and the worker.

Imports onnxruntime only (no onnx, no torch), so a worker on a Pi can use it.
"""

from __future__ import annotations

import onnxruntime as ort

__all__ = ["session_options"]


# Modes whose sessions turn off onnxruntime's arena and memory-pattern planning: measured
# 6-8 MiB less resident per BERT-base stage (benchmarks/shard_memory_modes.py). Prepacking
# stays on in every mode: with weights mapped from files, turning it off only moved memory
# from anonymous to file-backed, at +17-19% latency.
LEAN_MODES = frozenset({"fp32-lean", "int8"})


def session_options(threads: int | None = None, mode: str = "fp32") -> ort.SessionOptions:
    """SessionOptions every shard is run with.

    Args:
        threads: intra-op threads; None lets onnxruntime use one per core.
        mode: the stage's mode (``edge.planning.plan.MODES``).
    """
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or 0
    so.inter_op_num_threads = 1
    # Idle intra-op threads spin by default and steal the cores from other sessions and
    # from the gRPC threads on a 4-core board (measured 2x slowdown with two sessions).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if mode in LEAN_MODES:
        so.enable_cpu_mem_arena = False
        so.enable_mem_pattern = False
    return so
