"""How much resident memory a worker needs to hold and run one shard.

    memory = runtime floor + WEIGHT_FACTOR * weights + ACTIVATION_FACTOR * peak live
             activations + SESSION_OVERHEAD_MB

All in MiB. The constants are fitted from measurements (``benchmarks/memory_model.py``),
never guessed; re-run that script after changing onnxruntime versions or session options.
"""

from __future__ import annotations

__all__ = [
    "WEIGHT_FACTOR",
    "ACTIVATION_FACTOR",
    "SESSION_OVERHEAD_MB",
    "MiB",
    "stage_memory_mb",
]

MiB = float(1 << 20)

# Peak RSS per byte of embedded weights. onnxruntime parses the whole protobuf (one copy of
# the weights), copies each initializer into its own buffer (a second copy), then frees the
# protobuf; prepacked MatMul weights add a third, transient one for the packed layout.
WEIGHT_FACTOR = 2.0

# Peak RSS per byte of the stage's peak live activations (``live_bytes`` in graph.py).
ACTIVATION_FACTOR = 1.0

# Fixed cost of an inference session on top of the process floor (arena, kernels, graph).
SESSION_OVERHEAD_MB = 0.0


def stage_memory_mb(weight_bytes, activation_bytes, runtime_floor_mb):
    """Predicted peak RSS (MiB) of a worker running one shard; works on numpy arrays too.

    Args:
        weight_bytes: bytes of the shard's unique initializers.
        activation_bytes: peak bytes of live activations in the shard's node range.
        runtime_floor_mb: RSS of the idle worker process on the device.
    """
    return (runtime_floor_mb + SESSION_OVERHEAD_MB + WEIGHT_FACTOR * weight_bytes / MiB
            + ACTIVATION_FACTOR * activation_bytes / MiB)
