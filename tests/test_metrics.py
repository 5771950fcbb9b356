"""Prometheus metrics (issue 15, item 2): real workers started with ``--metrics-port`` and a
coordinator, scraped over plain HTTP as Prometheus would, and parsed with prometheus_client's
own parser. The counters must equal what was sent, the histograms count each request, the
levels (KV caches, RSS) follow what the workers hold; the Grafana dashboard's queries name
only metrics that exist."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from edge.build import make_plan
from edge.coordinator.client import InferClient
from edge.coordinator.direct import DirectClient
from edge.coordinator.fake import FakeCluster, fake_devices, fake_plan
from edge.coordinator.generate import Generator
from edge.coordinator.pipeline import Pipeline
from edge.export.decoder import export_llama
from edge.export.inputs import example_inputs
from edge.planning.cluster import cluster_from_profile
from edge.planning.generation import GenerationRequest
from edge.proto import edge_pb2 as pb
from edge.proto import edge_pb2_grpc as pb_grpc
from edge.transport.channels import Deadlines
from edge.worker.launch import spawn_worker
from helpers import until

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "edge-dashboard.json"
PROMPT = [5, 17, 3, 250, 9, 41, 7]

Samples = dict[tuple[str, frozenset], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse(text: str) -> tuple[Samples, set[str]]:
    """Samples by (name, labels), and every family and sample name."""
    samples, names = {}, set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        for s in family.samples:
            names.add(s.name)
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, names


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        return parse(r.read().decode())[0]


def here() -> Samples:
    """This process's default registry (the in-process coordinator's metrics)."""
    return parse(generate_latest(REGISTRY).decode())[0]


def get(samples: Samples, name: str, **labels) -> float:
    return samples.get((name, frozenset((k, str(v)) for k, v in labels.items())), 0.0)


def total(samples: Samples, name: str, **labels) -> float:
    """The sum over every sample of ``name`` whose labels include ``labels``."""
    want = {(k, str(v)) for k, v in labels.items()}
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """Two worker processes, each serving its metrics on its own port."""
    root = tmp_path_factory.mktemp("workers")
    started = []
    try:
        for i in range(2):
            port = free_port()
            w = spawn_worker(root, f"worker-{i}", device="rpi4b-2gb", threads=1,
                             extra_args=["--metrics-port", str(port)])
            started.append((w, port))
        yield started
    finally:
        for w, _ in started:
            w.stop()


def test_infer_counts_on_the_coordinator_and_each_worker(bert_tiny, workers, tmp_path):
    addresses = [w.address for w, _ in workers]
    devices = cluster_from_profile("rpi4b-2gb", 2, addresses=addresses).devices
    build = tmp_path / "build"
    plan = make_plan(bert_tiny, devices, build, bindings={"batch": 1, "sequence": 16})
    assert len(plan.stages) == 2
    before = [scrape(port) for _, port in workers]
    port_file, metrics_port = tmp_path / "coordinator.port", free_port()
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "edge", "coordinator", "--plan", str(build), "--listen",
         "127.0.0.1:0", "--port-file", str(port_file), "--metrics-port", str(metrics_port),
         "--take-over"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        cwd=ROOT)
    try:
        until(lambda: port_file.exists() or coordinator.poll() is not None, 120,
              "the coordinator to serve", poll=0.1)
        assert coordinator.poll() is None, coordinator.stdout.read()
        x = example_inputs("bert", "tiny", batch=1, seq=16, seed=1)
        with InferClient(f"127.0.0.1:{port_file.read_text()}") as client:
            for _ in range(3):
                client.infer(x)
            with pytest.raises(grpc.RpcError) as e:  # float ids: refused by the coordinator
                client.infer({**x, "input_ids": x["input_ids"].astype(np.float32)})
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with DirectClient(f"127.0.0.1:{port_file.read_text()}") as direct:
            for _ in range(2):  # past the coordinator: counted by the workers only
                direct.infer(x)
        c = scrape(metrics_port)
    finally:
        coordinator.terminate()
        coordinator.wait(10)
    assert get(c, "edge_requests_total", kind="infer") == 4
    assert get(c, "edge_request_errors_total", kind="infer", code="INVALID_ARGUMENT") == 1
    assert get(c, "edge_request_seconds_count", kind="infer") == 3
    assert get(c, "edge_request_seconds_bucket", kind="infer", le="+Inf") == 3
    assert 0 < get(c, "edge_request_seconds_sum", kind="infer") < 60
    assert get(c, "edge_in_flight_requests") == 0
    assert get(c, "edge_pipeline_serving") == 1
    for stage, device in enumerate(d.name for d in devices):
        assert get(c, "edge_device_up", stage=stage, device=device) == 1
        assert get(c, "edge_device_rss_bytes", stage=stage, device=device) > 20 << 20
        assert get(c, "edge_device_memory_budget_bytes", stage=stage,
                   device=device) == devices[stage].memory_mb * 2**20
    # Each worker computed and sent the three good requests (the bad one never left the
    # coordinator) and the two direct ones, each timed once per phase; the last stage
    # delivered the direct ones to their client.
    for stage, (_, port) in enumerate(workers):
        after = scrape(port)
        delta = {name: total(after, name, stage=stage) - total(before[stage], name,
                                                                 stage=stage)
                 for name in ("edge_worker_requests_total", "edge_worker_queue_seconds_count",
                              "edge_worker_compute_seconds_count",
                              "edge_worker_send_seconds_count")}
        assert delta == dict.fromkeys(delta, 5), (stage, delta)
        direct = {outcome: total(after, "edge_worker_direct_results_total", stage=stage,
                                 outcome=outcome)
                         - total(before[stage], "edge_worker_direct_results_total",
                                 stage=stage, outcome=outcome)
                  for outcome in ("delivered", "dropped")}
        assert direct == {"delivered": 2 if stage == 1 else 0, "dropped": 0}, (stage, direct)
        assert get(after, "edge_worker_rss_bytes", stage=stage, device="rpi4b-2gb") > 20 << 20
        assert get(after, "edge_worker_memory_budget_bytes", stage=stage,
                   device="rpi4b-2gb") > 0


def test_a_refused_forward_is_counted_under_its_code(workers):
    w, port = workers[0]
    before = scrape(port)
    labels = dict(device="rpi4b-2gb", code="FAILED_PRECONDITION", phase="forward")
    with grpc.insecure_channel(w.address) as channel:
        stub = pb_grpc.WorkerStub(channel)
        with pytest.raises(grpc.RpcError) as e:  # an epoch it does not serve
            stub.Forward(pb.Activation(request_id="r", epoch=1), timeout=10)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    after = scrape(port)
    assert (total(after, "edge_worker_errors_total", **labels)
            - total(before, "edge_worker_errors_total", **labels)) == 1
    assert (total(after, "edge_worker_requests_total")
            - total(before, "edge_worker_requests_total")) == 1


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return export_llama("tiny", seed=0, out=tmp_path_factory.mktemp("llama") / "model.onnx")


def dashboard_names() -> set[str]:
    board = json.loads(DASHBOARD.read_text())
    assert "datasource" in [v["name"] for v in board["templating"]["list"]]
    targets = [t for p in board["panels"] for t in p.get("targets", [])]
    assert len(targets) >= 10
    assert all(t["datasource"]["uid"] == "${datasource}" for t in targets)
    exprs = [t["expr"] for t in targets]
    return {n for e in exprs for n in re.findall(r"\bedge_[a-z_]+", e)}


def test_generation_counts_tokens_and_kv_caches_and_the_dashboard_matches(llama, workers,
                                                                          tmp_path):
    addresses = [w.address for w, _ in workers]
    devices = cluster_from_profile("rpi4b-2gb", 2, addresses=addresses).devices
    plan = make_plan(llama, devices, tmp_path / "build", modes=("fp32",),
                     generation=GenerationRequest(context=64, sequences=2, prefill=16))
    before, ports = here(), [port for _, port in workers]
    with Pipeline(plan, tmp_path / "build", deadlines=Deadlines(infer=60),
                  take_over=True) as pipeline:
        pipeline.start()
        generation = Generator(pipeline).start(PROMPT, max_tokens=8)
        chunks = iter(generation)
        first = next(chunks)
        assert first.tokens
        during, on_workers = here(), [scrape(p) for p in ports]
        chunks = [first] + list(chunks)
        usage = chunks[-1].usage
        # The release frees the caches on every stage (a step sent without waiting).
        until(lambda: all(total(scrape(p), "edge_worker_kv_cache_bytes") == 0 for p in ports),
              10, "the caches to be freed", poll=0.05)
        after = here()
    # Stages with layers (``state``) hold the sequence's caches while it runs; one with
    # the head only holds none.
    cached = [bool(s.state) for s in plan.stages]
    assert any(cached)
    held = [total(s, "edge_worker_kv_cache_bytes") for s in on_workers]
    assert [b > 0 for b in held] == cached, held
    assert [total(s, "edge_worker_sequences") for s in on_workers] == [int(c) for c in cached]
    assert get(during, "edge_generate_sequences", state="active") == 1
    assert total(during, "edge_device_kv_cache_bytes") == sum(held)
    assert total(during, "edge_device_sequences") == sum(cached)

    def delta(name: str, **labels) -> float:
        return get(after, name, **labels) - get(before, name, **labels)

    n = usage.completion_tokens
    assert n == sum(len(c.tokens) for c in chunks) >= 2
    assert delta("edge_requests_total", kind="generate") == 1
    assert delta("edge_request_seconds_count", kind="generate") == 1
    assert delta("edge_prompt_tokens_total") == len(PROMPT)
    assert delta("edge_generated_tokens_total") == n
    assert delta("edge_time_to_first_token_seconds_count") == 1
    assert delta("edge_time_per_output_token_seconds_count") == n - 1
    ttft = delta("edge_time_to_first_token_seconds_sum")
    assert abs(ttft - usage.ttft_ms / 1e3) < 0.05, (ttft, usage.ttft_ms)
    assert get(after, "edge_generate_sequences", state="active") == 0

    # Every metric the dashboard queries is exported by a worker or the coordinator.
    exported = parse(generate_latest(REGISTRY).decode())[1]
    with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/metrics", timeout=10) as r:
        exported |= parse(r.read().decode())[1]
    # A labelled counter that has not counted yet exports its family only (HELP, TYPE).
    missing = {n for n in dashboard_names()
               if n not in exported and re.sub(r"_(total|bucket|count|sum)$", "", n)
               not in exported}
    assert not missing, f"the dashboard queries metrics nobody exports: {sorted(missing)}"


def test_a_failover_is_counted_by_how(tmp_path):
    primaries, spares = fake_devices(2), fake_devices(1, prefix="spare", standby=True)
    plan = fake_plan(tmp_path, primaries, spares)
    cluster = FakeCluster([d.address for d in primaries + spares])
    before = here()
    with Pipeline(plan, tmp_path, worker_factory=cluster.client, health_interval=0.01,
                  deadlines=Deadlines(infer=5, ready=0.5)) as pipeline:
        pipeline.start()
        cluster[primaries[0].address].kill()
        until(lambda: pipeline.recoveries, 10, "the recovery")
        assert pipeline.recoveries[0].how == "standby"
        after = here()
    for how in ("standby", "original", "re-planned", "unavailable"):
        assert (get(after, "edge_failovers_total", how=how)
                - get(before, "edge_failovers_total", how=how)) == (how == "standby")


def test_a_metrics_port_in_use_stops_the_worker_at_once_naming_it(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "edge", "worker", "--listen", "127.0.0.1:0",
                            "--cache-dir", str(tmp_path / "c"), "--metrics-port", str(port)],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert f"--metrics-port: cannot serve metrics on 127.0.0.1:{port}" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "edge", "worker", "--metrics-port", "70000"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "expected a TCP port 1-65535 (0: off), got 70000" in r.stderr
