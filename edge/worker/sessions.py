"""The sequences a stage is generating: their KV caches, and how one step runs with them.

Each stage keeps, per ``sequence_id``, the presents of its own layers (the StageConfig's
state pairs) and feeds them back as the pasts of the sequence's next step, so that a
decode step sends one token's activations instead of the whole sequence's. The caches are
bounded (``max_sequences`` at once), freed on a release, after ``idle_s`` without a
step, and all at once when the stage is re-configured under another plan or epoch (its
layers, or the sequences' owner, may have changed; the coordinator replays from
position 0).

Only the compute thread runs steps and sweeps; a re-configure resets from the gRPC
thread, so the store is locked, and a step computed under an older wiring stores
nothing.

A batch (``Activation.rows``) is one decode step of each of several sequences, run as
one: every row's caches are taken (each checked against its position as a single step's
are), left-padded with zeros to the longest and stacked on the batch axis, run once, and
the presents split back per row, each keeping only its own positions (:func:`run_batch`).
Decode reads every weight once per run whatever the batch, so B rows in one run cost far
less than B runs.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Hashable, Iterator

import numpy as np

from edge.proto import edge_pb2 as pb
from edge.worker.errors import ContextExceeded, PositionMismatch, TooManySequences
from edge.worker.sampling import draw_tokens
from edge.worker.stage import ShardMismatch, StageRunner, batch_size

__all__ = ["SessionStore", "Session", "run_step", "split_prefill", "run_batch", "check_step",
           "check_rows", "pad_pasts", "split_presents", "store_caches", "load_caches",
           "DEFAULT_MAX_SEQUENCES", "DEFAULT_IDLE_S", "MAX_SEQUENCE_ID"]

log = logging.getLogger(__name__)

DEFAULT_MAX_SEQUENCES = 8  # a StageConfig that gives none (0)
DEFAULT_IDLE_S = 120.0     # a sequence's caches without a step for this long are freed
MAX_SEQUENCE_ID = 256      # characters


@dataclass
class Session:
    """One sequence's caches on this stage."""

    caches: dict[str, np.ndarray]  # by past input name: [batch, kv_heads, length, head_dim]
    length: int                    # tokens cached
    last_used: float               # the store's clock

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.caches.values())


class SessionStore:
    """sequence_id -> :class:`Session`, under one wiring (``key``) at a time.

    Args:
        idle_s: seconds without a step after which a sequence's caches are freed.
        clock: monotonic seconds (a test's fake clock).
    """

    def __init__(self, idle_s: float = DEFAULT_IDLE_S,
                 clock: Callable[[], float] = time.monotonic):
        self.idle_s = idle_s
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._key: Hashable = None

    def stats(self) -> tuple[int, int]:
        """Sequences held, and the bytes of their caches."""
        with self._lock:
            return len(self._sessions), sum(s.nbytes for s in self._sessions.values())

    def reset(self, key: Hashable) -> int:
        """Serve wiring ``key`` (plan, epoch): all caches of another one are freed.

        Returns:
            The bytes freed.
        """
        with self._lock:
            if key == self._key:
                return 0
            self._key = key
            freed = sum(s.nbytes for s in self._sessions.values())
            if self._sessions:
                log.info("freed the caches of %d sequence(s) (%.1f MiB): re-configured",
                         len(self._sessions), freed / 2**20)
            self._sessions.clear()
        return freed

    def take(self, key: Hashable, sequence_id: str, position: int, bound: int,
             where: str) -> dict[str, np.ndarray] | None:
        """The caches a step of ``sequence_id`` at ``position`` continues from; None when
        it starts the sequence (position 0, whose old caches, if any, are freed now).

        Raises:
            PositionMismatch: the caches hold another length than ``position``.
            TooManySequences: a new sequence while ``bound`` are held.
        """
        with self._lock:
            if key != self._key:
                # Re-configured while the step waited: the engine drops what it computes,
                # and the store, which serves the new wiring, is not touched.
                return None
            held = self._sessions.get(sequence_id)
            if position == 0:
                self._sessions.pop(sequence_id, None)
                if held is None and len(self._sessions) >= bound:
                    raise TooManySequences(
                        f"{where} holds the caches of {len(self._sessions)} sequences, its "
                        f"max_sequences is {bound}; expected a release (or an idle one to "
                        f"expire) before sequence {sequence_id} starts")
                return None
            cached = held.length if held else 0
            if cached != position:
                raise PositionMismatch(
                    f"{where} has {cached} tokens cached for sequence {sequence_id}, the "
                    f"step is at position {position}; expected position {cached} (or 0 to "
                    "restart the sequence)")
            held.last_used = self._clock()
            return dict(held.caches)

    def put(self, key: Hashable, sequence_id: str, caches: dict[str, np.ndarray],
            length: int) -> bool:
        """Keep ``caches`` as the sequence's; False (nothing kept) if the store serves
        another wiring since the step began."""
        with self._lock:
            if key != self._key:
                return False
            self._sessions[sequence_id] = Session(caches, length, self._clock())
            return True

    def release(self, sequence_id: str) -> int:
        """Free a sequence's caches (an unknown one is fine). Returns the bytes freed."""
        with self._lock:
            s = self._sessions.pop(sequence_id, None)
        return s.nbytes if s else 0

    def sweep(self) -> int:
        """Free the caches idle for longer than ``idle_s``. Returns the bytes freed."""
        now = self._clock()
        with self._lock:
            idle = [k for k, s in self._sessions.items() if now - s.last_used > self.idle_s]
            gone = [self._sessions.pop(k) for k in idle]
        if gone:
            log.info("freed the caches of %d sequence(s) idle for over %.0f s", len(gone),
                     self.idle_s)
        return sum(s.nbytes for s in gone)


