"""How much resident memory a worker needs to hold and run one shard, per mode.

    memory = runtime floor + session_overhead_mb
             + weight_factor     * weights read whole (MatMul, Conv, LayerNorm, ...)
             + table_factor      * Gather tables (embeddings)
             + activation_factor * peak live activations
             + io_factor         * bytes received + bytes sent per request

with the factors of the stage's mode (``edge.spec.MODE_TABLE[mode].memory``), and never
less than the runtime floor (the idle worker's RSS, which its peak includes) +
``FLOOR_MARGIN_MB``. The session overhead is negative: a loaded worker unmaps library pages
of its floor that serving does not use.

All in MiB. Weights count at their size in the mode's representation (int8: a quarter for
MatMul/Conv weights and Gather tables, ``GraphCosts.init_int8_bytes``). The constants are
fitted from measurements, never guessed; re-run ``benchmarks/memory_model.py`` (one shard
per fresh process) and ``benchmarks/memory_accuracy.py`` (real workers) after changing
onnxruntime versions, session options or the shard format.

Shards keep their weights in external-data files that onnxruntime memory-maps
(``edge.shards.build``). Weights read whole are prepacked by MatMul kernels into an
anonymous copy (the mapped original pages are then dropped) or read from the mapping by
Conv, so they cost about their size once, from the load on; Gather tables are read a few rows per request, and with the worker's
``posix_fadvise(DONTNEED)`` after writing and ``MADV_RANDOM`` on the table file only the
touched pages become resident.
"""

from __future__ import annotations

import numpy as np

from edge.spec import MODE_TABLE

__all__ = [
    "MiB",
    "FLOOR_MARGIN_MB",
    "stage_memory_mb",
]

MiB = float(1 << 20)

# The constants of MODE_TABLE[mode].memory were fitted by benchmarks/memory_model.py from REAL workers: each model planned with every
# stage forced into one mode, deployed on loopback `edge worker` processes (rpi4b-2gb
# profile, floor = its runtime_floor_mb = 72 MiB, the measured idle worker on x86-64),
# 12 requests, 2 in flight, peak RSS (VmHWM) from the workers' own sampler, as
# `edge profile` reads it. x86-64, 2 cores, onnxruntime 1.32, external data mapped, one
# malloc heap, memory pattern off (edge.shards.runtime), library pages only the start and
# the load touched unmapped (edge.profiling.memory.release_file_pages), no NCHWc layout
# transform, shards uploaded in 256 KiB chunks. 93 stages: BERT-base over 1, 2, 4 and 8
# devices at sequence 128 and over 4 at 384; GPT-2-small over 2 and 4; UNet-small over 3 at
# 128 and 256 px; and, fp32 only, from benchmarks/load_memory.py (VmHWM since the worker
# started, 9 requests, each device's memory small enough to force the split): a wide UNet
# (214 MiB, up to 1152 channels) over 4 at 64 px, ResNet-50 and ConvNeXt-T over 3 at
# 224 px, ViT-B/16 over 4, DistilBERT-base, GPT-2-small and a 56 M-parameter Llama over 3
# at sequence 128 (the rows: benchmarks/data/memory_model_fit.jsonl; refit with
# `python benchmarks/memory_model.py --load benchmarks/data/memory_model_fit.jsonl --fit`).
# Least squares on relative error, per mode, the factors non-negative, the 3 stages that
# peaked within 5 MiB of the floor (GPT-2's stage 0, an embedding lookup, before its load)
# left out; a prediction never goes below the floor + FLOOR_MARGIN_MB:
#
#   mode       weight  table  act    io     session   (weights: bytes in the mode's format)
#   fp32       1.036   0.033  2.16   2.71   -14.4
#   fp32-lean  0.912   0.003  6.12   0.00   -13.2
#   int8       1.002   0.000  3.38   1.92   -15.3
#
# Measured / predicted peak (MiB) with these constants, a sample (worst -18.5%..+15.3%,
# fp32 within -7.5%..+15.3%, BERT-base within 8.1%):
#
#   bert-base / 4   fp32  154-157 / 155-157     int8  95-98 / 95-96
#   bert-base / 8   fp32  107-118 / 108-120     int8  84-87 / 84-87
#   bert-base / 4, seq 384  fp32 190-192 / 185-187   int8 128-131 / 135-139
#   bert-base / 1   int8  158 / 156 (the whole model: fits a Pi Zero 2 W's 260 MiB budget)
#   gpt2-small / 4  fp32  74, 239, 239, 354 / 74, 246, 242, 332 (-6.5%: the last stage, whose
#                   24 MiB of logits go through gRPC twice)
#   gpt2-small / 2  int8  149, 292 / 150, 238 (-18.5%; measured again: 149, 243)
#   unet-small / 3, 256 px  fp32 131, 179, 183 / 133, 196, 171   int8 142, 160, 233 / 139,
#                   179, 192 (-17.3%; measured again: 145, 172, 235)
#   unet-wide / 4, 64 px   fp32  110, 220, 151, 99 / 105, 225, 147, 95
#   resnet-50 / 3   fp32  78, 114, 117 / 90 (+15.3%: a stem at 224 px, whose activations
#                   cost less than a transformer's), 115, 119
#   vit-base / 4    fp32  163-166 / 162-165     distilbert-base / 3  fp32 126-129 / 126-129
#   llama-small / 3 fp32  85, 151, 198 / 78, 147, 200
#
# What the numbers say:
# - The session overhead is negative: the floor is the idle worker, 72 MiB of which 38 are
#   file-backed library pages, and a loaded worker unmaps those that only its imports, the
#   upload and the load touched; serving faults back 20-26 MiB of them. Against the fit
#   before that change (session +9..+12 MiB, weight and activation factors within 7% of
#   these), every stage peaks about 25 MiB lower; anonymous memory did not change.
# - A weight read whole costs its size once (factor ~1.0): onnxruntime maps the data file;
#   MatMul prepacks an anonymous copy and the mapped pages are dropped, Conv reads the
#   mapped pages. int8 weights are a quarter of the size and also cost ~1.0 per byte.
# - The load stays within the serving peak: nothing copies the weights twice (the NCHWc
#   transform did: edge.shards.runtime). What is left is the tensor being prepacked, held
#   both mapped and packed for a moment: invisible for BERT's 9 MiB matrices, but a stage
#   of one big MatMul or Gemm peaks at load by about that weight over the other weights
#   (GPT-2's 147 MiB LM head: 357 MiB; ddddocr's 32 MiB Gemm: 123 MiB against 95 from
#   the serving terms; a 96 MiB head in tests/test_load_memory.py: +61%). So the
#   prediction is the larger of the serving peak and that load peak (``prepack_bytes``). The upload peaks
#   6-12 MiB above the idle worker, which a stage predicted near the floor shows (Llama's
#   embedding-only stage 0: 85 MiB against 78).
# - Gather tables cost nothing measurable: the worker drops the pages it wrote and maps the
#   table file for random access, so only the touched rows are resident (BERT's 91 MiB word
#   embedding: stage 0 and stage 1 peak within 2 MiB of each other).
# - Activations cost ~3x their planned peak: onnxruntime's arena grows in chunks and
#   kernels keep scratch buffers; the io term is the request's inputs and outputs, held
#   decoded, encoded and in gRPC buffers for two requests in flight.
# - fp32-lean (arena off) is 6-11 MiB worse than fp32 on BERT-base: once the memory
#   pattern is off in every mode, the arena is the cheaper allocator. The planner follows
#   the fit, so it picks lean only where its smaller weight factor wins.
# - fp32-lean turns weight prepacking off too (edge.spec, Mode.prepack): its weights stay
#   in the mapped file (file-backed, not anonymous), it has no load peak, and the
#   prepack term is not added. Its constants, fitted with prepacking on, still hold:
#   BERT-base over 4 and 8 and GPT-2-small over 4 re-measured without prepacking
#   (benchmarks/data/memory_model_lean_noprepack.jsonl) came within -4.7%..+7.2% of them
#   (bert-base / 4: 163-165 / 163-165; / 8: 114-134 / 122-132; gpt2-small / 4: 78, 247,
#   244, 329 / 74, 247, 246, 346), and SmolLM2's last stage (4 layers and the 108 MiB LM
#   head, generation, context 2048) peaked at 236 MiB against 246 planned (edge demo).
# The same worker measured twice gives peaks a few percent apart; stages with large
# activations (GPT-2's logits, UNet at 256 px) up to 20%.
# The least a worker peaks above its runtime floor: the 3 fitted stages that peaked before
# their load (GPT-2's embedding-only stage 0) measured 74.0-74.2 MiB over a 72 MiB floor.
FLOOR_MARGIN_MB = 2.0

