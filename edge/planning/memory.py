"""How much resident memory a worker needs to hold and run one shard, per mode.

    memory = runtime floor + SESSION_OVERHEAD_MB[mode]
             + WEIGHT_FACTOR[mode]     * weights read whole (MatMul, Conv, LayerNorm, ...)
             + TABLE_FACTOR[mode]      * Gather tables (embeddings)
             + ACTIVATION_FACTOR[mode] * peak live activations

All in MiB. Weights count at their size in the mode's representation (int8: a quarter for
MatMul/Conv weights and Gather tables, ``GraphCosts.init_int8_bytes``). The constants are
fitted from measurements, never guessed; re-run ``benchmarks/memory_model.py`` (one shard
per fresh process) and ``benchmarks/memory_accuracy.py`` (real workers) after changing
onnxruntime versions, session options or the shard format.

Shards keep their weights in external-data files that onnxruntime memory-maps
(``edge.shards.build``). Weights read whole are prepacked by MatMul/Conv kernels into an
anonymous copy (the mapped original pages are then dropped), so they cost about their
size once; Gather tables are read a few rows per request, and with the worker's
``posix_fadvise(DONTNEED)`` after writing and ``MADV_RANDOM`` on the table file only the
touched pages become resident.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "MiB",
    "ModeConstants",
    "CONSTANTS",
    "WEIGHT_FACTOR",
    "TABLE_FACTOR",
    "ACTIVATION_FACTOR",
    "SESSION_OVERHEAD_MB",
    "stage_memory_mb",
]

MiB = float(1 << 20)


@dataclass(frozen=True)
class ModeConstants:
    """Fitted constants of one mode (see the module docstring)."""

    weight_factor: float
    table_factor: float
    activation_factor: float
    session_overhead_mb: float
    io_factor: float = 0.0


# Fitted by benchmarks/memory_model.py from REAL workers: each model planned with every
# stage forced into one mode, deployed on loopback `edge worker` processes (rpi4b-2gb
# profile, floor = its runtime_floor_mb = 72 MiB, the measured idle worker on x86-64),
# 12 requests, 2 in flight, peak RSS from the workers' own sampler (edge profile). x86-64,
# 2 cores, onnxruntime 1.32, external data with the worker's fadvise/MADV_RANDOM, seq 128,
# UNet at 128x128. Non-negative least squares on relative error, per mode:
#
#   mode       weight  table   act    session   (weights: bytes in the mode's format)
#   fp32       0.786   0.027  10.02    13.2
#   fp32-lean  0.751   0.165  10.40    19.5
#   int8       0.214   0.000   9.91    18.8
#
#   model / stages      mode  stage: whole+table weights, act (MiB) -> measured / predicted
#   bert-base / 4       fp32  0: 81+91, 4.9 -> 190 / 201 (+6%); 1-3: 81-83, 4.9 -> 193-196 / 198-200 (+2..+3%)
#                       lean  0: 218 / 219 (+1%); 1-3: 208-213 / 204-205 (-5..-1%)
#                       int8  0: 20+23 -> 143 / 144 (+1%); 1-3: 20-21 -> 142-145 / 144 (-1..+2%)
#   gpt2-small / 4      fp32  0: (no weights) 84 / 85 (+1%); 1: 162+150, 6.4 -> 298 / 281 (-6%);
#                             2: 162 -> 300 / 277 (-8%); 3: 147 (head), 24.9 -> 428 / 451 (+5%)
#                       lean  0: 84 / 92 (+9%); 1: 306 / 305 (0%); 2: 285 / 280 (-2%); 3: 408 / 461 (+13%)
#                       int8  0: 84 / 91 (+8%); 1: 34+38 -> 158 / 162 (+3%); 2: 48 -> 177 / 165 (-7%);
#                             3: 37 -> 319 / 346 (+9%)
#   unet-small / 3      fp32  0-2: 0.5-5, 4-8 -> 122 / 126 (+3%), 168 / 149 (-11%), 168 / 166 (-2%)
#                       lean  135 / 134 (-1%), 173 / 158 (-9%), 184 / 175 (-5%)
#                       int8  140 / 131 (-7%), 166 / 150 (-9%), 174 / 170 (-2%)
#
# Every stage within -11%..+13%. What the numbers say:
# - Weights are mapped, MatMul/Conv prepack an anonymous copy and the mapped pages are
#   dropped: ~0.75-0.8 per byte (below 1 because the fit shares the load-time peak with the
#   activation term; at load alone a BERT-base stage is floor + 81 MiB weights + ~12 MiB).
# - Gather tables cost next to nothing once the worker drops the written pages and maps the
#   table file for random access (91 MiB of BERT's word embedding: < 3 MiB).
# - A real worker holds ~10x the planner's peak live activations: the decoded request, the
#   outputs, their encoded copies and gRPC buffers, two requests in flight, and malloc
#   arenas per thread (the worker keeps freed memory: MALLOC_TRIM_THRESHOLD_). In-process,
#   one shard alone, the factor was 2-4.
# - fp32-lean (arena and memory patterns off) is 6-28 MiB WORSE than fp32 in a real worker,
#   although it saved 6-8 MiB in one shard run alone (benchmarks/shard_memory_modes.py):
#   without the arena every activation goes through malloc's per-thread arenas. The planner
#   follows the fit, so it picks lean only where its smaller weight factor wins.
# - int8: weights at a quarter and 0.2 per byte; +5.6 MiB of fixed cost over fp32
#   (quantization buffers, no arena), so int8 only pays off for stages with > ~10 MiB of
#   weights.
# The same worker measured twice gave peaks 8-10% apart (BERT-base fp32 stage 1: 220 then
# 193 MiB): errors of this size are measurement noise.
CONSTANTS: dict[str, ModeConstants] = {
    "fp32": ModeConstants(weight_factor=0.786, table_factor=0.027, activation_factor=10.02,
                          session_overhead_mb=13.2),
    "fp32-lean": ModeConstants(weight_factor=0.751, table_factor=0.165,
                               activation_factor=10.40, session_overhead_mb=19.5),
    "int8": ModeConstants(weight_factor=0.214, table_factor=0.0, activation_factor=9.91,
                          session_overhead_mb=18.8),
}

# The fp32 constants under their historical names (edge.profiling.offline uses
# stage_memory_mb's fp32 default).
WEIGHT_FACTOR = CONSTANTS["fp32"].weight_factor
TABLE_FACTOR = CONSTANTS["fp32"].table_factor
ACTIVATION_FACTOR = CONSTANTS["fp32"].activation_factor
SESSION_OVERHEAD_MB = CONSTANTS["fp32"].session_overhead_mb


def stage_memory_mb(weight_bytes, activation_bytes, runtime_floor_mb, table_bytes=0.0,
                    mode: str = "fp32", io_bytes=0.0):
    """Predicted peak RSS (MiB) of a worker running one shard; works on numpy arrays too.

    Args:
        weight_bytes: bytes of the shard's unique initializers other than Gather tables,
            in the mode's representation.
        activation_bytes: peak bytes of live activations in the shard's node range.
        runtime_floor_mb: RSS of the idle worker process on the device.
        table_bytes: bytes of the shard's Gather tables, in the mode's representation.
        mode: one of ``edge.planning.plan.MODES``.
        io_bytes: bytes the stage receives plus sends per request (its cuts).
    """
    c = CONSTANTS[mode]
    return (runtime_floor_mb + c.session_overhead_mb + c.weight_factor * weight_bytes / MiB
            + c.table_factor * table_bytes / MiB
            + c.activation_factor * activation_bytes / MiB + c.io_factor * io_bytes / MiB)
