"""Backpressure: past their bounds the worker and the coordinator answer RESOURCE_EXHAUSTED
at once, and what they accepted still completes."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from edge.coordinator.client import InferClient
from edge.coordinator.pipeline import InferError
from edge.coordinator.server import start_coordinator
from edge.export import example_inputs
from edge.build import make_plan
from edge.proto import edge_pb2_grpc as pb_grpc
from edge.transport.channels import Deadlines, create_channel
from edge.worker.launch import spawn_worker
from helpers import local_pipeline, reference
from test_worker import chunks, config, forward, good_inputs, make_shard


def test_worker_queue_is_bounded(tmp_path):
    """A next hop that accepts connections but never answers: the send loop waits, the
    queues fill, and Forward then answers RESOURCE_EXHAUSTED immediately."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        w = spawn_worker(tmp_path / "w", "w0", extra_args=["--max-queue", "2"])
        try:
            with create_channel(w.address) as channel:
                stub = pb_grpc.WorkerStub(channel)
                sha = make_shard(tmp_path / "shard.onnx")
                stub.UploadShard(chunks(sha, (tmp_path / "shard.onnx").read_bytes()), timeout=10)
                stage = config(sha)
                stage.num_stages = 2
                stage.next_address = f"127.0.0.1:{silent.getsockname()[1]}"
                stub.Configure(stage, timeout=30)
                accepted, refused = 0, None
                for i in range(50):
                    try:
                        forward(stub, f"r{i}", good_inputs())
                        accepted += 1
                    except grpc.RpcError as e:
                        refused = e
                        break
                    time.sleep(0.05)  # let the compute thread take it
                assert refused is not None, "50 requests were queued behind a stuck hop"
                assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "2 requests queued" in refused.details()
                # gRPC's "retry after" says it is worth another try (a direct client's
                # cue to back off rather than fail the request).
                assert ("grpc-retry-pushback-ms", "50") in refused.trailing_metadata()
                # one being sent, two in the outbox, two in the compute queue (bounds of 2)
                assert 3 <= accepted <= 6, accepted
                t = time.monotonic()
                with pytest.raises(grpc.RpcError) as e:
                    forward(stub, "again", good_inputs())
                assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() - t < 1.0
            assert w.process.poll() is None
        finally:
            w.stop()


def test_coordinator_bounds_requests_in_flight(bert_tiny, tmp_path):
    x = example_inputs("bert", "tiny", batch=1, seq=16)
    with local_pipeline(bert_tiny, 2, tmp_path, plan_dir=tmp_path, max_in_flight=3,
                        failover=False) as (workers, plan, pipeline):
        stuck = workers.workers[1].process.pid
        server, port = start_coordinator(pipeline, "127.0.0.1:0")
        try:
            pipeline.infer(x)
            os.kill(stuck, signal.SIGSTOP)  # the last stage stops answering
            try:
                with ThreadPoolExecutor(3) as pool:
                    accepted = [pool.submit(pipeline.infer, x) for _ in range(3)]
                    end = time.monotonic() + 10
                    while pipeline.in_flight < 3 and time.monotonic() < end:
                        time.sleep(0.01)
                    t = time.monotonic()
                    with pytest.raises(InferError) as e:
                        pipeline.infer(x)
                    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert time.monotonic() - t < 1.0
                    # Over gRPC too, and a client without retries sees it at once.
                    with InferClient(f"127.0.0.1:{port}", retries=0) as client:
                        with pytest.raises(grpc.RpcError) as e:
                            client.infer(x)
                        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    os.kill(stuck, signal.SIGCONT)
                    for f in accepted:  # everything accepted completes
                        assert f.result(timeout=60).outputs
            finally:
                os.kill(stuck, signal.SIGCONT)
        finally:
            server.stop(1)


