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


# ---------------------------------------------------------------- failover (issue 12, items 1-4)
#
# Small and fast: BERT-tiny (one rpi4b-2gb holds it whole) on local workers with one
# onnxruntime thread each, as tests/test_failover.py runs them.

FAILOVER_BINDINGS = {"batch": 1, "sequence": 16}


def _until(condition, timeout: float, what: str) -> None:
    """Wait for ``condition()`` (polled: it asks other processes) or fail saying ``what``."""
    import time

    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"not within {timeout:.0f} s: {what}"
        time.sleep(0.05)


def _sigkill(worker) -> None:
    import signal

    worker.process.send_signal(signal.SIGKILL)
    worker.process.wait()


def _tiny_input():
    from edge.export import example_inputs

    return example_inputs("bert", "tiny", batch=1, seq=16)


def _check_answer(pipeline, model, x) -> None:
    import numpy as np
    import onnxruntime as ort

    from edge.transport.codec import decode_tensors

    got = decode_tensors(pipeline.infer(x, timeout=30).outputs)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    for out, ref in zip(session.get_outputs(), session.run(None, x)):
        np.testing.assert_allclose(got[out.name], ref, atol=1e-4, rtol=0)


def test_a_standby_that_refuses_its_stage_is_backed_off_and_the_rest_re_planned(
        bert_tiny, tmp_path, caplog):
    """Item 1: the standby answers health checks but its --memory-budget is below what
    cluster.yaml says, so Configure answers RESOURCE_EXHAUSTED. Before: it was tried again
    every round (384 times in 10 s) and requests waited out their deadline."""
    import dataclasses
    import logging
    import time

    from edge.coordinator.pipeline import Pipeline
    from edge.planning import make_plan
    from edge.planning.cluster import cluster_from_profile
    from edge.transport.channels import Deadlines
    from edge.worker.launch import LocalWorkers, spawn_worker

    caplog.set_level(logging.WARNING, logger="edge.coordinator.pipeline")
    x = _tiny_input()
    with LocalWorkers(2, tmp_path / "w", threads=1) as workers:
        small = spawn_worker(tmp_path / "w", "standby", threads=1,
                             extra_args=["--memory-budget", "1"])
        workers.workers.append(small)
        cluster = cluster_from_profile("rpi4b-2gb", 3, addresses=workers.addresses)
        spare = dataclasses.replace(cluster.devices[2], name="spare", standby=True)
        plan = make_plan(bert_tiny, cluster.devices[:2], tmp_path / "build",
                         bindings=FAILOVER_BINDINGS, standby=[spare])
        with Pipeline(plan, tmp_path / "build", deadlines=Deadlines(infer=30),
                      health_interval=0.2) as pipeline:
            pipeline.start()
            _check_answer(pipeline, bert_tiny, x)
            _sigkill(workers.workers[0])
            start = time.monotonic()
            _check_answer(pipeline, bert_tiny, x)  # served, not waiting out its deadline
            assert time.monotonic() - start < 20
            assert [w.stage.device.name for w in pipeline.workers] == ["rpi4b-2gb-2"]
            assert pipeline.recoveries[-1].how == "re-planned"
            time.sleep(2)  # the standby's first backoff (1 s) ends: one more try, not 100
        left_out = [r.getMessage() for r in caplog.records if "leaving device spare" in
                    r.getMessage()]
        assert 1 <= len(left_out) <= 4, left_out
        assert "refused its stage" in left_out[0] and "RESOURCE_EXHAUSTED" in left_out[0], \
            left_out[0]
        assert small.address in left_out[0]


def test_only_the_standby_left_serves_then_nothing_fails_at_once(bert_tiny, tmp_path):
    """Item 2: every primary is dead, the standby answers. Before: "no devices to plan
    for" every round and requests hung until their deadline."""
    import dataclasses
    import time

    import grpc

    from edge.coordinator.pipeline import InferError, Pipeline
    from edge.planning import make_plan
    from edge.planning.cluster import cluster_from_profile
    from edge.transport.channels import Deadlines
    from edge.worker.launch import LocalWorkers

    x = _tiny_input()
    with LocalWorkers(3, tmp_path / "w", threads=1) as workers:
        cluster = cluster_from_profile("rpi4b-2gb", 3, addresses=workers.addresses)
        spare = dataclasses.replace(cluster.devices[2], name="spare", standby=True)
        plan = make_plan(bert_tiny, cluster.devices[:2], tmp_path / "build",
                         bindings=FAILOVER_BINDINGS, standby=[spare])
        with Pipeline(plan, tmp_path / "build", deadlines=Deadlines(infer=60),
                      health_interval=0.2) as pipeline:
            pipeline.start()
            _sigkill(workers.workers[0])
            _sigkill(workers.workers[1])
            _check_answer(pipeline, bert_tiny, x)
            assert [w.stage.device.name for w in pipeline.workers] == ["spare"]

            _sigkill(workers.workers[2])
            _until(lambda: pipeline.status().not_serving, 10, "the pipeline says it cannot serve")
            start = time.monotonic()
            with pytest.raises(InferError) as e:
                pipeline.infer(x, timeout=60)
            assert time.monotonic() - start < 1  # at once, not at the deadline
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
            assert "no device can serve" in str(e.value) and "spare" in str(e.value), str(e.value)


