"""How much resident memory a worker needs to hold and run one shard, per mode.

    memory = runtime floor + session_overhead_mb
             + weight_factor     * weights read whole (MatMul, Conv, LayerNorm, ...)
             + table_factor      * Gather tables (embeddings)
             + activation_factor * peak live activations
             + io_factor         * bytes received + bytes sent per request

with the factors of the stage's mode (``CONSTANTS[mode]``).

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
# 12 requests, 2 in flight, peak RSS (VmHWM) from the workers' own sampler, as
# `edge profile` reads it. x86-64, 2 cores, onnxruntime 1.32, external data mapped, one
# malloc heap, memory pattern off (edge.shards.runtime). 70 stages: BERT-base over 1, 2, 4
# and 8 devices at sequence 128 and over 4 at 384; GPT-2-small over 2 and 4; UNet-small over
# 3 at 128 and 256 px (the rows: benchmarks/data/memory_model_fit.jsonl; refit with
# `python benchmarks/memory_model.py --load benchmarks/data/memory_model_fit.jsonl --fit`).
# Non-negative least squares on relative error, per mode:
#
#   mode       weight  table  act    io     session   (weights: bytes in the mode's format)
#   fp32       1.013   0.000  2.79   2.14   10.5
#   fp32-lean  0.907   0.000  5.72   0.64   11.6
#   int8       1.023   0.000  3.26   2.32    9.3
#
# Measured / predicted peak (MiB) with these constants, a sample (all 70 in
# BENCHMARKS.md; worst -11.5%..+12.0%, BERT-base within 4.3%):
#
#   bert-base / 4   fp32  179-182 / 180-183     int8  121-122 / 119-121
#   bert-base / 8   fp32  134-145 / 134-146     int8  107-111 / 108-111
#   bert-base / 4, seq 384  fp32 215-217 / 214-219   int8 155-157 / 159-163
#   bert-base / 1   int8  186 / 182 (the whole model: fits a Pi Zero 2 W's 260 MiB budget)
#   gpt2-small / 4  fp32  84, 262, 264, 397 / 83, 266, 267, 355 (-10.7%: the last stage, whose
#                   24 MiB of logits go through gRPC twice)
#   unet-small / 3, 256 px  fp32 151, 215, 211 / 160, 219, 207   int8 179, 208, 252 / 170, 232, 223
#
# What the numbers say:
# - A weight read whole costs its size once (factor ~1.0): onnxruntime maps the data file,
#   MatMul/Conv prepack an anonymous copy, and the mapped pages are dropped. int8 weights
#   are a quarter of the size and also cost ~1.0 per byte.
# - Gather tables cost nothing measurable: the worker drops the pages it wrote and maps the
#   table file for random access, so only the touched rows are resident (BERT's 91 MiB word
#   embedding: stage 0 and stage 1 peak within 1 MiB of each other).
# - Activations cost ~3x their planned peak: onnxruntime's arena grows in chunks and
#   kernels keep scratch buffers; the io term is the request's inputs and outputs, held
#   decoded, encoded and in gRPC buffers for two requests in flight.
# - fp32-lean (arena off) is now 5-7 MiB worse than fp32 on BERT-base: once the memory
#   pattern is off in every mode, the arena is the cheaper allocator. The planner follows
#   the fit, so it picks lean only where its smaller weight factor wins.
# The same worker measured twice gives peaks a few percent apart.
CONSTANTS: dict[str, ModeConstants] = {
    "fp32": ModeConstants(weight_factor=1.013, table_factor=0.0, activation_factor=2.790,
                          session_overhead_mb=10.5, io_factor=2.138),
    "fp32-lean": ModeConstants(weight_factor=0.907, table_factor=0.0, activation_factor=5.715,
                               session_overhead_mb=11.6, io_factor=0.642),
    "int8": ModeConstants(weight_factor=1.023, table_factor=0.0, activation_factor=3.256,
                          session_overhead_mb=9.3, io_factor=2.317),
}

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
