"""The coordinator's gRPC face: Infer, Generate and cluster status, over a :class:`Pipeline`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from edge.coordinator import metrics
from edge.coordinator.client import NO_RETRY
from edge.coordinator.generate import Generator
from edge.coordinator.pipeline import InferError, Pipeline
from edge.errors import TensorError
from edge.proto import edge_pb2 as pb
from edge.proto import edge_pb2_grpc as pb_grpc
from edge.coordinator.guard import largest_request_bytes
from edge.transport.channels import (MAX_MESSAGE_BYTES, MIN_RECEIVE_BYTES, PUSHBACK,
                                     create_server, catch_stop_signals, wait_for_signal)
from edge.transport import systemd
from edge.transport.codec import decode_tensors
from edge.transport.services import add_service

__all__ = ["CoordinatorServicer", "start_coordinator", "serve", "receive_limit"]

log = logging.getLogger(__name__)

ROUTE_REREAD_S = 30.0  # a WatchRoute stream re-reads the route this often without news


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(self, pipeline: Pipeline, generator: Generator | None = None):
        self.pipeline = pipeline
        self.generator = generator or Generator(pipeline)

    async def Infer(self, request: pb.InferRequest, context) -> pb.InferReply:
        # On the server's event loop: the request is sent to the first stage and answered
        # by the last stage's event there too, without a thread of its own.
        try:
            arrays = decode_tensors(request.inputs)
        except TensorError as e:
            metrics.count_request("infer")  # counted by the pipeline once it gets there
            metrics.count_error("infer", grpc.StatusCode.INVALID_ARGUMENT)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        remaining = context.time_remaining()
        try:
            result = await self.pipeline.infer_async(arrays, timeout=remaining)
        except InferError as e:
            if not e.retryable:
                context.set_trailing_metadata(((NO_RETRY, "1"), (PUSHBACK, "-1")))
            await context.abort(e.code, str(e))
        return pb.InferReply(request_id=result.request_id, outputs=result.outputs,
                             timings=result.timings, latency_ms=result.latency_ms)

    def Generate(self, request: pb.GenerateRequest, context):
        """Stream the tokens and text of a generation, then a last reply with the usage.
        A client that goes away cancels the sequence and frees its caches."""
        try:
            generation = self.generator.start_request(request)
        except InferError as e:
            context.abort(e.code, str(e))
        context.add_callback(generation.cancel)
        try:
            for chunk in generation:
                yield chunk.to_proto()
        except InferError as e:
            if not e.retryable:
                context.set_trailing_metadata(((NO_RETRY, "1"), (PUSHBACK, "-1")))
            context.abort(e.code, str(e))

    async def WatchRoute(self, request: pb.RouteRequest, context):
        """The route for direct clients now, then again each time it changes (a failover,
        serving stops or resumes). A waiting stream holds no thread and costs nothing."""
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def wake(_why: str) -> None:
            loop.call_soon_threadsafe(changed.set)

        unwatch = self.pipeline.watch_serving(wake)
        try:
            last = None
            while True:
                changed.clear()
                route = self.pipeline.route()
                if route != last:
                    yield route
                    last = route
                with contextlib.suppress(asyncio.TimeoutError):
                    # A change is told at once; the timeout only re-reads the route.
                    await asyncio.wait_for(changed.wait(), ROUTE_REREAD_S)
        finally:
            unwatch()

    def GetClusterStatus(self, request, context) -> pb.ClusterStatus:
        return self.pipeline.status()

    def GetClusterProfile(self, request: pb.ProfileRequest, context) -> pb.ClusterProfile:
        if not (math.isfinite(request.since) and request.since >= 0):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"since: expected a unix time in seconds >= 0 (0: all samples), "
                          f"got {request.since}")
        return self.pipeline.profile(request.since)


def receive_limit(plan) -> int:
    """The largest request message the coordinator's server takes: the plan's largest
    Infer (``guard.largest_request_bytes``), so that a larger one is refused before it is
    buffered; channels' MAX_MESSAGE_BYTES for a plan that does not bound it. A re-plan
    after a failover keeps the bound the server started with."""
    limit = largest_request_bytes(plan)
    if limit is None:
        log.info("the plan does not bound request sizes; taking messages up to %d MiB",
                 MAX_MESSAGE_BYTES >> 20)
        return MAX_MESSAGE_BYTES
    return max(limit, MIN_RECEIVE_BYTES)


def start_coordinator(pipeline: Pipeline, listen: str, max_batch: int | None = None,
                      generator: Generator | None = None) -> tuple[grpc.Server, int]:
    """Serve an already started pipeline on ``listen``. Returns the server and its port.

    The server runs on the process's event loop (``create_server(on_loop=True)``): an
    Infer is served there, holding no thread while its request is in flight. Each
    Generate holds a thread while it streams: one per request the pipeline accepts, a few
    more for status and profile calls, and no queue beyond them.
    ``max_batch``: decode steps run as one batch at most (see :class:`Generator`).
    ``generator``: the token loop to share with another face (the HTTP API), so that the
    sequences holding caches stay within the plan's count across both (it then has its
    own ``max_batch``).
    """
    threads = pipeline.max_in_flight + 8
    server, port = create_server(listen, max_workers=threads, max_concurrent_rpcs=threads,
                                 security=pipeline.security,
                                 max_receive_bytes=receive_limit(pipeline.plan),
                                 on_loop=True)
    generator = generator or Generator(pipeline, max_batch=max_batch)
    add_service(server, CoordinatorServicer(pipeline, generator), pb, "Coordinator")
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.start()

    def serving(why: str) -> None:
        # NOT_SERVING while no request can be served: nothing fits on the devices that
        # answer, or another coordinator took the workers over.
        status = (health_pb2.HealthCheckResponse.NOT_SERVING if why
                  else health_pb2.HealthCheckResponse.SERVING)
        for name in ("", "edge.v1.Coordinator"):
            health_servicer.set(name, status)

    pipeline.watch_serving(serving)
    return server, port


def serve(pipeline: Pipeline, listen: str, on_ready=None, grace: float = 5.0,
          max_batch: int | None = None, generator: Generator | None = None,
          on_stop=None) -> None:
    """Serve until SIGTERM/SIGINT, then let calls in flight finish (``max_batch``,
    ``generator``: see :func:`start_coordinator`); ``on_stop()`` stops another face (the
    HTTP API) during the same grace, before the pipeline closes under its requests."""
    stop = catch_stop_signals()  # before anyone is told we are ready
    server, port = start_coordinator(pipeline, listen, max_batch, generator)
    if on_ready:
        on_ready(port)
    # Deployed and serving: under systemd (Type=notify) the unit counts as started now.
    systemd.ready(f"serving {pipeline.plan.model.name} over {len(pipeline.plan.stages)} "
                  f"workers on port {port}")
    try:
        wait_for_signal(stop)
        systemd.stopping()
    finally:
        stopped = server.stop(grace)
        try:
            if on_stop:
                on_stop()
        finally:
            stopped.wait()
            pipeline.close()