def store_caches(presents: dict[str, np.ndarray], kv_dtype: str) -> dict[str, np.ndarray]:
    """A step's presents as the sequence's caches are kept: as they came, or with
    ``kv_dtype`` "fp16" their float32 arrays as float16 (half the bytes held between
    steps; ``edge.spec.KV_DTYPES``)."""
    if kv_dtype != "fp16":
        return presents
    return {k: v.astype(np.float16) if v.dtype == np.float32 else v
            for k, v in presents.items()}


def load_caches(caches: dict[str, np.ndarray], kv_dtype: str) -> dict[str, np.ndarray]:
    """Kept caches as the graph reads its pasts: with ``kv_dtype`` "fp16" cast back to
    float32 (the graph computes in float32 whatever the caches are stored in)."""
    if kv_dtype != "fp16":
        return caches
    return {k: v.astype(_GRAPH_DTYPE[v.dtype]) if v.dtype in _GRAPH_DTYPE else v
            for k, v in caches.items()}


# A stored cache's dtype -> the dtype the graph reads (edge plans fp16 caches only for
# models whose presents are float32).
_GRAPH_DTYPE = {np.dtype(np.float16): np.dtype(np.float32)}


def check_step(step: pb.Step) -> str | None:
    """What is wrong with a step's plain fields, or None."""
    if not 0 < len(step.sequence_id) <= MAX_SEQUENCE_ID:
        return (f"step: expected a sequence id of 1-{MAX_SEQUENCE_ID} characters, got "
                f"{len(step.sequence_id)}")
    return None


def check_rows(rows) -> str | None:
    """What is wrong with a batch's rows (``Activation.rows``), or None."""
    seen: set[str] = set()
    for i, row in enumerate(rows):
        problem = check_step(row)
        if problem:
            return f"row {i}: {problem}"
        if row.release or row.position == 0:
            return (f"row {i} (sequence {row.sequence_id}): a batch holds decode steps; "
                    f"expected a position of at least 1 and no release, got position "
                    f"{row.position}{' and a release' if row.release else ''}")
        if row.sequence_id in seen:
            return f"row {i}: sequence {row.sequence_id} comes twice in one batch"
        seen.add(row.sequence_id)
    return None


