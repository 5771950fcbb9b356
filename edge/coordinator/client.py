"""A client of the coordinator's Infer and Generate RPCs, for `edge infer`, `edge generate`,
the demo and applications.

Retries come in two layers. gRPC's own retry policy (the channel's service config) sends
a call again at once when the coordinator answers UNAVAILABLE or the connection drops: a
blip costs milliseconds and no Python. A coordinator that restarts is gone for seconds,
longer than gRPC's at most five attempts cover, so :class:`InferClient` keeps trying for
``retry_for`` seconds (15 by default) with backoff: a restart of a few seconds loses no
request. Inference has no side effects, so a request sent twice is answered twice, the
same. A generation is retried the same way only until its first reply arrives: after
that, text has been handed out, and a sequence started again could differ (sampling).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import grpc
import numpy as np

from edge.proto import edge_pb2 as pb
from edge.proto import edge_pb2_grpc as pb_grpc
from edge.transport.channels import Security, create_channel
from edge.transport.codec import decode_tensors, encode_tensors

__all__ = ["InferClient", "Completion", "NO_RETRY", "RETRYABLE"]

# Safe to retry: the request was not accepted (overload), the pipeline was down, or the
# coordinator stopped while it had the call (a restart cancels the calls that raced in).
# This client never cancels a call itself, so a CANCELLED came from the server.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.CANCELLED)
# Trailing metadata of a refusal that the same request will always get (too large for a
# device): not retried whatever its code. The server also sends gRPC's own
# ``grpc-retry-pushback-ms: -1``, which stops the channel's retry policy.
NO_RETRY = "edge-no-retry"

# gRPC's retry policy for every call to the coordinator (gRPC allows at most 5 attempts).
_SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{"service": "edge.v1.Coordinator"}],
    "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.1s", "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED", "CANCELLED"]}}]})


@dataclass
class Completion:
    """A whole generation: its text, its tokens and the coordinator's usage report."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    ttft_ms: float = 0.0
    tokens_per_s: float = 0.0
    finish_reason: str = ""

    def add(self, reply: pb.GenerateReply) -> None:
        """Take one reply of the stream in."""
        self.text += reply.text
        self.tokens.extend(reply.tokens)
        if reply.HasField("usage"):
            u = reply.usage
            self.prompt_tokens, self.ttft_ms = u.prompt_tokens, u.ttft_ms
            self.tokens_per_s, self.finish_reason = u.tokens_per_s, u.finish_reason

    def to_dict(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "prompt_tokens": self.prompt_tokens,
                "ttft_ms": self.ttft_ms, "tokens_per_s": self.tokens_per_s,
                "finish_reason": self.finish_reason}


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
        start, attempt = time.monotonic(), 0
        while True:
            try:
                return self.stub.Infer(request, timeout=self.timeout)
            except grpc.RpcError as e:
                self._wait_to_retry(e, start, attempt)
                attempt += 1

    def _wait_to_retry(self, error: grpc.RpcError, start: float, attempt: int) -> None:
        """Sleep before attempt ``attempt + 1``, or raise ``error`` if it is not to be
        retried (its code, a no-retry trailer, the retries or ``retry_for`` spent)."""
        final = any(k == NO_RETRY for k, _ in (error.trailing_metadata() or ()))
        if error.code() not in RETRYABLE or final or attempt == self.retries:
            raise error
        # Exponential backoff with jitter, so that clients refused together do not all
        # come back together.
        delay = min(2.0, 0.1 * 2 ** attempt) * random.uniform(0.5, 1.0)
        if time.monotonic() - start + delay > self.retry_for:
            raise error
        time.sleep(delay)

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one request; returns the model's outputs by name."""
        return decode_tensors(self.infer_raw(inputs).outputs)

    def generate_raw(self, prompt: str = "", *, chat: bool = False,
                     prompt_tokens: Sequence[int] = (), max_tokens: int = 0,
                     temperature: float = 0.0, top_p: float = 0.0, top_k: int = 0,
                     seed: int = 0, stop: Sequence[str] = ()) -> Iterator[pb.GenerateReply]:
        """Generate from a prompt; yields the coordinator's replies as they come (tokens
        and the text they add; the last one has the usage). ``timeout`` bounds the whole
        stream.

        Args:
            prompt: the text (tokenized by the coordinator), or ``prompt_tokens`` instead.
            chat: wrap the prompt as one user message in the model's chat template.
            prompt_tokens: token ids, as they are.
            max_tokens: tokens to generate at most (0: up to the plan's context).
            temperature: 0 draws the most likely token; higher draws more freely.
            top_p: draw among the most likely tokens whose probability reaches it (0: all).
            top_k: draw among the k most likely (0: all).
            seed: fixes the draws (0: the coordinator picks one).
            stop: stop when the text reaches one of these (not included).
        """
        request = pb.GenerateRequest(
            prompt=prompt, chat=chat, prompt_tokens=list(prompt_tokens), max_tokens=max_tokens,
            sampling=pb.Sampling(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed),
            stop=list(stop))
        start, attempt = time.monotonic(), 0
        while True:
            received = False
            try:
                for reply in self.stub.Generate(request, timeout=self.timeout):
                    received = True
                    yield reply
                return
            except grpc.RpcError as e:
                if received:  # text was shown already: sending again would repeat it
                    raise
                self._wait_to_retry(e, start, attempt)
                attempt += 1

    def generate_all(self, prompt: str = "", *, on_text: Callable[[str], None] | None = None,
                     **kw) -> Completion:
        """:meth:`generate_raw` gathered into a :class:`Completion`; ``on_text`` is called
        with each piece of text as it comes (same arguments otherwise)."""
        out = Completion()
        for reply in self.generate_raw(prompt, **kw):
            out.add(reply)
            if on_text is not None and reply.text:
                on_text(reply.text)
        return out

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
