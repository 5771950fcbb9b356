"""Small defects found by using edge as a new user would, and by attacking it (issue 12)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edge.errors import GraphError
from edge.export.zoo import locate
from edge.planning.graph import analyze
from edge.worker.cache import ShardCache, UploadError


def edge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge", *args], capture_output=True,
                          text=True, timeout=120)


def test_digest_with_a_trailing_newline_is_refused(tmp_path):
    cache = ShardCache(tmp_path)
    good = "a" * 64
    assert cache.path(good).name == good
    with pytest.raises(UploadError, match="64 lowercase hex digits"):
        cache.path(good + "\n")


def test_partial_uploads_of_a_killed_worker_are_removed_at_start(tmp_path):
    stale = tmp_path / ".incoming-abc123"
    stale.write_bytes(b"\0" * 1024)
    kept = tmp_path / ("b" * 64)
    kept.write_bytes(b"shard")
    ShardCache(tmp_path)
    assert not stale.exists()
    assert kept.exists()


@pytest.mark.parametrize("args, words", [
    (["worker", "--threads", "0"], "--threads: expected a whole number > 0, got '0'"),
    (["worker", "--memory-budget", "-5"], "--memory-budget: expected a number > 0, got '-5'"),
    (["worker", "--max-queue", "x"], "--max-queue: expected a whole number > 0, got 'x'"),
])
def test_nonsense_numbers_are_refused(args, words):
    run = edge(*args)
    assert run.returncode == 2
    assert words in run.stderr


def test_version_and_log_level_after_the_command():
    run = edge("--version")
    assert run.returncode == 0 and run.stdout.startswith("edge ")
    run = edge("devices", "--log-level", "DEBUG")
    assert run.returncode == 0, run.stderr


def test_a_dim_the_model_does_not_have_is_an_error():
    path = locate("ppocr-cls")
    with pytest.raises(GraphError, match=r"--dim hieght: expected dims of the model's inputs "
                                         r"\(x:0, x:2, x:3\)"):
        analyze(path, {"x:2": 48, "x:3": 192, "hieght": 5})


def test_a_truncated_npz_gets_a_message_not_a_traceback(tmp_path):
    import numpy as np

    good = tmp_path / "in.npz"
    np.savez(good, x=np.zeros((64, 64), np.float32))
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[:200])
    run = edge("infer", "--coordinator", "127.0.0.1:9", "--input", str(cut), "--output",
               str(tmp_path / "out.npz"))
    assert run.returncode != 0
    assert "cannot read" in run.stderr and "Traceback" not in run.stderr


def test_two_stages_on_one_address_are_refused(tmp_path):
    import json

    from edge.errors import ConfigError
    from edge.planning import make_plan
    from edge.planning.plan import Device, load_plan

    devices = [Device(name=f"d{i}", address=f"127.0.0.1:{5000 + i}", profile="t",
                      memory_mb=4096, gflops=g, bandwidth_mbps=1000.0)
               for i, g in enumerate((1.0, 1.5))]
    make_plan(locate("ppocr-cls"), devices, tmp_path, bindings={"x:2": 48, "x:3": 192})
    raw = json.loads((tmp_path / "plan.json").read_text())
    raw["stages"][1]["device"]["address"] = raw["stages"][0]["device"]["address"]
    (tmp_path / "plan.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"stages\[1\].device.address.*one address per "
                                          r"stage.*stage 0 has too"):
        load_plan(tmp_path / "plan.json")


def test_an_unwritable_cache_answers_a_status_code_and_one_line(tmp_path, monkeypatch):
    """A read-only cache answered UNKNOWN with a Python traceback (issue 12, item 7)."""
    import errno
    import hashlib
    import os

    import grpc

    import edge.worker.cache as cache_module
    from edge.proto import edge_pb2 as pb
    from edge.proto import edge_pb2_grpc as pb_grpc
    from edge.transport.channels import create_channel
    from edge.worker.server import WorkerConfig, start_worker

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "cache"))

    monkeypatch.setattr(cache_module.tempfile, "mkstemp", read_only)
    server, port, servicer, _ = start_worker(WorkerConfig(listen="127.0.0.1:0",
                                                          cache_dir=tmp_path / "cache"))
    channel = create_channel(f"127.0.0.1:{port}")
    try:
        data = b"x" * 1000
        sha = hashlib.sha256(data).hexdigest()
        chunks = iter([pb.ShardChunk(header=pb.ShardHeader(sha256=sha, size=len(data))),
                       pb.ShardChunk(data=data)])
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.WorkerStub(channel).UploadShard(chunks, timeout=10)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "Read-only file system" in e.value.details()
        assert "Traceback" not in e.value.details() and "\n" not in e.value.details()
    finally:
        channel.close()
        server.stop(0).wait()
        servicer.stop()


def test_a_full_disk_is_resource_exhausted(tmp_path, monkeypatch):
    import errno
    import os

    cache = ShardCache(tmp_path)

    def chunks():
        yield b"abc"
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(UploadError) as e:
        cache.receive("a" * 64, 10, chunks())
    assert e.value.kind == "exhausted" and "disk is full" in str(e.value)
    assert not list(tmp_path.glob(".incoming-*"))


def test_a_cache_that_cannot_be_created_stops_the_worker_with_one_line(tmp_path):
    """It killed the worker with a traceback (issue 12, item 7)."""
    (tmp_path / "file").write_text("not a folder")
    r = edge("worker", "--listen", "127.0.0.1:0", "--cache-dir", str(tmp_path / "file" / "c"))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "cannot create the shard cache" in r.stderr and "--cache-dir" in r.stderr


def test_the_guard_knows_the_models_own_length_limit(bert_tiny, tmp_path):
    """It advertised "sequence up to 2770" for a model with 512 positions (issue 12,
    item 8): memory was the only limit it knew."""
    import grpc

    from edge.coordinator.guard import BeyondModel, check_fits, describe_limits, largest
    from edge.coordinator.pipeline import InferError, Pipeline
    from edge.export import example_inputs
    from edge.planning import make_plan
    from edge.planning.cluster import cluster_from_profile
    from edge.planning.plan import load_plan

    devices = cluster_from_profile("rpi4b-4gb", 2).devices
    make_plan(bert_tiny, devices, tmp_path, bindings={"batch": 1, "sequence": 16},
              modes=("fp32",))
    plan = load_plan(tmp_path / "plan.json")
    assert plan.model.limits == {"sequence": 512}
    assert any("sequence is at most 512" in n and "position_ids" in n for n in plan.model.notes)
    assert largest(plan, "sequence") == 512
    assert "sequence up to 512" in describe_limits(plan)
    check_fits(plan, {"batch": 1, "sequence": 512})
    with pytest.raises(BeyondModel, match="sequence=513.*up to 512"):
        check_fits(plan, {"batch": 1, "sequence": 513})
    # Refused by the coordinator before any worker is reached: the request is wrong, so
    # INVALID_ARGUMENT (not retried), not RESOURCE_EXHAUSTED.
    with pytest.raises(InferError) as e:
        Pipeline(plan, tmp_path).infer(example_inputs("bert", "tiny", batch=1, seq=600))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and not e.value.retryable
    assert "up to 512" in str(e.value)


def test_the_default_client_rides_out_a_coordinator_restart(bert_tiny, tmp_path):
    """With under 0.7 s of backoff in all, clients lost 7 of 3,781 requests while the
    coordinator restarted in 0.3 s (issue 12, item 9). Down for 2 s here: none is lost."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from edge.coordinator.client import InferClient
    from edge.coordinator.pipeline import Pipeline
    from edge.coordinator.server import start_coordinator
    from edge.export import example_inputs
    from edge.planning import make_plan
    from edge.planning.cluster import cluster_from_profile
    from edge.worker.launch import LocalWorkers

    x = example_inputs("bert", "tiny", batch=1, seq=16)
    with LocalWorkers(1, tmp_path / "w", threads=1) as workers:
        devices = cluster_from_profile("rpi4b-2gb", 1, addresses=workers.addresses).devices
        plan = make_plan(bert_tiny, devices, tmp_path, bindings={"batch": 1, "sequence": 16},
                         modes=("fp32",))
        with Pipeline(plan, tmp_path) as pipeline:
            pipeline.start()
            server, port = start_coordinator(pipeline, "127.0.0.1:0")
            down, back = threading.Event(), threading.Event()
            during = []  # requests that were sent while the coordinator was down

            def send(client: InferClient) -> None:
                while True:
                    sent_down = down.is_set() and not back.is_set()
                    was_back = back.is_set()
                    client.infer(x)
                    during.append(sent_down)
                    if was_back:
                        return

            try:
                with InferClient(f"127.0.0.1:{port}") as client, ThreadPoolExecutor(2) as pool:
                    senders = [pool.submit(send, client) for _ in range(2)]
                    while len(during) < 5:
                        time.sleep(0.01)
                    down.set()
                    server.stop(5).wait()  # SIGTERM: calls in flight finish, then it is gone ...
                    time.sleep(2.0)
                    server, _ = start_coordinator(pipeline, f"127.0.0.1:{port}")  # ... and back
                    back.set()
                    for f in senders:
                        f.result(timeout=60)  # no request failed
                assert any(during), "no request was sent while the coordinator was down"
            finally:
                server.stop(0)
