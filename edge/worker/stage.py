"""One stage of the pipeline in a worker: an onnxruntime session plus the stage's contract."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge.errors import TensorError
from edge.planning.plan import TensorSpec
from edge.profiling.memory import release_file_pages
from edge.shards.runtime import session_options
from edge.transport.codec import check_tensors

__all__ = ["StageSpec", "StageRunner", "ShardMismatch"]

log = logging.getLogger(__name__)


class ShardMismatch(Exception):
    """The shard's graph does not provide what the stage config promises."""


@dataclass(frozen=True)
class StageSpec:
    """What the coordinator told this worker to serve."""

    stage: int
    num_stages: int
    shard_sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    next_address: str
    epoch: int
    plan_id: str
    predicted_memory_mb: float = 0.0
    data_files: tuple[tuple[str, str, bool], ...] = ()  # (name, sha256, random_access)
    mode: str = "fp32"

    @property
    def is_last(self) -> bool:
        return not self.next_address

    @property
    def where(self) -> str:
        return f"stage {self.stage}"


class StageRunner:
    """Runs a shard: checks the incoming tensors, runs the session, and assembles what goes
    on (the shard's outputs plus the tensors it only passes through).

    Args:
        spec: the stage's contract.
        shard_path: the verified ``.onnx``, with its data files beside it.
        threads: onnxruntime intra-op threads (None: all cores).
    """

    def __init__(self, spec: StageSpec, shard_path: Path, threads: int | None = None):
        self.spec = spec
        # Library pages that only the imports and the upload touched leave before the load
        # and those only the load touched after it, each time before the next phase adds
        # its own: the load's peak and the serving peak then hold only what they use. A
        # BERT-base int8 worker peaked at 120 MiB with 4 requests in flight, 94 with this,
        # fp32 at 180 and 156; anonymous memory does not change, nor does the speed.
        # (edge.profiling.memory.release_file_pages; benchmarks/worker_overhead.py.)
        released = release_file_pages()
        t0 = time.perf_counter()
        # From the path, never from bytes: onnxruntime then maps the external data files
        # instead of copying them.
        self.session = ort.InferenceSession(str(shard_path),
                                            sess_options=session_options(threads, spec.mode),
                                            providers=["CPUExecutionProvider"])
        self.load_ms = (time.perf_counter() - t0) * 1e3
        released += release_file_pages()
        log.debug("%s: unmapped %.1f MiB of library pages around the load", spec.where,
                  released / 2**20)
        # Read-only mappings of the gather tables: a request touches a few rows, but over
        # many requests the rows add up (BERT-base stage 0: +18 MiB after 30 requests of
        # random tokens). They are clean file pages, so after each run they are dropped
        # from this process (MADV_DONTNEED) and the next lookup refaults them from the
        # page cache, which the kernel may reclaim.
        self._tables: list[tuple[int, int]] = []
        self._tables_checked = False
        for name, _, random_access in spec.data_files:
            if random_access:
                self._tables += advise_random(shard_path.parent / name)
        self._feeds = [i.name for i in self.session.get_inputs()]
        self._fetches = [o.name for o in self.session.get_outputs()]
        received = {s.name for s in spec.inputs}
        sent = {s.name for s in spec.outputs}
        if not set(self._feeds) <= received:
            raise ShardMismatch(f"shard needs {sorted(set(self._feeds) - received)} which "
                                f"{spec.where} does not receive")
        produced = set(self._fetches) | received
        if not sent <= produced:
            raise ShardMismatch(f"{spec.where} must send {sorted(sent - produced)} which "
                                f"neither its shard produces nor it receives")

    def check(self, arrays: dict[str, np.ndarray]) -> None:
        """Raise TensorError unless ``arrays`` is exactly what this stage receives."""
        check_tensors(arrays, self.spec.inputs, self.spec.where)

    def run(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Compute the stage. ``arrays`` must have passed :meth:`check`."""
        produced = self.session.run(self._fetches, {n: arrays[n] for n in self._feeds})
        if self._tables:
            if not self._tables_checked:
                # Once, after the first run: dropping written pages would lose the writes.
                self._tables_checked = True
                written = anonymous_kib(self._tables)
                if written:
                    log.warning("%s: %d KiB of the gather table mapping were written; "
                                "its pages stay resident", self.spec.where, written)
                    self._tables = []
            if self._tables:
                drop_pages(self._tables)
        out = dict(zip(self._fetches, produced))
        return {s.name: out[s.name] if s.name in out else arrays[s.name]
                for s in self.spec.outputs}


_MADV_RANDOM = 1
_MADV_DONTNEED = 4


@functools.lru_cache(maxsize=1)
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def advise_random(path: Path) -> list[tuple[int, int]]:
    """Tell the kernel that this process's mappings of ``path`` are read at random.

    Without it, every looked-up embedding row reads its neighbours in too. Applied only to
    gather tables: on a whole weight file it made the first run 40x slower.

    Returns:
        The (start, end) addresses of the mappings advised (none where madvise is not
        available).
    """
    try:
        st = os.stat(path)
        libc = _libc()
    except (OSError, AttributeError):
        return []
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split()
            # address perms offset dev inode path: match the inode, so hard links count
            if len(parts) >= 6 and parts[4] == str(st.st_ino):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                if libc.madvise(start, end - start, _MADV_RANDOM) == 0:
                    ranges.append((start, end))
    return ranges


def anonymous_kib(ranges: list[tuple[int, int]]) -> int:
    """KiB of anonymous (copied-on-write) pages in these mappings, from /proc/self/smaps."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:
                start, end = (int(x, 16) for x in head[0].split("-"))
                inside = any(start < e and s < end for s, e in ranges)
            elif inside and head and head[0] == "Anonymous:":
                total += int(head[1])
    return total


def drop_pages(ranges: list[tuple[int, int]]) -> None:
    """Drop the resident pages of file mappings from this process (MADV_DONTNEED).

    Safe only for mappings whose pages nobody has written (``anonymous_kib`` is 0): they
    are then clean copies of the file, and the next access reads them in again.
    onnxruntime maps external data private and writable but never writes a Gather table.
    """
    libc = _libc()
    for start, end in ranges:
        libc.madvise(start, end - start, _MADV_DONTNEED)


def describe_ort_error(e: Exception) -> tuple[str, str]:
    """Classify an onnxruntime failure as ('invalid', msg) for bad input or ('internal', msg)."""
    name = type(e).__name__
    msg = str(e).strip().splitlines()[0] if str(e).strip() else name
    if name in ("InvalidArgument", "InvalidGraph") or isinstance(e, TensorError):
        return "invalid", msg
    return "internal", msg
