"""A client of the coordinator's Infer RPC, for `edge infer`, the demo and applications."""

from __future__ import annotations

import random
import time
from typing import Mapping

import grpc
import numpy as np

from edge.proto import edge_pb2 as pb
from edge.proto import edge_pb2_grpc as pb_grpc
from edge.transport.channels import Security, create_channel
from edge.transport.codec import decode_tensors, encode_tensors

__all__ = ["InferClient", "NO_RETRY", "RETRYABLE"]

# Safe to retry: the request was not accepted (overload) or the pipeline was down.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
# Trailing metadata of a refusal that the same request will always get (too large for a
# device): not retried whatever its code.
NO_RETRY = "edge-no-retry"


class InferClient:
    """Talks to ``edge coordinator``.

    Args:
        address: the coordinator's ``host:port``.
        timeout: deadline of one Infer call, in seconds.
        retries: attempts after the first for the codes in ``RETRYABLE``, with backoff.
        security: a bundle (``Security.from_dir``) when the coordinator runs with
            ``--certs``; the default, plaintext, reaches a loopback coordinator only.
    """

    def __init__(self, address: str, timeout: float = 120.0, retries: int = 3,
                 security: Security = Security()):
        self.channel = create_channel(address, security=security)
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self.timeout = timeout
        self.retries = retries

    def infer_raw(self, inputs: Mapping[str, np.ndarray]) -> pb.InferReply:
        request = pb.InferRequest(inputs=encode_tensors(inputs))
        for attempt in range(self.retries + 1):
            try:
                return self.stub.Infer(request, timeout=self.timeout)
            except grpc.RpcError as e:
                final = any(k == NO_RETRY for k, _ in (e.trailing_metadata() or ()))
                if e.code() not in RETRYABLE or final or attempt == self.retries:
                    raise
                # Exponential backoff with jitter, so that clients refused together do
                # not all come back together.
                time.sleep(min(5.0, 0.1 * 2 ** attempt) * random.uniform(0.5, 1.0))
        raise AssertionError("unreachable")

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one request; returns the model's outputs by name."""
        return decode_tensors(self.infer_raw(inputs).outputs)

    def status(self) -> pb.ClusterStatus:
        return self.stub.GetClusterStatus(pb.ClusterStatusRequest(), timeout=10)

    def profile(self, since: float = 0.0) -> pb.ClusterProfile:
        return self.stub.GetClusterProfile(pb.ProfileRequest(since=since), timeout=30)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "InferClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
