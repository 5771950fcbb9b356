"""Direct clients: requests go from the client to the first stage and come back from the
last, the coordinator only telling the route; nothing is lost when a device dies."""

from __future__ import annotations

import queue
import signal
from contextlib import contextmanager
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

import edge

from edge.coordinator.direct import DirectClient
from edge.coordinator.server import start_coordinator
from edge.export import example_inputs
from edge.proto import edge_pb2 as pb
from edge.proto import edge_pb2_grpc as pb_grpc
from edge.transport.channels import create_channel
from edge.transport.codec import decode_tensors, encode_tensors
from helpers import Events, assert_close, local_pipeline, references, until

TOL = 1e-4


def cases(n: int = 8) -> list[dict]:
    """Requests of different shapes, so that a mixed-up answer cannot pass."""
    shapes = [(1, 16), (2, 9), (1, 24), (3, 5)]
    return [example_inputs("bert", "tiny", batch=b, seq=s, seed=i)
            for i, (b, s) in enumerate(shapes * (n // len(shapes)))]


@pytest.fixture
def inputs_and_refs(bert_tiny):
    inputs = cases()
    return inputs, references(bert_tiny, inputs)


@contextmanager
def served(model, count: int, root):
    """``count`` local workers, a plan over them and its coordinator's server; yields
    (workers, plan, pipeline, the server's address)."""
    with local_pipeline(model, count, root) as (workers, plan, pipeline):
        server, port = start_coordinator(pipeline, "127.0.0.1:0")
        try:
            yield workers, plan, pipeline, f"127.0.0.1:{port}"
        finally:
            server.stop(0).wait()


def test_direct_requests_equal_the_model_without_the_coordinator(bert_tiny, tmp_path,
                                                                 inputs_and_refs):
    inputs, want = inputs_and_refs
    with served(bert_tiny, 3, tmp_path) as (workers, plan, pipeline, address):
        with DirectClient(address, timeout=60) as client:
            with ThreadPoolExecutor(4) as pool:
                got = list(pool.map(client.infer, inputs * 3))
            for i, g in enumerate(got):
                assert_close(g, want[i % len(inputs)], TOL, str(i))
            reply = client.infer_raw(inputs[0])
            assert [t.stage for t in reply.timings] == [0, 1, 2]
            assert reply.latency_ms > 0
        # The coordinator served none of them; the last stage told it they flowed.
        assert pipeline.requests_done == 0
        until(lambda: pipeline.status().requests_direct >= 1, 5, "a delivered count")


def test_a_client_hears_only_its_own_results(bert_tiny, tmp_path, inputs_and_refs):
    """Two clients on one last stage: each result goes to the client that sent it; a
    stranger's stream hears none of another's, and a result whose client has no stream
    is dropped."""
    inputs, want = inputs_and_refs
    with served(bert_tiny, 2, tmp_path) as (workers, plan, pipeline, address):
        with DirectClient(address, timeout=60) as a, DirectClient(address, timeout=60) as b:
            with ThreadPoolExecutor(4) as pool:
                fa = [pool.submit(a.infer, x) for x in inputs]
                fb = [pool.submit(b.infer, x) for x in reversed(inputs)]
                got_a = [f.result() for f in fa]
                got_b = [f.result() for f in fb]
            for i, g in enumerate(got_a):
                assert_close(g, want[i], TOL, f"a{i}")
            for i, g in enumerate(got_b):
                assert_close(g, want[len(inputs) - 1 - i], TOL, f"b{i}")
        # A stranger's stream: the empty event that opens it, then nothing of theirs.
        last, first = (f"127.0.0.1:{w.port}" for w in (workers.workers[1],
                                                          workers.workers[0]))
        with create_channel(last) as ch_last, create_channel(first) as ch_first:
            events = Events(pb_grpc.WorkerStub(ch_last),
                            pb.SubscribeRequest(client_id="stranger"))
            assert events.next().WhichOneof("kind") is None
            pb_grpc.WorkerStub(ch_first).Forward(pb.Activation(
                request_id="nobody-listens", epoch=pipeline.epoch,
                tensors=encode_tensors(inputs[0]), reply_to="gone"), timeout=10)
            with DirectClient(address, timeout=60) as c:  # flows after it
                assert_close(c.infer(inputs[1]), want[1], TOL, "after")
            with pytest.raises(queue.Empty):
                events.next(timeout=0.5)
            events.close()


@pytest.mark.parametrize("victim", [1, 3], ids=["middle-stage", "last-stage"])
def test_a_sigkill_loses_no_direct_request(bert_tiny, tmp_path, inputs_and_refs, victim):
    """A device dies with requests in flight: the coordinator re-plans over the rest and
    tells the new route; the client sends what it had in flight again (when the last stage
    dies, to a new last stage whose stream it opens)."""
    inputs, want = inputs_and_refs
    with served(bert_tiny, 4, tmp_path) as (workers, plan, pipeline, address):
        dead = workers.workers[victim]
        with DirectClient(address, timeout=90, resend_after=20) as client:
            def one(i: int):
                if i == 40:
                    dead.process.send_signal(signal.SIGKILL)
                    dead.process.wait()
                return i, client.infer(inputs[i % len(inputs)])

            with ThreadPoolExecutor(4) as pool:
                results = list(pool.map(one, range(120)))
        assert len(results) == 120
        for i, got in results:
            assert_close(got, want[i % len(inputs)], TOL, str(i))
        [r] = pipeline.recoveries
        assert r.lost == (f"rpi4b-2gb-{victim + 1}",) and r.how == "re-planned"


def test_a_route_stream_and_edge_infer_direct(bert_tiny, tmp_path):
    with served(bert_tiny, 2, tmp_path) as (workers, plan, pipeline, address):
        x = example_inputs("bert", "tiny", batch=2, seq=7, seed=4)
        np.savez(tmp_path / "in.npz", **x)
        r = subprocess.run([sys.executable, "-m", "edge", "infer", "--coordinator", address,
                            "--direct", "--input", str(tmp_path / "in.npz"),
                            "--output", str(tmp_path / "out.npz")],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        with np.load(tmp_path / "out.npz") as f:
            assert_close(dict(f), references(bert_tiny, [x])[0], TOL, "edge infer --direct")
        with edge.DirectClient(address, timeout=60) as client:  # the Python API's
            assert_close(client(x), references(bert_tiny, [x])[0], TOL, "edge.DirectClient")
        with create_channel(address) as ch:
            call = pb_grpc.CoordinatorStub(ch).WatchRoute(pb.RouteRequest(), timeout=30)
            route = next(call)
            assert route.epoch == pipeline.epoch and route.stages == 2
            assert route.first_address == plan.stages[0].device.address
            assert route.last_address == plan.stages[1].device.address
            assert route.unavailable == ""
            call.cancel()


def test_a_direct_request_with_bad_inputs_is_refused_at_once(bert_tiny, tmp_path):
    with served(bert_tiny, 2, tmp_path) as (workers, plan, pipeline, address):
        with DirectClient(address, timeout=30) as client:
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                client.infer({"input_ids": example_inputs("bert", "tiny")["input_ids"]})
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "attention_mask" in e.value.details()
            assert time.monotonic() - start < 10
            x = example_inputs("bert", "tiny", batch=1, seq=8, seed=3)
            assert decode_tensors(client.infer_raw(x).outputs)  # still serves


def test_the_event_bus_routes_direct_results_and_reports_their_count(monkeypatch):
    """A result with a reply_to goes to that client's newest stream only; the owner gets
    the delivered count, at most every PROGRESS_S; none without a stream is dropped."""
    from edge.worker import events as ev
    from edge.worker.errors import TooManySubscribers

    bus = ev.EventBus()
    bus.claim("coord", "plan p")
    owner = bus.subscribe("coord", limit=2)
    old = bus.subscribe("", limit=2, client_id="a")
    a = bus.subscribe("", limit=2, client_id="a")   # replaces the older one of "a"
    assert old.queue.get_nowait() == pb.Event() and old.queue.get_nowait() is ev.END
    b = bus.subscribe("", limit=2, client_id="b")
    with pytest.raises(TooManySubscribers):  # clients count among the limited streams
        bus.subscribe("", limit=2, client_id="c")
    for s in (a, b):
        assert s.queue.get_nowait() == pb.Event()  # "your stream is open"

    clock = [100.0]
    monkeypatch.setattr(ev.time, "monotonic", lambda: clock[0])
    result = pb.Event(result=pb.Activation(request_id="r1"))
    bus.answer(result, "a")
    assert a.queue.get_nowait() == result and b.queue.empty()
    assert owner.queue.get_nowait() == pb.Event(delivered=1)
    bus.answer(pb.Event(result=pb.Activation(request_id="r2")), "b")
    assert b.queue.get_nowait().result.request_id == "r2"
    assert owner.queue.empty()  # within PROGRESS_S of the last report
    clock[0] += ev.PROGRESS_S
    assert not bus.deliver("gone", result) and bus.undelivered == 1
    bus.answer(pb.Event(result=pb.Activation(request_id="r3")), "a")
    assert owner.queue.get_nowait() == pb.Event(delivered=3)
    bus.answer(pb.Event(result=pb.Activation(request_id="r4")), "")  # the coordinator's
    assert owner.queue.get_nowait().result.request_id == "r4"
    assert a.queue.get_nowait().result.request_id == "r3" and a.queue.empty()


def test_without_a_coordinator_a_request_times_out_saying_so():
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with DirectClient(f"127.0.0.1:{port}", timeout=1.0) as client:
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            client.infer(example_inputs("bert", "tiny"))
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no result within 1 s after 0 send(s)" in e.value.details()
        assert "the coordinator's route: UNAVAILABLE" in e.value.details()
        assert time.monotonic() - start < 5
