"""A client of the coordinator's Infer RPC, for `edge infer`, the demo and applications.

Retries come in two layers. gRPC's own retry policy (the channel's service config) sends
a call again at once when the coordinator answers UNAVAILABLE or the connection drops: a
blip costs milliseconds and no Python. A coordinator that restarts is gone for seconds,
longer than gRPC's at most five attempts cover, so :class:`InferClient` keeps trying for
``retry_for`` seconds (15 by default) with backoff: a restart of a few seconds loses no
request. Inference has no side effects, so a request sent twice is answered twice, the
same.
"""

from __future__ import annotations

import json
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

# Safe to retry: the request was not accepted (overload), the pipeline was down, or the
# coordinator stopped while it had the call (a restart cancels the calls that raced in).
# This client never cancels a call itself, so a CANCELLED came from the server.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.CANCELLED)
# Trailing metadata of a refusal that the same request will always get (too large for a
# device): not retried whatever its code. The server also sends gRPC's own
# ``grpc-retry-pushback-ms: -1``, which stops the channel's retry policy.
NO_RETRY = "edge-no-retry"
PUSHBACK = "grpc-retry-pushback-ms"

# gRPC's retry policy for every call to the coordinator (gRPC allows at most 5 attempts).
_SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{"service": "edge.v1.Coordinator"}],
    "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.1s", "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED", "CANCELLED"]}}]})


class InferClient:
    """Talks to ``edge coordinator``.

    Args:
        address: the coordinator's ``host:port``.
        timeout: deadline of one Infer call, in seconds.
        retry_for: seconds to keep retrying the codes in ``RETRYABLE`` (a coordinator
            restarting, a pipeline recovering, full queues), with backoff.
        retries: at most this many attempts after the first (None: as many as
            ``retry_for`` allows; 0: none at all, gRPC's own retries included).
        security: a bundle (``Security.from_dir``) when the coordinator runs with
            ``--certs``; the default, plaintext, reaches a loopback coordinator only.
    """

    def __init__(self, address: str, timeout: float = 120.0, retries: int | None = None,
                 security: Security = Security(), retry_for: float = 15.0):
        options = [("grpc.service_config", _SERVICE_CONFIG)] if retries != 0 else \
            [("grpc.enable_retries", 0)]
        self.channel = create_channel(address, security=security, options=options)
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self.timeout = timeout
        self.retries = retries
        self.retry_for = retry_for

    def infer_raw(self, inputs: Mapping[str, np.ndarray]) -> pb.InferReply:
        request = pb.InferRequest(inputs=encode_tensors(inputs))
        start = time.monotonic()
        attempt = 0
        while True:
            try:
                return self.stub.Infer(request, timeout=self.timeout)
            except grpc.RpcError as e:
                final = any(k == NO_RETRY for k, _ in (e.trailing_metadata() or ()))
                if e.code() not in RETRYABLE or final or attempt == self.retries:
                    raise
                # Exponential backoff with jitter, so that clients refused together do
                # not all come back together.
                delay = min(2.0, 0.1 * 2 ** attempt) * random.uniform(0.5, 1.0)
                if time.monotonic() - start + delay > self.retry_for:
                    raise
                time.sleep(delay)
                attempt += 1

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
