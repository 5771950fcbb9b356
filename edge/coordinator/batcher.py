"""Decode steps of several sequences sent as one request: a batch runs as one stage run.

Decode reads every weight of a stage for one token; a stage that runs B sequences' decode
steps at once (batch dimension B) reads them once instead of B times. A stage cannot
form batches on its own (the tensors between stages carry the batch size in their
values, e.g. shape vectors), so the batch is formed here, at the first stage's inputs,
and travels through every stage as one ``Activation`` whose ``rows`` name each row's
sequence, position and sampling.

Each sequence's token loop (:mod:`edge.coordinator.generate`) hands its decode step to
:meth:`Batcher.step` and waits. A waiting step that finds a free slot sends a batch of
every step waiting (itself first, at most ``max_batch``); at most ``slots`` batches are
in flight (default: the plan's stages, so that every stage can be busy with one while
the next is formed). Rows of different lengths are left-padded (:func:`batch_tensors`).
A step that finds no other waiting is sent as its own single step (``alone``), exactly
as without batching, in its slot.

A batch is sent once: a refusal, a failover or a new epoch answers it with
:data:`~edge.coordinator.inflight.BROKEN_UP`, and each row's loop then sends its replay
alone (as a single step's refusal does) and rejoins batches from its next step. A
cancelled step leaves the waiting ones at once; one already sent waits for its batch
(so that its release comes after it) and then ends, and the other rows are not touched.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import grpc
import numpy as np

from edge.coordinator.inflight import InferError
from edge.planning.plan import Plan
from edge.proto import edge_pb2 as pb
from edge.transport.codec import encode_tensors

__all__ = ["Batcher", "batch_tensors", "can_pad"]

log = logging.getLogger(__name__)


def can_pad(plan: Plan) -> bool:
    """True when rows of different lengths can share a batch: the model takes an
    ``attention_mask`` (the padding is masked) and ``position_ids`` (each row's own
    positions). Without them only rows at the same position are batched."""
    names = {t.name for t in plan.model.inputs}
    return {"attention_mask", "position_ids"} <= names


def batch_tensors(plan: Plan, tokens: Sequence[int], positions: Sequence[int]
                  ) -> list[pb.Tensor]:
    """The first stage's inputs for one decode step of each row, left-padded.

    Row i feeds ``tokens[i]`` after ``positions[i]`` cached tokens. With L the largest
    position, its ``attention_mask`` row is ``[0] * (L - positions[i]) + [1] *
    (positions[i] + 1)``, matching the caches each stage left-pads to L.

    Args:
        plan: the plan (only the inputs the model has are made).
        tokens: each row's token.
        positions: each row's cached tokens.
    """
    longest = max(positions)
    mask = np.zeros((len(tokens), longest + 1), dtype=np.int64)
    for i, p in enumerate(positions):
        mask[i, longest - p:] = 1
    arrays = {"input_ids": np.asarray(tokens, dtype=np.int64)[:, None],
              "attention_mask": mask,
              "position_ids": np.asarray(positions, dtype=np.int64)[:, None]}
    names = {t.name for t in plan.model.inputs}
    return encode_tensors({k: v for k, v in arrays.items() if k in names})


@dataclass(eq=False)
class _Row:
    step: pb.Step
    token: int
    cache_epoch: int
    cancelled: threading.Event
    alone: Callable[[], pb.Activation]
    taken: bool = False                    # in a batch sent (or being sent)
    result: pb.Activation | None = None
    error: InferError | None = None

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None


class Batcher:
    """Batches the decode steps of the sequences generating over ``pipeline``.

    Args:
        pipeline: the :class:`~edge.coordinator.pipeline.Pipeline`.
        max_batch: rows in one batch at most (>= 1).
        slots: batches in flight at once (default: the plan's stages).

    Attributes:
        batches: batches sent.
        rows: their rows (``rows / batches``: the mean batch).
        largest: the most rows one batch had.
    """

    def __init__(self, pipeline: Any, max_batch: int, slots: int | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch: expected at least 1, got {max_batch}")
        self.pipeline = pipeline
        self.max_batch = max_batch
        self._slots = slots
        self._cond = threading.Condition()
        self._waiting: list[_Row] = []
        self._in_flight = 0
        self.batches = self.rows = self.largest = 0

    @property
    def slots(self) -> int:
        # Read each time: a re-plan after a failover may change the stages.
        return self._slots or max(1, len(self.pipeline.plan.stages))

    def step(self, step: pb.Step, token: int, cache_epoch: int, cancelled: threading.Event,
             alone: Callable[[], pb.Activation], timeout: float | None = None
             ) -> pb.Activation:
        """Run one decode step of a sequence in a batch and wait for its token.

        Args:
            step: its sequence, position (>= 1) and sampling.
            token: the token it feeds.
            cache_epoch: the epoch of the sequence's last result.
            cancelled: set when the sequence is cancelled.
            alone: sends the step by itself and waits for its result (called when no
                other step shares its batch).
            timeout: seconds to wait (default: the infer deadline).

        Returns:
            Its result: ``tokens`` holds its one token, ``epoch`` the batch's.

        Raises:
            InferError: CANCELLED, DEADLINE_EXCEEDED while waiting for a slot, or the
                batch's failure (:data:`~edge.coordinator.inflight.BROKEN_UP`: replay).
        """
        timeout = timeout or self.pipeline.deadlines.infer
        end = time.monotonic() + timeout
        row = _Row(step, int(token), cache_epoch, cancelled, alone)
        with self._cond:
            self._waiting.append(row)
            while not row.done:
                if not row.taken:
                    problem = self._gone(row, end, timeout)
                    if problem is not None:
                        self._waiting.remove(row)
                        raise problem
                    if self._in_flight < self.slots:
                        self._lead(row, timeout)
                        continue
                self._cond.wait(0.05)
        if row.error is not None:
            raise row.error
        if cancelled.is_set():
            raise self._cancelled(row)
        return row.result

    @staticmethod
    def _cancelled(row: _Row) -> InferError:
        return InferError(grpc.StatusCode.CANCELLED,
                          f"sequence {row.step.sequence_id} cancelled", retryable=False)

    def _gone(self, row: _Row, end: float, timeout: float) -> InferError | None:
        """Why a waiting row leaves without being sent, or None."""
        if row.cancelled.is_set():
            return self._cancelled(row)
        if time.monotonic() > end:
            return InferError(grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"the decode step of sequence {row.step.sequence_id} waited "
                              f"{timeout:.0f} s for one of {self.slots} batch slots")
        return None

    def _lead(self, row: _Row, timeout: float) -> None:
        """Send a batch of ``row`` and the rows waiting with it, wait for its result and
        hand each row its token. Called and returns with the lock held."""
        batch = self._take(row)
        self._in_flight += 1
        self.batches += 1
        self.rows += len(batch)
        self.largest = max(self.largest, len(batch))
        # No row may wait for an answer that never comes, whatever happens here.
        results: list = [InferError(grpc.StatusCode.INTERNAL, f"batch of {len(batch)} "
                                                              "decode steps not answered")]
        results *= len(batch)
        self._cond.release()
        try:
            results = self._send(batch, timeout)
        except Exception as e:  # a defect
            log.exception("batch of %d decode steps failed", len(batch))
            results = [InferError(grpc.StatusCode.INTERNAL, f"batch of {len(batch)} decode "
                                                            f"steps: {e}")] * len(batch)
        finally:
            self._cond.acquire()
            self._in_flight -= 1
        for r, out in zip(batch, results):
            if isinstance(out, InferError):
                r.error = out
            else:
                r.result = out
        self._cond.notify_all()

    def _take(self, row: _Row) -> list[_Row]:
        """``row`` and the rows that can share its batch, oldest first, out of the
        waiting list."""
        pad = can_pad(self.pipeline.plan)
        batch = [row]
        for r in self._waiting:
            if len(batch) >= self.max_batch:
                break
            if r is row or r.cancelled.is_set() or r.cache_epoch != row.cache_epoch:
                continue
            if pad or r.step.position == row.step.position:
                batch.append(r)
        for r in batch:
            r.taken = True
            self._waiting.remove(r)
        return batch

    def _send(self, batch: list[_Row], timeout: float) -> list[pb.Activation | InferError]:
        """Each row's result (its token) or error."""
        if len(batch) == 1:
            try:
                return [batch[0].alone()]
            except InferError as e:
                return [e]
        plan = self.pipeline.plan
        tensors = batch_tensors(plan, [r.token for r in batch],
                                [r.step.position for r in batch])
        try:
            result = self.pipeline.step_batch(tensors, [r.step for r in batch],
                                              batch[0].cache_epoch, timeout)
        except InferError as e:
            return [e] * len(batch)
        if len(result.tokens) != len(batch):
            e = InferError(grpc.StatusCode.INTERNAL,
                           f"the last stage answered a batch of {len(batch)} decode steps "
                           f"with {len(result.tokens)} tokens; expected one per row")
            return [e] * len(batch)
        return [pb.Activation(request_id=result.request_id, epoch=result.epoch, tokens=[t])
                for t in result.tokens]