@pytest.fixture(scope="module")
def owned_cluster(tmp_path_factory, bert_tiny):
    """Two local workers and a two-stage plan of BERT-tiny over them."""
    from edge.planning import make_plan
    from edge.planning.cluster import cluster_from_profile
    from edge.worker.launch import LocalWorkers

    tmp = tmp_path_factory.mktemp("owned")
    with LocalWorkers(2, tmp / "w", threads=1) as workers:
        cluster = cluster_from_profile("rpi4b-2gb", 2, addresses=workers.addresses)
        plan = make_plan(bert_tiny, cluster.devices, tmp / "build", bindings=FAILOVER_BINDINGS)
        yield workers, plan, tmp / "build"


def _pipeline(owned_cluster, **kw):
    from edge.coordinator.pipeline import Pipeline
    from edge.transport.channels import Deadlines

    _, plan, plan_dir = owned_cluster
    return Pipeline(plan, plan_dir, deadlines=Deadlines(infer=30, ready=10),
                    health_interval=0.2, **kw)


def test_a_second_coordinator_is_refused_naming_the_first(owned_cluster, bert_tiny):
    """Item 3: before, a second coordinator silently took the workers over."""
    import grpc

    from edge.coordinator.deploy import DeployError

    x = _tiny_input()
    with _pipeline(owned_cluster) as first:
        first.start()
        with _pipeline(owned_cluster) as second:
            with pytest.raises(DeployError) as e:
                second.start()
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and e.value.kind == "refused"
        message = str(e.value)
        assert first.coordinator_id in message and second.coordinator_id in message, message
        assert first.plan.plan_id in message and f"epoch {first.epoch}" in message, message
        assert "--take-over" in message, message
        _check_answer(first, bert_tiny, x)  # the first one was not disturbed
        assert not first.status().not_serving


def test_a_restarted_coordinator_is_accepted_without_take_over(owned_cluster, bert_tiny):
    """The common case: the old coordinator's process is gone, and so is its stream."""
    x = _tiny_input()
    with _pipeline(owned_cluster) as old:
        old.start()
        _check_answer(old, bert_tiny, x)
    with _pipeline(owned_cluster) as new:
        new.start()
        _check_answer(new, bert_tiny, x)


def test_a_coordinator_taken_over_says_so_and_stops_serving(owned_cluster, bert_tiny, caplog):
    """Item 3: before, the old coordinator kept reporting SERVING with every stage healthy,
    its new requests failed after ~8.6 s and those in flight hung to their deadline."""
    import logging
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from edge.coordinator.pipeline import InferError
    from edge.coordinator.server import start_coordinator
    from edge.proto import edge_pb2 as pb
    from edge.transport.channels import create_channel

    caplog.set_level(logging.WARNING, logger="edge.coordinator.pipeline")
    x = _tiny_input()
    workers, _, _ = owned_cluster
    with _pipeline(owned_cluster) as old:
        old.start()
        server, port = start_coordinator(old, "127.0.0.1:0")
        try:
            with create_channel(f"127.0.0.1:{port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)

                def status():
                    return health.Check(health_pb2.HealthCheckRequest(
                        service="edge.v1.Coordinator"), timeout=5).status

                assert status() == health_pb2.HealthCheckResponse.SERVING
                with _pipeline(owned_cluster, take_over=True) as new:
                    new.start()
                    _until(lambda: old.taken_over, 10, "the old coordinator notices")
                    assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
                    start = time.monotonic()
                    with pytest.raises(InferError) as e:
                        old.infer(x, timeout=30)
                    assert time.monotonic() - start < 1
                    assert e.value.code == grpc.StatusCode.UNAVAILABLE and not e.value.retryable
                    assert "taken over" in str(e.value) and new.coordinator_id in str(e.value)
                    cluster = old.status()
                    assert "taken over" in cluster.not_serving
                    assert not any(s.healthy for s in cluster.stages)

                    # The old one does not fight back: the new one keeps its workers.
                    time.sleep(1.0)  # five of the old one's monitor rounds
                    _check_answer(new, bert_tiny, x)
                    for w in workers.workers:
                        with create_channel(w.address) as ch:
                            from edge.proto import edge_pb2_grpc as pb_grpc

                            got = pb_grpc.WorkerStub(ch).GetStatus(pb.StatusRequest(), timeout=5)
                        assert got.coordinator_id == new.coordinator_id
                        assert got.epoch == new.epoch
                    assert old.recoveries == []
        finally:
            server.stop(0)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "taken over" in
              r.getMessage()]
    assert len(errors) == 1, [r.getMessage() for r in errors]


