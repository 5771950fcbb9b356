"""Tensor specs, dims and the table of modes: what both halves of edge agree on.

The standard library only: the worker, the transport and the planner all import it, and
a worker on a Pi must not pull in onnx or numpy's planning code to read a stage's specs.
``edge.planning.plan`` re-exports these names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

__all__ = [
    "Dim",
    "TensorSpec",
    "MemoryConstants",
    "Mode",
    "MODE_TABLE",
    "MODES",
    "mode_info",
    "quantized_modes",
    "KV_DTYPES",
]

# A dimension is a fixed size (int), a named symbolic size shared across tensors ("batch"),
# or None when nothing is known about it.
Dim = Union[int, str, None]


@dataclass(frozen=True)
class TensorSpec:
    """Name, numpy dtype name and shape of a tensor that crosses a boundary."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def describe(self) -> str:
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name} {self.dtype}[{dims}]"

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "TensorSpec":
        return TensorSpec(name=d["name"], dtype=d["dtype"], shape=tuple(d["shape"]))


@dataclass(frozen=True)
class MemoryConstants:
    """Fitted constants of one mode's memory model (``edge.planning.memory``)."""

    weight_factor: float
    table_factor: float
    activation_factor: float
    session_overhead_mb: float
    io_factor: float = 0.0


@dataclass(frozen=True)
class Mode:
    """How a stage holds its weights, and what that costs.

    Attributes:
        name: the name plans, the CLI and ``StageConfig.mode`` use.
        compute_factor: compute time relative to fp32 at the same flops (the planner).
        memory: the fitted memory-model constants (``edge.planning.memory``).
        arena: onnxruntime's CPU arena on in its sessions (``edge.shards.runtime``).
        prepack: onnxruntime prepacks constant MatMul/Gemm weights at load
            (``edge.shards.runtime``); the memory model adds the load's peak, the largest
            such weight held twice for a moment, only when it does.
        quantized: its shard is built in fp32 and then quantized to int8
            (``edge.shards.quantize``); weights count at their int8 size; the planner
            measures its accuracy and may veto it.
        summary: one line for people.
    """

    name: str
    compute_factor: float
    memory: MemoryConstants
    arena: bool
    quantized: bool
    summary: str
    prepack: bool = True


# The modes, from most faithful to most frugal: the planner gives a stage the first that
# fits its device.
#
# compute_factor. fp32-lean: the arena off costs nothing measurable
# (benchmarks/shard_memory_modes.py, BERT-base stages); prepacking off made BERT-base's
# four stages 1.11-1.23x slower, 1.17x in all, at sequence 128 (benchmarks/memory_model.py
# --speed, 2 threads), though a decode step at batch 1 was not slower (below). int8: BERT-base stages took
# 21.4 / 22.1 ms against 65.0 / 69.1 ms in fp32 (2 threads, benchmarks/worker_overhead.py)
# on an x86-64 host with 8-bit dot-product instructions; a Cortex-A72 (Pi 4) has none, so
# int8 gains less there: re-measure on the device.
#
# memory: fitted by benchmarks/memory_model.py; how, and what the numbers say, is told in
# edge/planning/memory.py.
#
# arena: off only in fp32-lean. Without the arena every activation goes through malloc,
# and in a live worker, where gRPC buffers come and go between runs, that heap fragments.
# int8 was lean too, and its worker peaked 5-7 MiB higher than with the arena
# (benchmarks/worker_overhead.py).
#
# prepack: off only in fp32-lean. onnxruntime copies a constant MatMul B into a packed
# layout while the session is built, and for that moment the mapped original and the copy
# are both resident: SmolLM2's 108 MiB LM head (576 x 49152) peaked at 291 MiB at load
# against 210 MiB serving (prefill 128 with all its logits); with prepacking off the load
# peaked at 75 MiB, serving stayed at 210 MiB, and a decode step (batch 1, a GEMV) was no
# slower: median 6-7 ms with the arena, 6-17 ms without, against 9-13 ms prepacked
# (three runs each).
# A decoder-layer shard (9 SmolLM2 layers) showed no load peak either way and decode steps
# of 8-18 ms prepacked, 10-15 ms not (benchmarks/prepack_memory.py, x86-64, 2 threads,
# a shared machine, so timings are noisy); BERT at sequence 32 was 49% slower without it
# (ONNX-NOTES), so fp32 keeps it.
#
# A dict keyed by name, in order of preference; its entries are frozen. Tests that
# try other constants replace entries with ``monkeypatch.setitem``.
MODE_TABLE: dict[str, Mode] = {
    "fp32": Mode(
        "fp32", compute_factor=1.0,
        memory=MemoryConstants(weight_factor=1.036, table_factor=0.033,
                               activation_factor=2.158, session_overhead_mb=-14.4,
                               io_factor=2.711),
        arena=True, quantized=False,
        summary="weights memory-mapped from external data files; onnxruntime's arena on"),
    "fp32-lean": Mode(
        "fp32-lean", compute_factor=1.17,
        memory=MemoryConstants(weight_factor=0.912, table_factor=0.003,
                               activation_factor=6.118, session_overhead_mb=-13.2,
                               io_factor=0.0),
        arena=False, quantized=False, prepack=False,
        summary="as fp32, with the arena and weight prepacking off (no load peak for a "
                "big MatMul; matrix products at batch > 1 a little slower)"),
    "int8": Mode(
        "int8", compute_factor=0.33,
        memory=MemoryConstants(weight_factor=1.002, table_factor=0.0,
                               activation_factor=3.378, session_overhead_mb=-15.3,
                               io_factor=1.922),
        arena=True, quantized=True,
        summary="weights quantized per channel (onnxruntime dynamic quantization)"),
}

# The names of the modes, in order of preference.
MODES: tuple[str, ...] = tuple(MODE_TABLE)


def mode_info(name: str) -> Mode:
    """The table's entry for mode ``name``.

    Args:
        name: a mode name, one of :data:`MODES`.

    Raises:
        ValueError: ``name`` is not a mode; the message lists the modes.
    """
    try:
        return MODE_TABLE[name]
    except KeyError:
        raise ValueError(f"unknown mode {name!r}; expected one of "
                         f"{', '.join(MODE_TABLE)}") from None


def quantized_modes(modes: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Those of ``modes`` whose weights are quantized (``Mode.quantized``).

    Args:
        modes: mode names.
    """
    return tuple(m for m in modes if MODE_TABLE[m].quantized)


# How a stage stores a decoder's KV caches between steps (``edge plan --kv-dtype``), by
# name: the numpy dtype of the stored arrays. The graphs always compute in float32; fp16
# halves the caches' memory and is cast back to float32 to feed each step.
KV_DTYPES: dict[str, str] = {"fp32": "float32", "fp16": "float16"}
