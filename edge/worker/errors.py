"""The worker's errors, and the one table that turns them into gRPC status codes.

The engine, the cache and the stage raise typed errors and know nothing of gRPC; each
handler of the servicer is wrapped in :func:`grpc_errors`, which ends the call with the
status :data:`STATUS_CODES` gives the error's class and the error's message unchanged.
An error that is not in the table is a bug and goes to gRPC as it is (UNKNOWN).
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

import grpc

from edge.errors import EdgeError, TensorError
from edge.transport.channels import PUSHBACK
from edge.worker.cache import UploadError

__all__ = ["WorkerError", "BadRequest", "NotConfigured", "StaleEpoch", "ProtocolMismatch",
           "OverBudget", "QueueFull", "Busy", "OwnedElsewhere", "TakenOver", "Replaced",
           "TooManySubscribers", "CacheUnreadable", "DigestMismatch", "ShardLoadError",
           "NextHopRefused", "PositionMismatch", "TooManySequences", "ContextExceeded",
           "STATUS_CODES", "RUN_FAILURE_CODES", "status_code",
           "grpc_errors"]

C = grpc.StatusCode


class WorkerError(EdgeError):
    """Something a worker refuses; its class decides the status code (see STATUS_CODES)."""


class BadRequest(WorkerError):
    """A request's plain fields are out of range (an id, a StageConfig field, an upload's
    framing, a Calibrate's seconds)."""


class NotConfigured(WorkerError):
    """A request came before any Configure: the worker has no stage."""


class StaleEpoch(WorkerError):
    """A request belongs to another pipeline epoch than the one served."""


class ProtocolMismatch(WorkerError):
    """The coordinator speaks another wire protocol version."""


class OverBudget(WorkerError):
    """The plan predicts more memory for the stage than this worker's budget."""


class QueueFull(WorkerError):
    """``max_queue`` requests wait for compute already."""


class Busy(WorkerError):
    """A benchmark was asked of a worker that is serving requests."""


class OwnedElsewhere(WorkerError):
    """Another, live coordinator owns this worker (see ``events.EventBus.refusal``)."""


class TakenOver(WorkerError):
    """This coordinator's worker was taken over by another one."""


class Replaced(WorkerError):
    """A Subscribe stream replaced by a newer one of the same coordinator."""


class TooManySubscribers(WorkerError):
    """The Subscribe streams of others than the owner are at their limit."""


class CacheUnreadable(WorkerError):
    """A cached file the stage needs cannot be read."""


class DigestMismatch(WorkerError):
    """A cached file no longer matches the plan's digest (tampered with, or rotted)."""


class ShardLoadError(WorkerError):
    """onnxruntime cannot load the shard."""


class NextHopRefused(WorkerError):
    """The channel to the next worker cannot be made as secured as this worker's."""


class PositionMismatch(WorkerError):
    """A generation step's position is not the length this stage caches for its sequence
    (a replay of a step already run, or one that skips steps)."""


class TooManySequences(WorkerError):
    """A new sequence came while the stage holds caches for ``max_sequences`` already."""


class ContextExceeded(WorkerError):
    """A step would make its sequence longer than the stage's context."""


class NotAllowed(WorkerError):
    """A direct client (a client-role certificate) asked for more than a direct client may:
    Forward to a stage other than the first, or without a ``reply_to``; another Subscribe
    than its own results' at the last stage."""


# The first class in the error's method resolution order that is here decides. UploadError
# carries its kind: a dict from kind to code.
STATUS_CODES: dict[type[Exception], grpc.StatusCode | dict[str, grpc.StatusCode]] = {
    TensorError: C.INVALID_ARGUMENT,        # ShardMismatch too: it is a TensorError
    BadRequest: C.INVALID_ARGUMENT,
    ShardLoadError: C.INVALID_ARGUMENT,
    NotConfigured: C.FAILED_PRECONDITION,
    StaleEpoch: C.FAILED_PRECONDITION,
    ProtocolMismatch: C.FAILED_PRECONDITION,
    OwnedElsewhere: C.FAILED_PRECONDITION,
    Busy: C.FAILED_PRECONDITION,
    CacheUnreadable: C.FAILED_PRECONDITION,
    NextHopRefused: C.FAILED_PRECONDITION,
    PositionMismatch: C.FAILED_PRECONDITION,
    ContextExceeded: C.INVALID_ARGUMENT,
    OverBudget: C.RESOURCE_EXHAUSTED,
    QueueFull: C.RESOURCE_EXHAUSTED,
    TooManySequences: C.RESOURCE_EXHAUSTED,
    TooManySubscribers: C.RESOURCE_EXHAUSTED,
    DigestMismatch: C.DATA_LOSS,
    TakenOver: C.ABORTED,
    Replaced: C.CANCELLED,
    NotAllowed: C.PERMISSION_DENIED,
    UploadError: {
        "invalid": C.INVALID_ARGUMENT,
        "corrupt": C.DATA_LOSS,
        "missing": C.FAILED_PRECONDITION,
        "exhausted": C.RESOURCE_EXHAUSTED,
        "unwritable": C.FAILED_PRECONDITION,
    },
}

# A request that fails on the compute thread is no call to end: its failure goes to the
# coordinator as an event with this code, by ``stage.describe_ort_error``'s kind
# (anything else: INTERNAL).
RUN_FAILURE_CODES = {"invalid": C.INVALID_ARGUMENT, "exhausted": C.RESOURCE_EXHAUSTED}

_MAPPED = tuple(STATUS_CODES)
QUEUE_FULL_PUSHBACK_MS = 50  # a full queue's PUSHBACK: retry after this many ms


def status_code(e: BaseException) -> grpc.StatusCode | None:
    """The status code :data:`STATUS_CODES` gives ``e``, or None if it gives none."""
    for cls in type(e).__mro__:
        code = STATUS_CODES.get(cls)
        if isinstance(code, dict):
            return code.get(getattr(e, "kind", ""), C.INTERNAL)
        if code is not None:
            return code
    return None


def grpc_errors(handler: Callable) -> Callable:
    """Wrap a servicer method ``(self, request, context)``: an error of the table ends the
    call with its status code and its message; a streaming (generator) handler's too.

    The call is aborted after the ``except`` block, not in it: the error (and its
    traceback, whose frames hold the request and its tensors) is then freed at once
    instead of riding along as the abort's ``__context__``.
    """
    if inspect.isgeneratorfunction(handler):
        @functools.wraps(handler)
        def stream(self, request, context):
            try:
                yield from handler(self, request, context)
                return
            except _MAPPED as e:
                failure = (status_code(e), str(e))
            context.abort(*failure)

        return stream

    @functools.wraps(handler)
    def unary(self, request, context):
        try:
            return handler(self, request, context)
        except QueueFull as e:
            # The one refusal for size that passes: gRPC's own "retry after" tells clients
            # (and gRPC's retry policy) so; any other RESOURCE_EXHAUSTED is final.
            context.set_trailing_metadata(((PUSHBACK, str(QUEUE_FULL_PUSHBACK_MS)),))
            failure = (status_code(e), str(e))
        except _MAPPED as e:
            failure = (status_code(e), str(e))
        context.abort(*failure)

    return unary