def test_client_retries_with_backoff_until_capacity_frees(bert_tiny, tmp_path):
    x = example_inputs("bert", "tiny", batch=1, seq=16)
    with local_pipeline(bert_tiny, 2, tmp_path, plan_dir=tmp_path, max_in_flight=1,
                        failover=False, deadlines=Deadlines()) as (workers, plan, pipeline):
        stuck = workers.workers[1].process.pid
        server, port = start_coordinator(pipeline, "127.0.0.1:0")
        try:
            os.kill(stuck, signal.SIGSTOP)
            first = threading.Thread(target=pipeline.infer, args=(x,))
            first.start()
            while pipeline.in_flight < 1:
                time.sleep(0.01)
            threading.Timer(0.5, os.kill, (stuck, signal.SIGCONT)).start()
            with InferClient(f"127.0.0.1:{port}", retries=6) as client:
                assert client.infer(x)  # refused at first, then let in
            first.join(30)
        finally:
            os.kill(stuck, signal.SIGCONT)
            server.stop(1)


def test_a_request_too_large_for_a_device_is_refused_before_it_reaches_one(bert_tiny,
                                                                          tmp_path,
                                                                          monkeypatch):
    """Beyond the sizes the plan was made for, the coordinator bounds the memory a request
    needs from how the plan says each stage grows, and refuses what a device could not
    hold; smaller excesses are served."""
    import dataclasses

    import numpy as np

    import edge.coordinator.pipeline as pipeline_module
    from edge.coordinator.guard import TooLarge, check_fits, largest
    from edge.planning.plan import load_plan
    from edge.transport.codec import decode_tensors, encode_tensors

    def planned_for_110_mib(devices):
        devices = [dataclasses.replace(d, memory_mb=110) for d in devices]
        make_plan(bert_tiny, devices, tmp_path, bindings={"batch": 1, "sequence": 16},
                  modes=("fp32",))
        plan = load_plan(tmp_path / "plan.json")  # the degrees survive plan.json
        assert all(s.predicted.activation_degrees == {"batch": 1, "sequence": 2}
                   for s in plan.stages)
        # The largest size of each dim that passes, and one more that does not.
        for dim in ("batch", "sequence"):
            n = largest(plan, dim)
            assert n > plan.model.bindings[dim]
            check_fits(plan, {**plan.model.bindings, dim: n})
            with pytest.raises(TooLarge):
                check_fits(plan, {**plan.model.bindings, dim: n + 1})
        return plan

    with local_pipeline(bert_tiny, 2, tmp_path, plan_dir=tmp_path, make=planned_for_110_mib,
                        deadlines=Deadlines()) as (workers, plan, pipeline):
        # Larger than planned but small: it fits, and is served.
        x = example_inputs("bert", "tiny", batch=2, seq=40)
        got = decode_tensors(pipeline.infer(x).outputs)
        want = reference(bert_tiny, x)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], atol=1e-4, rtol=0)
        # Attention over 32 x 512 tokens: far beyond 110 MiB. Refused at once, from
        # arrays and from wire tensors alike.
        big = example_inputs("bert", "tiny", batch=32, seq=512)
        for request in (big, encode_tensors(big)):
            t0 = time.perf_counter()
            with pytest.raises(InferError) as e:
                pipeline.infer(request)
            assert time.perf_counter() - t0 < 1
            assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            message = str(e.value)
            assert "batch=32" in message and "sequence=512" in message, message
            assert "rpi4b-2gb-" in message and "has 110 MiB" in message, message
        # Through the coordinator's server: the client gets it once, not retried, as
        # the same request can never fit (a full queue's RESOURCE_EXHAUSTED is).
        checks = []
        monkeypatch.setattr(pipeline_module, "check_fits",
                            lambda plan, sizes: checks.append(sizes) or check_fits(plan, sizes))
        server, port = start_coordinator(pipeline, "127.0.0.1:0")
        try:
            client = InferClient(f"127.0.0.1:{port}", retries=3)
            with pytest.raises(grpc.RpcError) as e:
                client.infer(big)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "would need about" in e.value.details()
            assert checks == [{"batch": 32, "sequence": 512}]  # sent once
            got = client.infer(x)
            for k in want:
                np.testing.assert_allclose(got[k], want[k], atol=1e-4, rtol=0)
        finally:
            server.stop(0)
        assert pipeline.requests_failed == 0  # refused before any was accepted
        assert pipeline.recoveries == []  # no worker was harmed
        assert all(w.process.poll() is None for w in workers.workers)