# The constants themselves are MODE_TABLE[mode].memory (edge.spec), next to the mode's other
# properties.


def stage_memory_mb(weight_bytes, activation_bytes, runtime_floor_mb, table_bytes=0.0,
                    mode: str = "fp32", io_bytes=0.0, prepack_bytes=0.0):
    """Predicted peak RSS (MiB) of a worker running one shard; works on numpy arrays too.

    Args:
        weight_bytes: bytes of the shard's unique initializers other than Gather tables,
            in the mode's representation.
        activation_bytes: peak bytes of live activations in the shard's node range.
        runtime_floor_mb: RSS of the idle worker process on the device.
        table_bytes: bytes of the shard's Gather tables, in the mode's representation.
        mode: one of ``edge.spec.MODES``.
        io_bytes: bytes the stage receives plus sends per request (its cuts).
        prepack_bytes: the largest weight a MatMul or Gemm of the shard prepacks, in the
            mode's representation. While it is packed at load, both its mapped pages and
            its packed copy are resident: the load peaks that much above the weights.
            Ignored in a mode that does not prepack (``Mode.prepack``).
    """
    c = MODE_TABLE[mode].memory
    weights = (runtime_floor_mb + c.session_overhead_mb + c.weight_factor * weight_bytes / MiB
               + c.table_factor * table_bytes / MiB)
    # The load's peak against serving's: a stage of one big MatMul (GPT-2's 147 MiB head,
    # ddddocr's 32 MiB Gemm) peaks while that weight is prepacked, 8-28% above the
    # serving prediction (benchmarks/load_memory.py, benchmarks/real_models.py).
    load = weights + (prepack_bytes / MiB if MODE_TABLE[mode].prepack else 0.0)
    # Never below the floor and a little: the worker's peak RSS includes its idle start and
    # the upload. (The session overhead is negative: a loaded worker unmaps library pages
    # of its floor.)
    serving = (weights + c.activation_factor * activation_bytes / MiB
               + c.io_factor * io_bytes / MiB)
    return np.maximum(runtime_floor_mb + FLOOR_MARGIN_MB, np.maximum(serving, load))
