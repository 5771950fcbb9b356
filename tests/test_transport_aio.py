"""The coordinator's long-lived calls on the event loop (edge.transport.aio): the event stream
and health checks against a real gRPC server, with the cluster token."""

from __future__ import annotations

import queue
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from edge.coordinator.workers import GrpcWorker, grpc_workers
from edge.proto import edge_pb2 as pb
from edge.proto import edge_pb2_grpc as pb_grpc
from edge.transport.aio import AioLink
from edge.transport.channels import Security, create_server
from edge.transport.services import add_service

TOKEN = "s3cret-token"


class _Worker(pb_grpc.WorkerServicer):
    """Streams what the test puts in ``events`` (None ends the stream)."""

    def __init__(self):
        self.events: queue.SimpleQueue = queue.SimpleQueue()

    def Subscribe(self, request, context):
        while context.is_active():
            try:
                event = self.events.get(timeout=0.05)
            except queue.Empty:
                continue
            if event is None:
                return  # the worker ends the stream
            yield event


@pytest.fixture
def worker():
    servicer = _Worker()
    server, port = create_server("127.0.0.1:0", security=Security.plaintext(TOKEN))
    add_service(server, servicer, pb, "Worker")
    checks = health.HealthServicer()
    checks.set("edge.v1.Worker", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def test_the_event_stream_yields_in_order_and_ends_with_the_worker(worker):
    servicer, address = worker
    link = AioLink(address, Security.plaintext(TOKEN))
    try:
        stream = link.subscribe(pb.SubscribeRequest(coordinator_id="c"))
        for i in range(3):
            servicer.events.put(pb.Event(result=pb.Activation(request_id=f"r{i}")))
        servicer.events.put(None)
        assert [e.result.request_id for e in stream] == ["r0", "r1", "r2"]
    finally:
        link.close()


def test_closing_the_link_breaks_a_waiting_stream_with_cancelled(worker):
    _, address = worker
    link = AioLink(address, Security.plaintext(TOKEN))
    stream = link.subscribe(pb.SubscribeRequest(coordinator_id="c"))
    caught: list[grpc.RpcError] = []

    def read() -> None:
        try:
            for _ in stream:
                pass
        except grpc.RpcError as e:
            caught.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.2)  # the reader blocks on the stream
    link.close()
    reader.join(5)
    assert not reader.is_alive()
    assert [e.code() for e in caught] == [grpc.StatusCode.CANCELLED]


def test_a_stream_refused_for_its_token_raises_unauthenticated(worker):
    _, address = worker
    link = AioLink(address, Security.plaintext("another-token"))
    try:
        with pytest.raises(grpc.RpcError) as e:
            next(link.subscribe(pb.SubscribeRequest(coordinator_id="c")))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        link.close()


def test_a_pooled_worker_listens_and_checks_health_over_the_event_loop(worker):
    servicer, address = worker
    client = grpc_workers(Security.plaintext(TOKEN))(address)
    link = client.stubs
    try:
        assert link.aio is not None
        status = client.health(5.0).result(10)
        assert status == health_pb2.HealthCheckResponse.SERVING
        stream = client.subscribe("c")
        servicer.events.put(pb.Event(result=pb.Activation(request_id="r9")))
        assert next(stream).result.request_id == "r9"
    finally:
        link.close()
    # A closed link answers a health check with an error rather than hanging.
    with pytest.raises(grpc.RpcError):
        GrpcWorker(link, address).health(1.0).result(10)