def pad_pasts(held: list[dict[str, np.ndarray]], lengths: list[int],
              cast: dict | None = None) -> dict[str, np.ndarray]:
    """The batch's pasts: each row's caches left-padded with zeros to the longest (in
    ``cast[dtype]`` for a stored dtype it names: fp16 caches are padded into float32).

    Transient memory: one [rows, kv_heads, longest, head_dim] copy per past, i.e. about
    rows x the longest row's caches (the rows' own caches stay stored meanwhile), freed
    once the stage has run; the presents onnxruntime returns are one token longer. So a
    batch holds up to about twice its rows' caches at once (the stored ones and the
    padded pasts, then the stored ones and the presents: :func:`run_batch` stores each
    row's new caches, freeing its old ones, one row at a time); the plan's KV budget
    counts them once, and ``--max-batch`` bounds the rows.
    """
    longest = max(lengths)
    out = {}
    for name, first in held[0].items():
        _, heads, _, size = first.shape
        pad = np.zeros((len(held), heads, longest, size),
                       dtype=(cast or {}).get(first.dtype, first.dtype))
        for i, (caches, n) in enumerate(zip(held, lengths)):
            pad[i:i + 1, :, longest - n:] = caches[name]
        out[name] = pad
    return out


def split_presents(presents: dict[str, np.ndarray], lengths: list[int]
                   ) -> Iterator[dict[str, np.ndarray]]:
    """Each row's own caches out of a batch's presents [rows, kv_heads, longest + 1,
    head_dim], one row at a time: its last ``lengths[i] + 1`` positions, copied (a view
    would keep the whole batch's presents alive)."""
    for i, n in enumerate(lengths):
        yield {name: np.array(p[i:i + 1, :, p.shape[2] - n - 1:], copy=True)
               for name, p in presents.items()}


