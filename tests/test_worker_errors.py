"""The worker's one table from typed errors to gRPC status codes, and the decorator its
handlers use. No server: the servicer's own behaviour is tested in test_worker.py and
test_fuzz.py."""

from __future__ import annotations

import inspect

import grpc
import pytest

from edge.errors import EdgeError, TensorError
from edge.worker import errors
from edge.worker.cache import UploadError
from edge.worker.errors import STATUS_CODES, grpc_errors, status_code
from edge.worker.stage import ShardMismatch

C = grpc.StatusCode


class _Aborted(Exception):
    pass


class _Context:
    """What grpc's ServicerContext.abort does: record, then raise."""

    def __init__(self):
        self.aborted = None
        self.trailing = ()

    def set_trailing_metadata(self, metadata):
        self.trailing = tuple(metadata)

    def abort(self, code, details):
        self.aborted = (code, details)
        raise _Aborted(details)


def test_every_worker_error_has_a_status_code():
    defined = [obj for obj in vars(errors).values()
               if inspect.isclass(obj) and issubclass(obj, errors.WorkerError)
               and obj is not errors.WorkerError]
    assert len(defined) >= 10
    missing = [cls.__name__ for cls in defined if cls not in STATUS_CODES]
    assert not missing, f"not in STATUS_CODES: {missing}"
    assert all(issubclass(cls, EdgeError) for cls in STATUS_CODES)


@pytest.mark.parametrize("error, code", [
    (TensorError("x"), C.INVALID_ARGUMENT),
    (ShardMismatch("x"), C.INVALID_ARGUMENT),
    (errors.NotConfigured("x"), C.FAILED_PRECONDITION),
    (errors.QueueFull("x"), C.RESOURCE_EXHAUSTED),
    (errors.OverBudget("x"), C.RESOURCE_EXHAUSTED),
    (errors.OwnedElsewhere("x"), C.FAILED_PRECONDITION),
    (errors.TakenOver("x"), C.ABORTED),
    (errors.DigestMismatch("x"), C.DATA_LOSS),
    (UploadError("invalid", "x"), C.INVALID_ARGUMENT),
    (UploadError("corrupt", "x"), C.DATA_LOSS),
    (UploadError("missing", "x"), C.FAILED_PRECONDITION),
    (UploadError("exhausted", "x"), C.RESOURCE_EXHAUSTED),
    (UploadError("unwritable", "x"), C.FAILED_PRECONDITION),
    (ValueError("x"), None),
])
def test_status_code(error, code):
    assert status_code(error) == code


class _Servicer:
    @grpc_errors
    def Unary(self, request, context):
        raise request

    @grpc_errors
    def Stream(self, request, context):
        yield 1
        raise request


def test_decorated_handlers_abort_with_the_code_and_the_message_unchanged():
    servicer = _Servicer()
    context = _Context()
    with pytest.raises(_Aborted):
        servicer.Unary(errors.QueueFull("stage 0 has 64 requests queued"), context)
    assert context.aborted == (C.RESOURCE_EXHAUSTED, "stage 0 has 64 requests queued")
    # A full queue, alone of the RESOURCE_EXHAUSTED refusals, says to retry (and when).
    assert context.trailing == (("grpc-retry-pushback-ms", "50"),)
    context = _Context()
    with pytest.raises(_Aborted):
        servicer.Unary(errors.OverBudget("too large"), context)
    assert context.aborted[0] == C.RESOURCE_EXHAUSTED and context.trailing == ()
    context = _Context()
    stream = servicer.Stream(errors.Replaced("replaced"), context)
    assert next(stream) == 1
    with pytest.raises(_Aborted):
        next(stream)
    assert context.aborted == (C.CANCELLED, "replaced")


def test_errors_outside_the_table_pass_through():
    context = _Context()
    with pytest.raises(KeyError):
        _Servicer().Unary(KeyError("bug"), context)
    assert context.aborted is None
