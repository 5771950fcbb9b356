"""Failover: a device dies mid-run and no request is lost or answered wrongly."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from edge.coordinator.pipeline import InferError, Pipeline
from edge.export import example_inputs
from edge.build import make_plan
from edge.transport.channels import Deadlines
from edge.transport.codec import decode_tensors
from edge.worker.launch import LocalWorkers, spawn_worker
from helpers import BINDINGS, assert_close, local_pipeline, reference, references

TOL = 1e-4


def cases(n: int = 8) -> list[dict]:
    """Distinct requests of different shapes, so a mixed-up answer cannot pass."""
    shapes = [(1, 16), (2, 9), (1, 24), (3, 5)]
    return [example_inputs("bert", "tiny", batch=b, seq=s, seed=i)
            for i, (b, s) in enumerate(shapes * (n // len(shapes)))]


def run_with_a_kill(pipeline: Pipeline, inputs: list[dict], total: int, kill_at: int,
                    kill) -> list:
    """``total`` requests, 4 in flight; ``kill()`` runs as request ``kill_at`` is sent."""
    def one(i: int):
        if i == kill_at:
            kill()
        return i, pipeline.infer(inputs[i % len(inputs)])

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, range(total)))


def check_all(results, inputs, want) -> None:
    for i, result in results:
        assert_close(decode_tensors(result.outputs), want[i % len(inputs)], TOL, str(i))


def sigkill(worker) -> None:
    worker.process.send_signal(signal.SIGKILL)
    worker.process.wait()


@pytest.fixture
def inputs_and_refs(bert_tiny):
    inputs = cases()
    return inputs, references(bert_tiny, inputs)


def test_sigkill_at_request_50_loses_nothing_and_rejoins_from_cache(bert_tiny, tmp_path,
                                                                    inputs_and_refs):
    inputs, want = inputs_and_refs
    with local_pipeline(bert_tiny, 4, tmp_path) as (workers, plan, pipeline):
        victim = workers.workers[1]
        results = run_with_a_kill(pipeline, inputs, 200, 50, lambda: sigkill(victim))
        check_all(results, inputs, want)
        assert len(results) == 200

        [lost] = pipeline.recoveries
        assert lost.lost == ("rpi4b-2gb-2",) and lost.how == "re-planned"
        assert len(lost.devices) == 3 and "rpi4b-2gb-2" not in lost.devices
        print(f"\nrecovery: {lost.describe()}")
        assert [w.stage.device.name for w in pipeline.workers] == list(lost.devices)

        # It comes back on its old address with its cache: the original plan returns,
        # and nothing is uploaded.
        back = spawn_worker(tmp_path / "w", "worker-1-again", threads=1,
                            port=victim.port, cache_dir=victim.cache_dir)
        workers.workers.append(back)
        end = time.monotonic() + 30
        while len(pipeline.recoveries) < 2 and time.monotonic() < end:
            time.sleep(0.1)
        rejoin = pipeline.recoveries[-1]
        assert rejoin.joined == ("rpi4b-2gb-2",) and rejoin.how == "original", rejoin
        assert rejoin.uploaded_bytes == 0
        check_all([(i, pipeline.infer(inputs[i])) for i in range(4)], inputs, want)
        assert pipeline.plan is plan


def test_standby_takes_the_lost_stage(bert_tiny, tmp_path, inputs_and_refs):
    inputs, want = inputs_and_refs
    def with_a_spare(devices):
        spare = dataclasses.replace(devices[4], name="spare", standby=True)
        plan = make_plan(bert_tiny, devices[:4], tmp_path / "build", bindings=BINDINGS,
                         standby=[spare])
        assert plan.standby == (spare,)
        return plan

    with local_pipeline(bert_tiny, 5, tmp_path, make=with_a_spare) as (workers, plan, pipeline):
        results = run_with_a_kill(pipeline, inputs, 200, 50,
                                  lambda: sigkill(workers.workers[2]))
        check_all(results, inputs, want)
        [r] = pipeline.recoveries
        assert r.how == "standby" and r.lost == ("rpi4b-2gb-3",)
        assert r.devices == ("rpi4b-2gb-1", "rpi4b-2gb-2", "spare", "rpi4b-2gb-4")
        moved = plan.stages[2]
        assert r.uploaded_bytes == moved.total_bytes  # only the moved shard travelled
        # The stages that stayed were re-wired on the session they had, not reloaded.
        for k in (0, 1, 3):
            assert "loaded in 0 ms" in workers.workers[k].log(), k
        print(f"\nrecovery: {r.describe()}")


def test_a_hung_device_is_noticed_by_health_checks(bert_tiny, tmp_path, inputs_and_refs):
    """SIGSTOP: no connection reset, as when a device is unplugged: only deadlines and
    missed health checks can tell."""
    inputs, want = inputs_and_refs
    with local_pipeline(bert_tiny, 3, tmp_path) as (workers, plan, pipeline):
        victim = workers.workers[2]
        try:
            results = run_with_a_kill(
                pipeline, inputs, 60, 20,
                lambda: os.kill(victim.process.pid, signal.SIGSTOP))
            check_all(results, inputs, want)
            [r] = pipeline.recoveries
            assert r.lost == ("rpi4b-2gb-3",) and len(r.devices) == 2
            print(f"\nrecovery: {r.describe()}")
        finally:
            os.kill(victim.process.pid, signal.SIGCONT)


def test_when_the_rest_cannot_hold_the_model_requests_fail_clearly(bert_small, tmp_path):
    # BERT-small: its layers weigh enough that half of it needs clearly less than all of it.
    inputs = [example_inputs("bert", "small", batch=1, seq=s, seed=i)
              for i, s in enumerate((16, 9))]
    want = references(bert_small, inputs)
    def two_hold_it_one_cannot(devices):
        # Budgets between what a half needs and what the whole needs, fp32 only: two
        # devices hold the model, one cannot.
        whole = make_plan(bert_small, devices[:1], tmp_path / "one", bindings=BINDINGS,
                          modes=("fp32",)).stages[0].predicted.memory_mb
        halves = make_plan(bert_small, devices, tmp_path / "two", bindings=BINDINGS,
                           modes=("fp32",))
        half = max(s.predicted.memory_mb for s in halves.stages)
        assert half < whole
        budget = (half + whole) / 2
        devices = [dataclasses.replace(d, memory_mb=budget) for d in devices]
        return make_plan(bert_small, devices, tmp_path / "build", bindings=BINDINGS,
                         modes=("fp32",))

    with local_pipeline(bert_small, 2, tmp_path, make=two_hold_it_one_cannot) as (
            workers, plan, pipeline):
        check_all([(0, pipeline.infer(inputs[0]))], inputs, want)
        victim = workers.workers[0]
        sigkill(victim)
        start = time.monotonic()
        errors = []
        for _ in range(3):
            with pytest.raises(InferError) as e:
                pipeline.infer(inputs[1])
            errors.append(e.value)
        assert time.monotonic() - start < 20
        for e in errors:
            assert e.code == grpc.StatusCode.UNAVAILABLE
            assert "rpi4b-2gb-1" in str(e) and "MiB short" in str(e), str(e)
        assert pipeline.recoveries[-1].how == "unavailable"

        # The device comes back: the pipeline serves again, from the cache.
        back = spawn_worker(tmp_path / "w", "worker-0-again", threads=1,
                            port=victim.port, cache_dir=victim.cache_dir)
        workers.workers.append(back)
        end = time.monotonic() + 30
        while pipeline.recoveries[-1].how == "unavailable" and time.monotonic() < end:
            time.sleep(0.1)
        assert pipeline.recoveries[-1].how == "original"
        check_all([(1, pipeline.infer(inputs[1]))], inputs, want)


def test_without_failover_a_death_fails_in_flight_requests_naming_the_device(bert_tiny,
                                                                            tmp_path):
    x = example_inputs("bert", "tiny", batch=1, seq=16)
    with local_pipeline(bert_tiny, 3, tmp_path, plan_dir=tmp_path,
                        deadlines=Deadlines(infer=30), failover=False) as (workers, plan, p):
        p.infer(x)
        sigkill(workers.workers[1])
        with pytest.raises(InferError) as e:
            p.infer(x)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        assert "stage 1" in str(e.value) or "rpi4b-2gb-2" in str(e.value), str(e.value)


def test_requests_sent_during_a_recovery_wait_for_it(bert_tiny, tmp_path, inputs_and_refs):
    """Requests keep arriving while the model is re-planned; none fails."""
    inputs, want = inputs_and_refs
    with local_pipeline(bert_tiny, 3, tmp_path) as (workers, plan, pipeline):
        stop = threading.Event()
        results, errors = [], []

        def client(k: int) -> None:
            i = k
            while not stop.is_set():
                try:
                    results.append((i % len(inputs), pipeline.infer(inputs[i % len(inputs)])))
                except InferError as e:
                    errors.append(e)
                i += 3

        threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        sigkill(workers.workers[0])
        end = time.monotonic() + 30
        while not pipeline.recoveries and time.monotonic() < end:
            time.sleep(0.1)
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors[:3]
        assert pipeline.recoveries and len(results) > 10
        check_all(results, inputs, want)


def test_edge_coordinator_prints_the_recovery(bert_tiny, tmp_path):
    """As a user runs it: `edge plan`, `edge coordinator`, a worker killed, `edge infer`."""
    import subprocess
    import sys

    import yaml

    with LocalWorkers(3, tmp_path / "w", threads=1) as workers:
        cluster = {"devices": [{"name": f"pi-{i}", "address": a, "profile": "rpi4b-2gb"}
                               for i, a in enumerate(workers.addresses)]}
        (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cluster))
        edge = [sys.executable, "-m", "edge"]
        subprocess.run(edge + ["plan", str(bert_tiny), "--cluster", str(tmp_path / "cluster.yaml"),
                               "--out", str(tmp_path / "build"), "--dim", "sequence=16"],
                       check=True, capture_output=True)
        port_file = tmp_path / "port"
        coordinator = subprocess.Popen(
            edge + ["coordinator", "--plan", str(tmp_path / "build" / "plan.json"),
                    "--listen", "127.0.0.1:0", "--port-file", str(port_file)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "COLUMNS": "200"})
        try:
            end = time.monotonic() + 60
            while not port_file.exists():
                assert coordinator.poll() is None and time.monotonic() < end
                time.sleep(0.1)
            x = example_inputs("bert", "tiny", batch=1, seq=16)
            np.savez(tmp_path / "in.npz", **x)
            infer = edge + ["infer", "--coordinator", f"127.0.0.1:{port_file.read_text()}",
                            "--input", str(tmp_path / "in.npz"),
                            "--output", str(tmp_path / "out.npz")]
            sigkill(workers.workers[1])
            r = subprocess.run(infer, capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
            with np.load(tmp_path / "out.npz") as f:
                got = {k: f[k] for k in f.files}
            want = reference(bert_tiny, x)
            for k in want:
                np.testing.assert_allclose(got[k], want[k], atol=TOL, rtol=0)
        finally:
            coordinator.terminate()
            out = coordinator.communicate(timeout=30)[0]
        assert "failover: lost pi-1: noticed in" in out, out
        assert "re-planned onto pi-0, pi-2" in out, out
