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
from edge.coordinator.pipeline import InferError, Pipeline
from edge.coordinator.server import start_coordinator
from edge.export import example_inputs
from edge.planning import make_plan
from edge.planning.cluster import cluster_from_profile
from edge.proto import edge_pb2_grpc as pb_grpc
from edge.transport.channels import Deadlines, create_channel
from edge.worker.launch import LocalWorkers, spawn_worker
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
    with LocalWorkers(2, tmp_path / "w", threads=1) as workers:
        cluster = cluster_from_profile("rpi4b-2gb", 2, addresses=workers.addresses)
        plan = make_plan(bert_tiny, cluster.devices, tmp_path, bindings={"batch": 1, "sequence": 16})
        stuck = workers.workers[1].process.pid
        with Pipeline(plan, tmp_path, max_in_flight=3, failover=False,
                      deadlines=Deadlines(infer=60)) as pipeline:
            pipeline.start()
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
    with LocalWorkers(2, tmp_path / "w", threads=1) as workers:
        cluster = cluster_from_profile("rpi4b-2gb", 2, addresses=workers.addresses)
        plan = make_plan(bert_tiny, cluster.devices, tmp_path, bindings={"batch": 1, "sequence": 16})
        stuck = workers.workers[1].process.pid
        with Pipeline(plan, tmp_path, max_in_flight=1, failover=False) as pipeline:
            pipeline.start()
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
