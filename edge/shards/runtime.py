"""onnxruntime session settings shared by the planner's measurements and the worker.

Imports onnxruntime only (no onnx, no torch), so a worker on a Pi can use it.
"""

from __future__ import annotations

import onnxruntime as ort

from edge.spec import MODE_TABLE

__all__ = ["session_options", "DISABLED_OPTIMIZERS"]

# onnxruntime graph transformers no shard runs with (see session_options).
DISABLED_OPTIMIZERS = ("NchwcTransformer",)


# Which modes' sessions turn off onnxruntime's CPU arena and weight prepacking is
# MODE_TABLE[mode].arena and .prepack (edge.spec, with why). Prepacking off keeps every
# weight in the mapped data file: no packed copy, and no moment at load where a big
# MatMul weight is resident twice.


def session_options(threads: int | None = None, mode: str = "fp32") -> ort.SessionOptions:
    """SessionOptions every shard is run with.

    Args:
        threads: intra-op threads; None lets onnxruntime use one per core.
        mode: the stage's mode (``edge.spec.MODES``).
    """
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or 0
    so.inter_op_num_threads = 1
    # Idle intra-op threads spin by default and steal the cores from other sessions and
    # from the gRPC threads on a 4-core board (measured 2x slowdown with two sessions).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # No NCHWc layout transform. It rewrites every Conv weight into a blocked copy while the
    # session is built, and for a moment holds the mapped original, an unpacked copy, the
    # blocked copy and its serialised form, on the heap: a shard of one 45 MiB conv weight
    # peaked 199 MiB above the process's start while loading, and a wide-UNet stage (129 MiB of conv weights) peaked at
    # 359 MiB against 217 MiB planned, though it then served at the plan. Without it the
    # weights stay mapped from the shard's data file and nothing is copied (that stage:
    # 220 MiB). It costs speed on convolutions (x86-64, 2 threads, three runs on a shared
    # machine): ResNet-50 +11-19%, ConvNeXt-T +27-35% (its 7x7 depthwise convs), the wide
    # UNet +4-18%; ViT, DistilBERT, GPT-2 and Llama within noise (+1-3%).
    # (benchmarks/load_memory.py --speed.)
    so.add_session_config_entry("optimization.disable_specified_optimizers",
                                ",".join(DISABLED_OPTIMIZERS))
    # The memory pattern is off in every mode: from the second run on, onnxruntime
    # allocates one block for the whole planned pattern while the arena still holds the
    # chunks of the first run, so a BERT-base stage's activations were resident twice
    # (+9 MiB fp32, +9 MiB int8 peak RSS; no slower: benchmarks/worker_overhead.py).
    so.enable_mem_pattern = False
    if not MODE_TABLE[mode].arena:
        so.enable_cpu_mem_arena = False
    if not MODE_TABLE[mode].prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    return so