def run_batch(runner: StageRunner, store: SessionStore, epoch: int,
              arrays: dict[str, np.ndarray], rows: list[pb.Step]
              ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Run one decode step of each of several sequences as one run of this stage.

    Row i of ``arrays`` is ``rows[i]``'s step (one token, left-padded as
    ``Activation.rows`` says). Each row's caches are taken and checked as
    :func:`run_step` does; any refused row refuses the batch (no row's caches change).
    The last stage draws each row's token with its own sampling and position, as that
    row's single step would.

    Args:
        runner: the stage.
        store: the stage's sequences.
        epoch: the wiring the batch came under.
        arrays: the batch's tensors, checked (batch = len(rows)).
        rows: each row's sequence, position (>= 1) and sampling.

    Returns:
        As :func:`run_step`: the tensors that go on, and one token per row (last stage).

    Raises:
        PositionMismatch, ContextExceeded: a row is refused, and so is the batch.
    """
    spec = runner.spec
    key = (spec.plan_id, epoch)
    lengths = [int(r.position) for r in rows]
    if spec.state:
        bound = spec.max_sequences or DEFAULT_MAX_SEQUENCES
        held = [store.take(key, r.sequence_id, r.position, bound, spec.where) for r in rows]
        if any(h is None for h in held):
            return {}, None  # re-configured meanwhile: the engine drops the batch
        if spec.context and max(lengths) + 1 > spec.context:
            raise ContextExceeded(
                f"{spec.where}: a batch row would hold {max(lengths) + 1} tokens; expected "
                f"at most the context of {spec.context}")
        pasts = pad_pasts(held, lengths, _GRAPH_DTYPE if spec.kv_dtype == "fp16" else None)
        del held
    else:
        pasts = {}
    outputs, presents = runner.run_state(arrays, pasts)
    del pasts
    for row, caches in zip(rows, split_presents(presents, lengths) if presents else ()):
        store.put(key, row.sequence_id, store_caches(caches, spec.kv_dtype), row.position + 1)
    del presents
    if not spec.is_last:
        return outputs, None
    logits = _logits(outputs, spec.where)
    tokens = np.empty(len(rows), dtype=np.int64)
    for i, r in enumerate(rows):
        s = r.sampling
        tokens[i] = draw_tokens(logits[i:i + 1], s.temperature, s.top_k, s.top_p, s.seed,
                                r.position, r.length)[0]
    return {}, tokens


def _logits(outputs: dict[str, np.ndarray], where: str) -> np.ndarray:
    logits = outputs.get("logits")
    if logits is None or logits.ndim != 3:
        raise ShardMismatch(
            f"{where} draws the next token from logits [batch, sequence, vocab]; "
            "expected an output named logits, got "
            f"{', '.join(f'{k}{list(v.shape)}' for k, v in outputs.items()) or 'none'}")
    return logits


def split_prefill(arrays: dict[str, np.ndarray], step: pb.Step, chunk: int
                  ) -> list[tuple[dict[str, np.ndarray], pb.Step]]:
    """A first stage's step of more than ``chunk`` tokens, as steps of at most ``chunk``.

    A long prompt (or a replay of a whole sequence after a failover) would otherwise run
    at its full length, with activations far beyond the prefill the plan costed. Chunk
    ``[a, b)`` feeds ``input_ids`` and ``position_ids`` columns ``a..b`` and the first
    ``position + b`` columns of ``attention_mask``, at position ``position + a``, after
    the caches of the chunks before it; every chunk but the last is ``partial`` (the last
    stage caches it and draws nothing), and each keeps the step's ``length`` (the last
    draws what the whole step would). Its attention spans the tokens cached before it,
    so a chunk late in a long prompt holds more than the planned prefill's scores (about
    heads x chunk x length x 4 bytes per layer, one layer at a time).

    Returns:
        ``[(arrays, step)]`` unchanged when the step is not longer than ``chunk`` (or has
        no ``input_ids``).
    """
    ids = arrays.get("input_ids")
    n = ids.shape[1] if ids is not None and ids.ndim == 2 else 0
    if chunk <= 0 or n <= chunk:
        return [(arrays, step)]
    p, parts = int(step.position), []
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        sub = {}
        for name, x in arrays.items():
            if name == "attention_mask":
                sub[name] = np.ascontiguousarray(x[:, :p + b])
            elif x.ndim >= 2 and x.shape[1] == n:
                sub[name] = np.ascontiguousarray(x[:, a:b])
            else:
                sub[name] = x
        part = pb.Step()
        part.CopyFrom(step)
        part.position, part.partial = p + a, b < n
        parts.append((sub, part))
    return parts


def run_step(runner: StageRunner, store: SessionStore, epoch: int,
             arrays: dict[str, np.ndarray], step: pb.Step
             ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Run one generation step of a sequence on this stage.

    Feeds the sequence's caches as the pasts (empty ones at position 0), keeps the
    presents, and on the last stage draws the next token from the logits, which then
    stay here.

    Args:
        runner: the stage.
        store: the stage's sequences.
        epoch: the wiring the step came under (with the plan id, the store's key).
        arrays: the step's tensors, checked.
        step: its sequence, position and sampling.

    Returns:
        The tensors that go on (none on the last stage), and the drawn tokens (last
        stage) or None.

    Raises:
        PositionMismatch, TooManySequences, ContextExceeded: the step is refused; the
            sequence's caches are as they were (but a restart, position 0, has freed
            them already).
    """
    spec = runner.spec
    key = (spec.plan_id, epoch)
    pasts: dict[str, np.ndarray] = {}
    if spec.state:
        held = store.take(key, step.sequence_id, step.position,
                          spec.max_sequences or DEFAULT_MAX_SEQUENCES, spec.where)
        pasts = (load_caches(held, spec.kv_dtype) if held is not None
                 else runner.empty_pasts(batch_size(arrays)))
    outputs, presents = runner.run_state(arrays, pasts)
    del pasts
    if presents:
        length = next(iter(presents.values())).shape[2]
        if spec.context and length > spec.context:
            raise ContextExceeded(
                f"{spec.where}: sequence {step.sequence_id} would hold {length} tokens; "
                f"expected at most the context of {spec.context}")
        store.put(key, step.sequence_id, store_caches(presents, spec.kv_dtype), length)
    if not spec.is_last or step.partial:  # a chunk before the last draws nothing
        return outputs, None
    logits = _logits(outputs, spec.where)
    s = step.sampling
    tokens = draw_tokens(logits, s.temperature, s.top_k, s.top_p, s.seed, step.position,
                         step.length)
    return {}, tokens
