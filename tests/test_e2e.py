"""End to end over real worker processes: the sharded pipeline equals the unsharded model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import yaml

from edge.coordinator.client import InferClient
from edge.coordinator.deploy import DeployError
from edge.coordinator.pipeline import InferError, Pipeline
from edge.coordinator.server import start_coordinator
from edge.export import example_inputs
from edge.build import make_plan
from edge.planning.cluster import cluster_from_profile
from edge.planning.plan import load_plan
from edge.transport.channels import Deadlines
from edge.transport.codec import decode_tensors
from edge.worker.launch import LocalWorkers

TOL = 1e-4


def reference(model_path: Path, inputs: dict) -> dict:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, inputs)))


def assert_close(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        np.testing.assert_allclose(got[k], want[k], atol=TOL, rtol=0, err_msg=k)


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    with LocalWorkers(3, tmp_path_factory.mktemp("workers"), device="rpi4b-2gb",
                      threads=1) as w:
        yield w


def plan_for(model: Path, workers: LocalWorkers, out: Path, bindings: dict):
    cluster = cluster_from_profile("rpi4b-2gb", 3, addresses=workers.addresses)
    return make_plan(model, cluster.devices, out, bindings=bindings)


@pytest.mark.parametrize("model_fixture, kind, bindings, shapes", [
    ("bert_tiny", "bert", {"batch": 1, "sequence": 16}, [(1, 16), (2, 9), (3, 32)]),
    ("unet_tiny", "unet", {"batch": 1, "height": 64, "width": 64}, [(1, 64), (2, 64), (1, 32)]),
])
def test_pipeline_equals_unsharded_model(request, workers, tmp_path, model_fixture, kind,
                                         bindings, shapes):
    model = request.getfixturevalue(model_fixture)
    plan = plan_for(model, workers, tmp_path, bindings)
    assert len(plan.stages) == 3
    with Pipeline(plan, tmp_path) as pipeline:
        pipeline.start()
        cases = [example_inputs(kind, "tiny", batch=b, seq=s, seed=i)
                 for i, (b, s) in enumerate(shapes)]
        # Several requests in flight at once, so the stages overlap.
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(pipeline.infer, cases * 3))
        for x, r in zip(cases * 3, results):
            assert_close(decode_tensors(r.outputs), reference(model, x))
            assert [t.stage for t in r.timings] == [0, 1, 2]
        status = pipeline.status()
        assert all(s.healthy and s.worker.configured for s in status.stages)
        assert [s.worker.stage for s in status.stages] == [0, 1, 2]


def test_bert_cuts_carry_several_tensors(bert_tiny, workers, tmp_path):
    # Whole nodes: each cut carries the attention mask beside the hidden state.
    cluster = cluster_from_profile("rpi4b-2gb", 3, addresses=workers.addresses)
    whole = make_plan(bert_tiny, cluster.devices, tmp_path / "whole",
                      bindings={"batch": 1, "sequence": 16}, block_cuts=False)
    for stage in whole.stages[1:]:
        assert len(stage.inputs) > 1, [t.name for t in stage.inputs]
    # The default plan evens the stages out by cutting inside a feed-forward block: that
    # cut carries the block's input and the sum of its parts so far (the pipeline equals
    # the model with it: test_pipeline_equals_unsharded_model).
    plan = plan_for(bert_tiny, workers, tmp_path / "blocks", {"batch": 1, "sequence": 16})
    assert plan.bottleneck_ms < whole.bottleneck_ms
    names = [t.name for s in plan.stages[1:] for t in s.inputs]
    assert any("/sum" in n for n in names), names


@pytest.mark.parametrize("served", [False, True], ids=["pipeline", "coordinator-server"])
def test_requests_that_wait_run_as_one_batch_and_each_equals_the_model(bert_tiny, workers,
                                                                       tmp_path, served):
    plan = plan_for(bert_tiny, workers, tmp_path, {"batch": 1, "sequence": 16})
    slow = example_inputs("bert", "tiny", batch=8, seq=256, seed=9)  # holds the one slot
    cases = [slow] + [example_inputs("bert", "tiny", batch=b, seq=16, seed=i)
                      for i, b in enumerate([1, 2, 1, 1, 3])]
    with Pipeline(plan, tmp_path, infer_batch=8, infer_slots=1) as pipeline:
        pipeline.start()
        infer, server = (lambda x: decode_tensors(pipeline.infer(x).outputs)), None
        if served:  # through the coordinator's server on the event loop, as a client sends
            server, port = start_coordinator(pipeline, "127.0.0.1:0")
            client = InferClient(f"127.0.0.1:{port}", timeout=60)
            infer = client.infer
        try:
            with ThreadPoolExecutor(len(cases)) as pool:
                results = list(pool.map(infer, cases))
        finally:
            if server is not None:
                client.close()
                server.stop(0).wait()
        for x, r in zip(cases, results):
            assert_close(r, reference(bert_tiny, x))
        # The five at sequence 16 waited for the slow one and shared batches.
        assert pipeline.batcher.batches >= 1 and pipeline.batcher.largest >= 2


def test_bad_request_gets_invalid_argument_and_pipeline_keeps_serving(bert_tiny, workers, tmp_path):
    plan = plan_for(bert_tiny, workers, tmp_path, {"batch": 1, "sequence": 16})
    good = example_inputs("bert", "tiny", batch=1, seq=16)
    bad_cases = [
        ({**good, "input_ids": good["input_ids"].astype(np.int32)}, "expects input_ids int64"),
        ({**good, "input_ids": good["input_ids"][None]}, "expects input_ids int64"),
        ({**good, "extra": good["input_ids"]}, "unknown tensor"),
        ({"input_ids": good["input_ids"]}, "missing tensor"),
    ]
    with Pipeline(plan, tmp_path) as pipeline:
        pipeline.start()
        for bad, message in bad_cases:
            with pytest.raises(InferError) as e:
                pipeline.infer(bad)
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and message in str(e.value)
        assert_close(decode_tensors(pipeline.infer(good).outputs), reference(bert_tiny, good))


def test_unreachable_worker_is_named(bert_tiny, workers, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    addresses = workers.addresses[:2] + [dead]
    cluster = cluster_from_profile("rpi4b-2gb", 3, addresses=addresses)
    plan = make_plan(bert_tiny, cluster.devices, tmp_path, bindings={"batch": 1, "sequence": 16})
    start = time.monotonic()
    with Pipeline(plan, tmp_path, deadlines=Deadlines(ready=2.0)) as pipeline:
        with pytest.raises(DeployError) as e:
            pipeline.start()
    assert time.monotonic() - start < 20
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert "rpi4b-2gb-3" in str(e.value) and dead in str(e.value)


def edge_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge", *args], capture_output=True,
                          text=True, **kw)


def test_cli_plan_coordinator_infer(bert_tiny, workers, tmp_path):
    cluster = {"devices": [{"name": f"pi-{i}", "address": a, "profile": "rpi4b-2gb"}
                           for i, a in enumerate(workers.addresses)]}
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cluster))
    build = tmp_path / "build"
    r = edge_cli("plan", str(bert_tiny), "--cluster", str(tmp_path / "cluster.yaml"),
                 "--out", str(build), "--dim", "sequence=16")
    assert r.returncode == 0, r.stderr
    assert "largest requests the devices hold: batch up to" in " ".join(r.stdout.split())
    plan = load_plan(build / "plan.json")
    assert [s.device.name for s in plan.stages] == ["pi-0", "pi-1", "pi-2"]
    for s in plan.stages:
        assert (build / s.shard).is_file() and len(s.sha256) == 64

    port_file = tmp_path / "coordinator.port"
    # As under systemd (Type=notify): READY=1 once deployed and serving.
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(60)
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "edge", "coordinator", "--plan", str(build),  # its folder
         "--listen", "127.0.0.1:0", "--port-file", str(port_file)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")})
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists():
            assert coordinator.poll() is None, coordinator.stdout.read()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert notify.recv(4096).decode().startswith("STATUS=deploying")
        ready = notify.recv(4096).decode().splitlines()
        assert ready[0] == "READY=1" and "STATUS=serving" in ready[1], ready
        x = example_inputs("bert", "tiny", batch=2, seq=12, seed=3)
        np.savez(tmp_path / "in.npz", **x)
        r = edge_cli("infer", "--coordinator", f"127.0.0.1:{port_file.read_text()}",
                     "--input", str(tmp_path / "in.npz"), "--output", str(tmp_path / "out.npz"))
        assert r.returncode == 0, r.stderr
        with np.load(tmp_path / "out.npz") as f:
            assert_close({k: f[k] for k in f.files}, reference(bert_tiny, x))
        np.savez(tmp_path / "bad.npz", input_ids=x["input_ids"].astype(np.float32),
                 attention_mask=x["attention_mask"])
        r = edge_cli("infer", "--coordinator", f"127.0.0.1:{port_file.read_text()}",
                     "--input", str(tmp_path / "bad.npz"), "--output", str(tmp_path / "o.npz"))
        assert r.returncode == 1 and "INVALID_ARGUMENT" in r.stderr and "float32" in r.stderr
        # A request far beyond the plan's sizes: refused, naming a device and its budget.
        np.savez(tmp_path / "big.npz", **example_inputs("bert", "tiny", batch=256, seq=512))
        r = edge_cli("infer", "--coordinator", f"127.0.0.1:{port_file.read_text()}",
                     "--input", str(tmp_path / "big.npz"), "--output", str(tmp_path / "o.npz"))
        assert r.returncode == 1 and "RESOURCE_EXHAUSTED" in r.stderr, r.stderr
        assert "batch=256, sequence=512" in r.stderr and "pi-0" in r.stderr, r.stderr
        coordinator.terminate()
        assert notify.recv(4096).decode().splitlines()[0] == "STOPPING=1"
    finally:
        coordinator.terminate()
        coordinator.wait(10)
        notify.close()
    said = " ".join(coordinator.stdout.read().split())
    assert "largest requests the devices hold" in said, said


def test_plan_that_does_not_fit_says_what_each_device_needs(bert_tiny, tmp_path):
    cluster = {"devices": [{"name": f"zero-{i}", "address": f"127.0.0.1:{60000 + i}",
                            "profile": "rpi-zero-2w", "memory_mb": 73} for i in range(3)]}
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cluster))
    r = edge_cli("plan", str(bert_tiny), "--cluster", str(tmp_path / "cluster.yaml"),
                 "--out", str(tmp_path / "build"))
    assert r.returncode == 2
    for name in ("zero-0", "zero-1", "zero-2"):
        assert name in r.stderr
    assert "MiB" in r.stderr
    assert not (tmp_path / "build" / "plan.json").exists()