def test_requests_in_flight_at_a_take_over_end_at_once(owned_cluster):
    """Item 3: before, requests in flight on the old coordinator hung to their deadline."""
    import threading
    import time

    import grpc

    from edge.coordinator.pipeline import InferError

    x = _tiny_input()
    outcomes: list[tuple[str, float]] = []
    stop = threading.Event()
    with _pipeline(owned_cluster) as old:
        old.start()

        def client() -> None:
            while not stop.is_set():
                start = time.monotonic()
                try:
                    old.infer(x, timeout=30)
                    outcomes.append(("OK", time.monotonic() - start))
                except InferError as e:
                    outcomes.append((e.code.name, time.monotonic() - start))

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            _until(lambda: len(outcomes) >= 8, 20, "the old coordinator serves")
            with _pipeline(owned_cluster, take_over=True) as new:
                new.start()
                _until(lambda: old.taken_over, 10, "the old coordinator notices")
                _until(lambda: outcomes[-1][0] != "OK", 10, "its requests fail")
        finally:
            stop.set()
            for t in threads:
                t.join(35)
    assert not any(t.is_alive() for t in threads)
    failed = [o for o in outcomes if o[0] != "OK"]
    assert {code for code, _ in failed} == {grpc.StatusCode.UNAVAILABLE.name}, failed
    assert max(seconds for _, seconds in outcomes) < 10, outcomes


def test_a_configure_within_the_owners_grace_is_refused(owned_cluster):
    """A coordinator that configured a worker owns it until it subscribes (a deploy
    configures every stage first), even before it holds a stream."""
    import dataclasses

    import grpc

    from edge.coordinator.deploy import DeployError, Link, configure, upload_shard
    from edge.proto import edge_pb2 as pb
    from edge.transport.channels import Deadlines, Security

    workers, plan, plan_dir = owned_cluster
    solo = dataclasses.replace(plan, stages=(dataclasses.replace(plan.stages[-1], index=0),))
    link = Link.open(workers.workers[1].address, Security())
    try:
        w = link.handle(solo.stages[0])
        upload_shard(w, plan_dir, Deadlines())
        configure(w, solo, 7, Deadlines(), coordinator_id="c-one")
        with pytest.raises(DeployError) as e:
            configure(w, solo, 8, Deadlines(), coordinator_id="c-two")
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "c-one" in str(e.value) and "not subscribed yet" in str(e.value), str(e.value)
        assert e.value.address == workers.workers[1].address
        configure(w, solo, 9, Deadlines(), coordinator_id="c-two", take_over=True)
        # c-two subscribes, then goes: the next test's coordinator is a restart, not a rival.
        with pytest.raises(grpc.RpcError) as e:
            next(w.stub.Subscribe(pb.SubscribeRequest(coordinator_id="c-two"), timeout=1))
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        link.close()


def test_strangers_streams_cannot_lock_the_coordinator_out(owned_cluster, bert_tiny):
    """Item 4: any certificate holder could open MAX_SUBSCRIBERS Subscribe streams on the
    last worker; the coordinator's own stream was then refused and every Infer hit
    DEADLINE_EXCEEDED with nothing logged."""
    import grpc

    from edge.proto import edge_pb2 as pb
    from edge.proto import edge_pb2_grpc as pb_grpc
    from edge.transport.channels import create_channel
    from edge.worker.server import MAX_SUBSCRIBERS

    workers, _, _ = owned_cluster
    x = _tiny_input()
    with create_channel(workers.workers[-1].address) as channel:
        stub = pb_grpc.WorkerStub(channel)
        strangers = [stub.Subscribe(pb.SubscribeRequest(coordinator_id=f"stranger-{i}"),
                                    timeout=60) for i in range(MAX_SUBSCRIBERS + 1)]
        try:
            _until(lambda: any(s.done() for s in strangers), 10, "one stream too many refused")
            [refused] = [s for s in strangers if s.done()]
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.details()
            with _pipeline(owned_cluster) as pipeline:
                pipeline.start()  # subscribes while the strangers hold every other slot
                _check_answer(pipeline, bert_tiny, x)
        finally:
            for s in strangers:
                s.cancel()


def test_edge_coordinator_has_take_over():
    run = edge("coordinator", "--help")
    assert run.returncode == 0 and "--take-over" in run.stdout, run.stdout
