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

# Fitted from benchmarks/memory_model.py (onnxruntime 1.32, x86-64, 2 intra-op threads,
# weights embedded in the shard, glibc malloc tuned as the worker does, peak = VmHWM after
# load + 2 runs, floor = RSS after importing numpy + onnxruntime = 47.5 MiB):
#
#   model / bindings       stage  weights  act   peak-floor  predicted   (MiB)
#   bert-base / 4, seq 128   0     172.0    4.9    274.1       294.8
#                            1-3   81-83    4.9    158.6-163.2 153.9-157.5
#   bert-base / 4, seq 512   0     172.0   28.0    323.1       375.6
#                            1-3   81-83   28.0    229.0-250.7 234.7-238.3
#   unet-small / 3, 128px    0-2   0.5-5    4-8    27.6-43.0   26.7-40.1
#   unet-small / 3, 256px    0-2   0.5-5   16-32   64.1-128.2  68.7-123.8
#
# Every predicted peak (floor included) is within -4%..+14% of the measured one.
#
# Peak RSS per byte of embedded weights. onnxruntime parses the protobuf and copies each
# initializer out of it, and prepacks MatMul/Conv weights into a second layout; BERT's
# MatMul-heavy shards peak at ~1.6x their weights, the embedding-heavy first shard (Gather
# weights are not prepacked) at ~1.4x. One factor keeps the model simple; the error is
# in the safe direction for embedding tables. The load-time RSS of the same shard varies
# from run to run by up to ~45 MiB on BERT-base (bimodal; glibc returning the protobuf
# buffer or not), which this fit sits near the top of.
WEIGHT_FACTOR = 1.55

# Peak RSS per byte of the stage's peak live activations (``live_bytes`` in graph.py: every
# tensor crossing the cut before a node plus its outputs). onnxruntime's arena grows in
# power-of-two chunks and conv/attention kernels use scratch buffers: measured 2.1-3.8x.
ACTIVATION_FACTOR = 3.5

# Fixed cost of one inference session on top of the process floor (kernel registry, graph,
# thread pool, first arena chunk): measured 11-13 MiB with near-empty UNet shards.
SESSION_OVERHEAD_MB = 11.0


def stage_memory_mb(weight_bytes, activation_bytes, runtime_floor_mb):
    """Predicted peak RSS (MiB) of a worker running one shard; works on numpy arrays too.

    Args:
        weight_bytes: bytes of the shard's unique initializers.
        activation_bytes: peak bytes of live activations in the shard's node range.
        runtime_floor_mb: RSS of the idle worker process on the device.
    """
    return (runtime_floor_mb + SESSION_OVERHEAD_MB + WEIGHT_FACTOR * weight_bytes / MiB
            + ACTIVATION_FACTOR * activation_bytes / MiB)
