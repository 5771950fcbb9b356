"""The coordinator's long-lived calls on the event loop (edge.transport.aio): the event stream
and health checks against a real gRPC server, with the cluster token."""

from __future__ import annotations

import queue
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from edge.coordinator.workers import GrpcWorker, Link, grpc_workers
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


def test_results_are_taken_on_the_loop_and_the_rest_reach_the_iterator(worker):
    servicer, address = worker
    client = GrpcWorker(Link.open(address, Security.plaintext(TOKEN), on_loop=True), address)
    taken: list[tuple[str, str]] = []
    try:
        stream = client.subscribe("c", lambda e: taken.append(
            (e.result.request_id, threading.current_thread().name)))
        servicer.events.put(pb.Event(result=pb.Activation(request_id="r0")))
        servicer.events.put(pb.Event(failure=pb.Failure(request_id="f0", message="x")))
        servicer.events.put(pb.Event(result=pb.Activation(request_id="r1")))
        servicer.events.put(None)
        assert [e.failure.request_id for e in stream] == ["f0"]
        assert taken == [("r0", "edge-grpc-loop"), ("r1", "edge-grpc-loop")]
    finally:
        client.close()


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


# ---------------------------------------------------------------- the server on the loop


class _Coordinator(pb_grpc.CoordinatorServicer):
    """A coroutine Infer and a synchronous Generate, as the coordinator has."""

    def __init__(self):
        self.infer_threads: list[str] = []
        self.closed = threading.Event()
        self.called_back = threading.Event()

    async def Infer(self, request, context):
        self.infer_threads.append(threading.current_thread().name)
        if not request.inputs:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "inputs: expected some")
        return pb.InferReply(request_id="r-" + request.inputs[0].name)

    def Generate(self, request, context):
        if request.max_tokens < 1:
            context.set_trailing_metadata((("edge-no-retry", "1"),))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"max_tokens: expected at least 1, got {request.max_tokens}")
        context.add_callback(self.called_back.set)
        try:
            for i in range(request.max_tokens):
                time.sleep(0.02)
                yield pb.GenerateReply(tokens=[i])
        finally:
            self.closed.set()


@pytest.fixture
def loop_server():
    servicer = _Coordinator()
    server, port = create_server("127.0.0.1:0", security=Security.plaintext(TOKEN),
                                 max_workers=2, on_loop=True)
    add_service(server, servicer, pb, "Coordinator")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield servicer, pb_grpc.CoordinatorStub(channel)
    finally:
        channel.close()
        assert server.stop(0).wait(10)


AUTH = (("authorization", f"Bearer {TOKEN}"),)


def test_a_coroutine_method_runs_on_the_loop_and_more_calls_than_threads_run_at_once(
        loop_server):
    servicer, stub = loop_server
    calls = [stub.Infer.future(pb.InferRequest(inputs=[pb.Tensor(name=f"x{i}")]),
                               metadata=AUTH, timeout=10) for i in range(8)]
    assert sorted(c.result().request_id for c in calls) == sorted(f"r-x{i}" for i in range(8))
    assert set(servicer.infer_threads) == {"edge-grpc-loop"}
    with pytest.raises(grpc.RpcError) as e:
        stub.Infer(pb.InferRequest(), metadata=AUTH, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs: expected some" in e.value.details()


def test_a_synchronous_stream_on_the_loop_streams_aborts_and_is_closed_when_cancelled(
        loop_server):
    servicer, stub = loop_server
    replies = list(stub.Generate(pb.GenerateRequest(max_tokens=3), metadata=AUTH, timeout=10))
    assert [list(r.tokens) for r in replies] == [[0], [1], [2]]
    # An abort before the first message ends the call with its status and trailing metadata.
    call = stub.Generate(pb.GenerateRequest(max_tokens=0), metadata=AUTH, timeout=10)
    with pytest.raises(grpc.RpcError) as e:
        list(call)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_tokens: expected at least 1, got 0" in e.value.details()
    assert ("edge-no-retry", "1") in tuple(e.value.trailing_metadata())
    # A client that goes away: the handler's callback runs and its generator is closed.
    servicer.closed.clear()
    call = stub.Generate(pb.GenerateRequest(max_tokens=1000), metadata=AUTH, timeout=30)
    assert list(next(call).tokens) == [0]
    call.cancel()
    assert servicer.called_back.wait(5) and servicer.closed.wait(5)


def test_the_loop_server_refuses_a_wrong_token_on_unary_and_stream_methods(loop_server):
    _, stub = loop_server
    bad = (("authorization", "Bearer nope"),)
    for call in (lambda: stub.Infer(pb.InferRequest(inputs=[pb.Tensor(name="x")]),
                                    metadata=bad, timeout=10),
                 lambda: list(stub.Generate(pb.GenerateRequest(max_tokens=2), metadata=bad,
                                            timeout=10))):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "does not match" in e.value.details()
