"""One stage of the pipeline in a worker: an onnxruntime session plus the stage's contract."""

from __future__ import annotations

import copy
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
from edge.spec import TensorSpec
from edge.profiling.memory import release_file_pages
from edge.shards.runtime import session_options
from edge.transport.codec import check_tensors

__all__ = ["StageSpec", "StageRunner", "ShardMismatch", "batch_size"]

log = logging.getLogger(__name__)


class ShardMismatch(TensorError):
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
    max_request_bytes: int = 0  # the largest Forward the plan allows (0: no bound known)
    # Generation: (past input, present output) pairs kept per sequence on this stage (they
    # never travel), how many sequences at once (0: DEFAULT_MAX_SEQUENCES), and the
    # tokens per sequence at most (0: no bound); the first stage runs longer steps in
    # chunks of prefill_chunk tokens (0: whole); how the caches are stored between steps
    # (a key of edge.spec.KV_DTYPES).
    state: tuple[tuple[str, str], ...] = ()
    max_sequences: int = 0
    context: int = 0
    prefill_chunk: int = 0
    kv_dtype: str = "fp32"

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
        tables = [shard_path.parent / name for name, _, random_access in spec.data_files
                  if random_access]
        # Another session may map the same table (the cache hard-links one file into every
        # stage that has it, and a re-wired worker loads its new shard before it lets the
        # old one go). Those mappings are not this runner's: once that session is freed,
        # their addresses can hold anything, and dropping their pages would zero it.
        others = {r for t in tables for r in file_mappings(t)}
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
        self._tables = advise_random([r for t in tables for r in file_mappings(t)
                                      if r not in others])
        self._tables_checked = False
        self._feeds = [i.name for i in self.session.get_inputs()]
        self._fetches = [o.name for o in self.session.get_outputs()]
        self._past_shapes = self._check_state()
        received = {s.name for s in spec.inputs} | {i for i, _ in spec.state}
        sent = {s.name for s in spec.outputs}
        if not set(self._feeds) <= received:
            raise ShardMismatch(f"shard needs {sorted(set(self._feeds) - received)} which "
                                f"{spec.where} does not receive")
        produced = set(self._fetches) | received
        if not sent <= produced:
            raise ShardMismatch(f"{spec.where} must send {sorted(sent - produced)} which "
                                f"neither its shard produces nor it receives")
        # A dtype the shard does not have would make every request fail in onnxruntime.
        specs = {s.name: s for s in spec.inputs} | {s.name: s for s in spec.outputs}
        for what, args in (("takes", self.session.get_inputs()),
                           ("produces", self.session.get_outputs())):
            for a in args:
                dtype = _ort_dtype(a.type)
                if a.name in specs and dtype and specs[a.name].dtype != dtype:
                    raise ShardMismatch(f"{spec.where}: the config gives {a.name} dtype "
                                        f"{specs[a.name].dtype}; expected {dtype}, as the "
                                        f"shard {what} it")

    def _check_state(self) -> dict[str, tuple[str, int, int]]:
        """Each past input's (dtype, kv_heads, head_dim), from the shard.

        Raises:
            ShardMismatch: a pair's names are not the shard's, or its past's heads and
                head size are not fixed ints (in the past input's or the present's shape).
        """
        inputs = {a.name: a for a in self.session.get_inputs()}
        outputs = {a.name: a for a in self.session.get_outputs()}
        shapes = {}
        for past, present in self.spec.state:
            if past not in inputs or present not in outputs:
                raise ShardMismatch(
                    f"{self.spec.where}: state pair {past} -> {present}: expected a past "
                    f"among the shard's inputs ({', '.join(inputs)}) and a present among "
                    f"its outputs ({', '.join(outputs)})")
            dims = None
            for arg in (inputs[past], outputs[present]):
                shape = list(arg.shape or ())
                if (len(shape) == 4 and isinstance(shape[1], int)
                        and isinstance(shape[3], int)):
                    dims = shape[1], shape[3]
                    break
            if dims is None:
                raise ShardMismatch(
                    f"{self.spec.where}: state input {past} has shape "
                    f"{inputs[past].shape}; expected [batch, kv_heads, past_sequence, "
                    "head_dim] with kv_heads and head_dim fixed (in it or in "
                    f"{present})")
            shapes[past] = (_ort_dtype(inputs[past].type) or "float32", *dims)
        return shapes

    def empty_pasts(self, batch: int) -> dict[str, np.ndarray]:
        """Zero-length pasts ([batch, kv_heads, 0, head_dim]): a new sequence's caches."""
        return {name: np.zeros((batch, heads, 0, size), dtype=dtype)
                for name, (dtype, heads, size) in self._past_shapes.items()}

    def rewired(self, spec: StageSpec) -> "StageRunner | None":
        """This runner's session under ``spec`` (another epoch, position or next hop), if
        ``spec`` runs the same shard the same way; else None.

        A failover re-wires the stages that keep their shard: they must not load it again
        (a second session would double their memory for a while, and take seconds).
        """
        old = self.spec
        same = (spec.shard_sha256, spec.mode, spec.data_files, spec.inputs, spec.outputs,
                spec.state)
        if same != (old.shard_sha256, old.mode, old.data_files, old.inputs, old.outputs,
                    old.state):
            return None
        runner = copy.copy(self)
        runner.spec = spec
        runner.load_ms = 0.0
        return runner

    def check(self, arrays: dict[str, np.ndarray]) -> None:
        """Raise TensorError unless ``arrays`` is exactly what this stage receives."""
        check_tensors(arrays, self.spec.inputs, self.spec.where)

    def run(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Compute the stage. ``arrays`` must have passed :meth:`check`.

        A stage with state runs as a sequence of its own (empty pasts), its presents
        dropped: a plain request through a decoder's stages.
        """
        pasts = self.empty_pasts(batch_size(arrays)) if self.spec.state else {}
        return self.run_state(arrays, pasts)[0]

    def run_state(self, arrays: dict[str, np.ndarray], pasts: dict[str, np.ndarray]
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Compute the stage with these pasts (one per state pair).

        Returns:
            What goes on (as :meth:`run`), and the presents by past input name.
        """
        feeds = arrays | pasts
        new = self._new_tokens(arrays) if self.spec.state else None
        if new is not None:
            outputs, presents = self._run_into_caches(feeds, pasts, new)
            self._drop_table_pages()
            return ({s.name: outputs[s.name] if s.name in outputs else arrays[s.name]
                     for s in self.spec.outputs}, presents)
        produced = self.session.run(self._fetches, {n: feeds[n] for n in self._feeds})
        self._drop_table_pages()
        out = dict(zip(self._fetches, produced))
        del produced
        # Copied out of onnxruntime: its outputs are views of its own buffers (the CPU
        # arena), which never shrinks, so caches kept in them stayed resident after their
        # release. Copies live on the heap and are trimmed once freed.
        presents = {past: np.array(out.pop(present), copy=True)
                    for past, present in self.spec.state}
        return ({s.name: out[s.name] if s.name in out else arrays[s.name]
                 for s in self.spec.outputs}, presents)

    def _drop_table_pages(self) -> None:
        """Drop the gather tables' pages again after a run (they are re-read from the
        file when needed), unless the run wrote them."""
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

    def _new_tokens(self, arrays: dict[str, np.ndarray]) -> int | None:
        """The tokens a step feeds (the size of an input's ``sequence`` dim), or None when
        no input names it."""
        for spec in self.spec.inputs:
            if "sequence" in spec.shape and spec.name in arrays:
                return int(arrays[spec.name].shape[spec.shape.index("sequence")])
        return None

    def _run_into_caches(self, feeds: dict[str, np.ndarray], pasts: dict[str, np.ndarray],
                         new: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Run with each present written straight into an array of ours ([batch, kv_heads,
        past + new, head_dim], bound with IO binding), not into onnxruntime's arena and
        then copied out: a step holds the stored caches and the new ones, not a third
        copy. The other outputs are copied out as usual."""
        io = self.session.io_binding()
        for name in self._feeds:
            io.bind_cpu_input(name, np.ascontiguousarray(feeds[name]))
        kept = {present for _, present in self.spec.state}
        others = [f for f in self._fetches if f not in kept]
        for name in others:
            io.bind_output(name, "cpu")
        presents = {}
        for past, present in self.spec.state:
            b, heads, length, size = pasts[past].shape
            buf = np.empty((b, heads, length + new, size), dtype=pasts[past].dtype)
            io.bind_output(present, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
            presents[past] = buf
        self.session.run_with_iobinding(io)
        values = io.get_outputs()
        outputs = {name: values[i].numpy() for i, name in enumerate(others)}
        del values, io
        return outputs, presents


def batch_size(arrays: dict[str, np.ndarray]) -> int:
    """The batch size of a request: the first dim of its first tensor that has one."""
    return next((a.shape[0] for a in arrays.values() if a.ndim), 1)


def _ort_dtype(ort_type: str) -> str | None:
    """numpy's name for an onnxruntime type string ('tensor(float)' -> 'float32')."""
    if not ort_type.startswith("tensor(") or not ort_type.endswith(")"):
        return None
    name = ort_type[len("tensor("):-1]
    return {"float": "float32", "double": "float64"}.get(name, name)


_MADV_RANDOM = 1
_MADV_DONTNEED = 4


@functools.lru_cache(maxsize=1)
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def file_mappings(path: Path) -> list[tuple[int, int]]:
    """The (start, end) addresses of this process's mappings of ``path`` (matched by inode,
    so hard links count); none if it cannot be read."""
    try:
        inode = str(os.stat(path).st_ino)
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split()  # address perms offset dev inode path
        if len(parts) >= 6 and parts[4] == inode:
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end))
    return out


def advise_random(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Tell the kernel that these mappings (of a gather table) are read at random.

    Without it, every looked-up embedding row reads its neighbours in too. Applied only to
    gather tables: on a whole weight file it made the first run 40x slower.

    Returns:
        The ranges advised (none where madvise is not available).
    """
    try:
        libc = _libc()
    except (OSError, AttributeError):
        return []
    return [(s, e) for s, e in ranges if libc.madvise(s, e - s, _MADV_RANDOM) == 0]


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
    """Classify a failure of onnxruntime on a request.

    Returns:
        ('invalid', msg) when the request's contents are to blame: onnxruntime refused it
        (the stage loaded and its contract was checked, so a value such as a token id out
        of the vocabulary or a bad shape tensor made a node fail); ('exhausted', msg) when
        memory ran out; ('internal', msg) for anything else (a bug in edge).
    """
    name = type(e).__name__
    msg = str(e).strip().splitlines()[0] if str(e).strip() else name
    text = str(e).lower()
    if isinstance(e, MemoryError) or "bad_alloc" in text or "failed to allocate" in text:
        return "exhausted", msg
    if isinstance(e, TensorError) or type(e).__module__.startswith("onnxruntime"):
        return "invalid", msg
    return "internal", msg
