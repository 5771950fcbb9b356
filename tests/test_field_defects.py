"""Small defects found by using edge as a new user would, and by attacking it (issue 12)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
import time

import numpy as np
import pytest

from edge.errors import GraphError
from edge.export.zoo import locate
from edge.planning.graph import analyze
from edge.transport.codec import encode_activation
from edge.worker.cache import ShardCache, UploadError
from helpers import unit_sections


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
    from edge.build import make_plan
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


# ---------------------------------------------------------------------- issue: one call can
# take a board's memory; roles in bundles; health without the token

MiB = 1 << 20
TOKEN = "field-defects-token-0123456789"


def activation_bytes(size: int) -> bytes:
    """A serialized Activation with one float32 tensor of ``size`` bytes (zeros: calloc's
    pages are not resident until read, so the wire bytes are the one copy)."""
    return encode_activation("big", 0, {"x": np.zeros(size // 4, dtype=np.float32)})


def _big_forwards(address: str, payload: bytes, calls: int, token: str | None) -> list:
    import grpc

    from edge.proto import edge_pb2 as pb
    from edge.transport.channels import Security, create_channel, serialized_unary

    method = pb.DESCRIPTOR.services_by_name["Worker"].methods_by_name["Forward"]
    codes = []
    with create_channel(address, security=Security(token=token)) as ch:
        forward = serialized_unary(ch, method, pb.Ack)
        for _ in range(calls):
            try:
                forward(payload, timeout=60)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                codes.append(e.code())
    return codes


@pytest.fixture
def token_worker(tmp_path):
    """``start(*args)``: a real `edge worker` process that requires TOKEN; stopped after."""
    from edge.worker.launch import spawn_worker

    (tmp_path / "token").write_text(TOKEN)
    started = []

    def start(*args: str):
        w = spawn_worker(tmp_path, f"w{len(started)}", threads=1,
                         extra_args=["--token-file", str(tmp_path / "token"), *args])
        started.append(w)
        time.sleep(0.5)  # let its startup settle before measuring
        return w

    try:
        yield start
    finally:
        for w in started:
            w.stop()


def test_a_call_over_the_receive_limit_is_refused_before_it_is_buffered(token_worker):
    """A 1 GB board (--memory-budget 900: messages up to 112 MiB): 480 MB calls, with and
    without the token, are refused by gRPC from the message header; the worker's memory
    does not move (before: peak 1.5-1.9 GiB, 1 GiB left after)."""
    import grpc

    from edge.profiling.memory import memory_breakdown

    w = token_worker("--memory-budget", "900")
    assert "messages up to 112 MiB" in w.log()
    before = memory_breakdown(w.process.pid)["rss"]
    payload = activation_bytes(480_000_000)
    bare = _big_forwards(w.address, payload, 3, None)
    authed = _big_forwards(w.address, payload, 5, TOKEN)
    del payload
    # without the token the call is refused before its message is even read
    assert set(bare) <= {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert authed == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 5
    mem = memory_breakdown(w.process.pid)
    assert mem["peak_rss"] - before < 150 * MiB, mem
    assert mem["rss"] - before < 150 * MiB, mem


def test_refused_calls_within_the_limit_leave_no_memory_behind(token_worker):
    """Under the receive limit: a call without the token is refused unread (it used to be
    buffered and parsed first); one with the token that the worker refuses (no stage yet)
    gives its memory back when it ends (it used to stay as free heap)."""
    import grpc

    from edge.profiling.memory import memory_breakdown

    w = token_worker("--max-message-mb", "256")
    pid = w.process.pid
    before = memory_breakdown(pid)["rss"]
    payload = activation_bytes(100_000_000)
    assert _big_forwards(w.address, payload, 3, None) == [grpc.StatusCode.UNAUTHENTICATED] * 3
    mem = memory_breakdown(pid)
    assert mem["peak_rss"] - before < 150 * MiB, mem
    assert _big_forwards(w.address, payload, 5, TOKEN) == \
        [grpc.StatusCode.FAILED_PRECONDITION] * 5
    mem = memory_breakdown(pid)
    assert mem["rss"] - before < 150 * MiB, mem


def test_forward_and_upload_chunks_are_bounded_per_method(tmp_path):
    """A Forward larger than the plan allows the stage, and an upload chunk over 1 MiB,
    are RESOURCE_EXHAUSTED before they are parsed."""
    import grpc

    from edge.proto import edge_pb2 as pb
    from edge.proto import edge_pb2_grpc as pb_grpc
    from edge.transport.channels import create_channel
    from edge.worker.server import WorkerConfig, start_worker
    from test_worker import chunks, config, make_shard

    sha = make_shard(tmp_path / "shard.onnx")
    server, port, servicer, _ = start_worker(WorkerConfig(listen="127.0.0.1:0",
                                                          cache_dir=tmp_path / "cache"))
    try:
        with create_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.WorkerStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                stub.UploadShard(iter([pb.ShardChunk(header=pb.ShardHeader(sha256=sha,
                                                                          size=2 * MiB)),
                                       pb.ShardChunk(data=b"\0" * 2 * MiB)]), timeout=10)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "upload chunks of up to 1 MiB" in e.value.details()
            stub.UploadShard(chunks(sha, (tmp_path / "shard.onnx").read_bytes()), timeout=10)
            cfg = config(sha)
            cfg.max_request_bytes = 64 << 10
            stub.Configure(cfg, timeout=30)
            with pytest.raises(grpc.RpcError) as e:
                stub.Forward(pb.Activation.FromString(activation_bytes(100 << 10)), timeout=10)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "expected at most 0.1 MiB (the largest the plan allows stage 0)" in \
                e.value.details()
    finally:
        server.stop(0).wait()
        servicer.stop()


def test_the_plans_largest_request_bounds_the_coordinators_messages(tmp_path):
    """Every request the memory guard lets through fits the coordinator's receive limit,
    which is far below the 512 MiB every server took before."""
    import math

    from edge.coordinator.guard import check_fits, largest, largest_request_bytes
    from edge.coordinator.server import receive_limit
    from edge.build import make_plan
    from edge.planning.plan import Device

    devices = [Device(name=f"d{i}", address=f"127.0.0.1:{5000 + i}", profile="t",
                      memory_mb=1024, gflops=g, bandwidth_mbps=1000.0)
               for i, g in enumerate((1.0, 1.5))]
    plan = make_plan(locate("ppocr-cls"), devices, tmp_path, bindings={"x:2": 48, "x:3": 192})
    limit = receive_limit(plan)
    assert limit == largest_request_bytes(plan) < 256 * MiB
    for dim in plan.model.bindings:  # each dim at its largest
        sizes = {**plan.model.bindings, dim: largest(plan, dim)}
        check_fits(plan, sizes)
        assert 4 * 3 * math.prod(sizes.values()) < limit
    for i in range(len(plan.stages)):
        assert largest_request_bytes(plan, i) <= 1024 * MiB


def test_health_answers_without_the_token_and_nothing_else_does(tmp_path):
    """Kubernetes' gRPC probes and grpc_health_probe cannot send the token."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from edge.proto import edge_pb2 as pb
    from edge.proto import edge_pb2_grpc as pb_grpc
    from edge.transport.channels import Security, create_channel
    from edge.worker.server import WorkerConfig, start_worker

    server, port, servicer, _ = start_worker(WorkerConfig(
        listen="127.0.0.1:0", cache_dir=tmp_path / "cache", security=Security(token=TOKEN)))
    try:
        with create_channel(f"127.0.0.1:{port}") as ch:  # no token
            for service in ("", "edge.v1.Worker"):
                reply = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.WorkerStub(ch).GetStatus(pb.StatusRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(0).wait()
        servicer.stop()


@pytest.fixture(scope="module")
def role_pki(tmp_path_factory):
    """A cluster CA with a node bundle (the default role) and a client bundle."""
    from edge.cli import main

    root = tmp_path_factory.mktemp("roles")
    assert main(["certs", "init", "--dir", str(root)]) == 0
    assert main(["certs", "issue", "pi-0", "--dir", str(root)]) == 0
    assert main(["certs", "issue", "laptop", "--role", "client", "--dir", str(root)]) == 0
    return root


def test_bundles_carry_their_role(role_pki, capsys):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from edge.cli import main

    for name, role in (("pi-0", "node"), ("laptop", "client")):
        cert = x509.load_pem_x509_certificate((role_pki / name / "node.crt").read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"edge:role:{role}"]
        ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        assert [a.value for a in ou] == [role]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["certs", "issue", "x", "--role", "admin", "--dir", str(role_pki)])
    assert "invalid choice: 'admin'" in capsys.readouterr().err
    assert main(["certs", "issue", "cli", "--role", "client", "--dir", str(role_pki)]) == 0
    assert "role client" in capsys.readouterr().out


def test_a_client_bundle_may_only_send_requests(role_pki, tmp_path):
    """A client certificate cannot read other requests' results (Subscribe, but for its own
    as a direct client) nor drive a worker (Configure, status, uploads): PERMISSION_DENIED
    naming the role it needs. It may call the coordinator's client-facing RPCs; a node may
    call everything."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from edge.coordinator.server import CoordinatorServicer
    from edge.proto import edge_pb2 as pb
    from edge.proto import edge_pb2_grpc as pb_grpc
    from edge.transport.channels import Security, create_channel, create_server
    from edge.transport.services import add_service
    from edge.worker.server import WorkerConfig, start_worker

    node, client = (Security.from_dir(role_pki / n) for n in ("pi-0", "laptop"))
    server, port, servicer, _ = start_worker(WorkerConfig(
        listen="127.0.0.1:0", cache_dir=tmp_path / "cache", security=node))

    class Pipeline:  # what CoordinatorServicer's status and profile read
        security = node

        def status(self):
            return pb.ClusterStatus(plan_id="p")

        def profile(self, since):
            return pb.ClusterProfile()

    coordinator, cport = create_server("127.0.0.1:0", security=node, on_loop=True)
    add_service(coordinator, CoordinatorServicer(Pipeline()), pb, "Coordinator")
    coordinator.start()
    try:
        address = f"127.0.0.1:{port}"
        with create_channel(address, security=client) as ch:
            worker = pb_grpc.WorkerStub(ch)
            calls = {
                "Configure": lambda: worker.Configure(pb.StageConfig(), timeout=5),
                "GetStatus": lambda: worker.GetStatus(pb.StatusRequest(), timeout=5),
                "UploadShard": lambda: worker.UploadShard(iter([pb.ShardChunk(
                    header=pb.ShardHeader(sha256="0" * 64, size=1))]), timeout=5),
            }
            for name, call in calls.items():
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
                assert f"Worker/{name} needs a certificate of role node" in e.value.details()
                assert "(laptop) has role client" in e.value.details()
            # As a direct client only: its own results at the last stage, requests with
            # a reply_to to the first (this worker has no stage yet).
            narrowed = {
                "expected a client_id": lambda: next(worker.Subscribe(
                    pb.SubscribeRequest(), timeout=5)),
                "only at the last stage": lambda: next(worker.Subscribe(
                    pb.SubscribeRequest(client_id="c"), timeout=5)),
                "expected a reply_to": lambda: worker.Forward(
                    pb.Activation(request_id="r"), timeout=5),
            }
            for what, call in narrowed.items():
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, what
                assert what in e.value.details()
            assert health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        with create_channel(address, security=node) as ch:
            assert pb_grpc.WorkerStub(ch).GetStatus(pb.StatusRequest(), timeout=5).version
        with create_channel(f"127.0.0.1:{cport}", security=client) as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            assert stub.GetClusterStatus(pb.ClusterStatusRequest(), timeout=5).plan_id == "p"
            stub.GetClusterProfile(pb.ProfileRequest(), timeout=5)
            with pytest.raises(grpc.RpcError) as e:  # reaches Infer: it is not refused
                stub.Infer(pb.InferRequest(inputs=[pb.Tensor(name="x", dtype="nope")]),
                           timeout=5)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        coordinator.stop(0)
        server.stop(0).wait()
        servicer.stop()


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
    from edge.build import make_plan
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
    from edge.build import make_plan
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


# --- item 10: the distribution is edge-runtime; the worker installer ----------

REPO = Path(__file__).resolve().parents[1]
INSTALLER = REPO / "devices" / "install-worker.sh"
UNIT = REPO / "deploy" / "systemd" / "edge-worker.service"
_INDEX_NAME = re.compile(r"^edge(\[[^\]]*\])?([=<>~!;].*)?$")  # "edge" as an index requirement


def test_the_distribution_is_edge_runtime_and_the_command_edge():
    import tomllib

    import edge

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["name"] == edge.DISTRIBUTION == "edge-runtime"
    assert project["scripts"] == {"edge": "edge.cli:main"}
    assert "edge-runtime[export,plot]" in project["optional-dependencies"]["dev"]


def _pip_install_arguments(text: str):
    for line in text.splitlines():
        for command in re.split(r"&&|\|\||[;|`]", line.split("#", 1)[0]):
            m = re.search(r"\bpip3?\b.*?\binstall\b(.*)", command)
            if m:
                for token in m.group(1).split():
                    yield line, token.strip("'\"()")


def test_nothing_installs_the_name_edge_from_an_index():
    files = [REPO / "README.md", REPO / "BENCHMARKS.md", *REPO.glob("devices/*"),
             *REPO.glob("edge/**/*.py")]
    for path in files:
        if not path.is_file():
            continue
        for line, token in _pip_install_arguments(path.read_text(errors="replace")):
            assert not _INDEX_NAME.match(token), f"{path.name}: {line.strip()}"


def test_installer_and_unit_parse():
    for shell in ("sh", "bash"):
        r = subprocess.run([shell, "-n", str(INSTALLER)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    sections = unit_sections(UNIT)
    service, unit = sections["Service"], sections["Unit"]
    assert service["DynamicUser"] == ["yes"] and service["StateDirectory"] == ["edge"]
    assert service["ExecStart"] == ["/opt/edge/venv/bin/edge worker"]  # settings: EDGE_*
    assert "EDGE_CACHE_DIR=/var/lib/edge/cache" in service["Environment"]  # the state dir
    assert int(unit["StartLimitBurst"][0]) > 0  # a worker that cannot start is not retried forever
    if shutil.which("systemd-analyze"):
        # verify wants ExecStart's binary to exist; the unit is otherwise checked as is.
        d = Path(tempfile.mkdtemp())
        (d / UNIT.name).write_text(UNIT.read_text().replace("/opt/edge/venv/bin/edge",
                                                            "/bin/true"))
        r = subprocess.run(["systemd-analyze", "verify", str(d / UNIT.name)],
                           capture_output=True, text=True)
        assert r.returncode == 0 and "Unknown" not in r.stderr, r.stderr


def _run_installer(tmp_path: Path, script: Path, *args: str, **env: str):
    """The installer with every command that changes this machine stubbed to fail loudly,
    and `id -u` saying "not root": these runs must stop in its checks."""
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    for name in ("apt-get", "useradd", "systemctl", "python3", "chown", "journalctl"):
        (stubs / name).write_text("#!/bin/sh\necho \"stub $0 reached\" >&2\nexit 99\n")
        (stubs / name).chmod(0o755)
    (stubs / "id").write_text("#!/bin/sh\necho 1000\n")
    (stubs / "id").chmod(0o755)
    return subprocess.run(["sh", str(script), *args], capture_output=True, text=True,
                          timeout=30, cwd=tmp_path,
                          env={**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", **env})


@pytest.mark.parametrize("spec", ["edge", "edge==0.4.0", "edge-runtime", "edge[plot]"])
def test_installer_refuses_to_install_from_an_index(tmp_path, spec):
    r = _run_installer(tmp_path, INSTALLER, "rpi4b-2gb", "--from", spec)
    assert r.returncode == 1
    assert "unrelated package" in r.stderr and "not published yet" in r.stderr
    assert "stub" not in r.stderr


def test_installer_defaults_to_its_clone_and_says_so_outside_one(tmp_path):
    # In the clone: the checks pass and it stops at the bundle (or at "run as root").
    r = _run_installer(tmp_path, INSTALLER, "rpi4b-2gb", CERTS=str(tmp_path / "none"))
    assert r.returncode == 1 and "CERTS=" in r.stderr and "stub" not in r.stderr, r.stderr
    # A copy outside a clone: no PyPI fallback.
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(INSTALLER, lone)
    shutil.copy(REPO / "devices" / "rpi4b-2gb.yaml", lone)
    r = _run_installer(tmp_path, lone / INSTALLER.name, "rpi4b-2gb")
    assert r.returncode == 1 and "not on PyPI yet" in r.stderr and "--from" in r.stderr


def test_installer_checks_the_service_and_restarts_it():
    text = INSTALLER.read_text()
    assert "systemctl restart" in text  # a second run runs the new code
    assert "systemctl is-active" in text and "journalctl -u" in text
    assert text.index("systemctl is-active") < text.index("listening on port")
    assert "chown -R edge" not in text  # the worker does not own its code


# --- item 13: a missing optional package gets the pip command -----------------


def _without(tmp_path: Path, *modules: str) -> dict:
    """An environment whose Python cannot import ``modules`` (a sitecustomize puts None in
    sys.modules for them, as if they were not installed)."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules))
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path}


@pytest.mark.parametrize("args", [["export", "bert", "--size", "tiny", "--out", "m.onnx"],
                                  ["demo", "--size", "tiny"]])
def test_a_missing_torch_gets_the_pip_command(tmp_path, args):
    r = subprocess.run([sys.executable, "-m", "edge", *args], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path, env=_without(tmp_path, "torch"))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1, r.stderr  # one line
    assert "torch is not installed" in r.stderr
    assert "pip install torch==2.13.0 && pip install -e '" in r.stderr
    assert "[export]'" in r.stderr


def test_a_missing_matplotlib_gets_the_pip_command(tmp_path):
    from edge._extras import TORCH_PIN, missing_package
    from edge.errors import MissingPackageError
    from edge.profiling.report import matplotlib_agg

    code = ("from edge.profiling.report import matplotlib_agg\n"
            "matplotlib_agg('memory.png')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, env=_without(tmp_path, "matplotlib"))
    assert "MissingPackageError" in r.stderr and "[plot]'" in r.stderr
    assert "drawing memory.png" in r.stderr
    err = missing_package("matplotlib.figure")
    assert isinstance(err, MissingPackageError) and err.extra == "plot"
    assert missing_package("numpy") is None  # a core dependency: a real bug, not a hint
    import tomllib

    export = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["export"]
    assert TORCH_PIN in export  # the command names the version pyproject pins
    assert matplotlib_agg  # imported fine here


# --- item 11: workers started from a folder that holds an `edge/` -------------


@pytest.mark.parametrize("decoy", ["clone", "broken"])
def test_a_folder_named_edge_does_not_shadow_the_workers_package(tmp_path, monkeypatch, decoy):
    """The Quick start runs from a folder holding the clone as `edge/`: `python -m edge`
    imported that folder (a namespace package) and every status call failed."""
    from edge.proto import edge_pb2 as pb
    from edge.proto import edge_pb2_grpc as pb_grpc
    from edge.transport.channels import create_channel
    from edge.worker.launch import spawn_worker

    here = tmp_path / "here"
    (here / "edge").mkdir(parents=True)
    # "clone" is the Quick start's layout: the clone's top, no __init__.py, a namespace
    # package. It shadows only an editable install (its finder comes after the current
    # folder's); under PYTHONPATH the real package wins anyway. "broken" shadows always.
    if decoy == "clone":
        (here / "edge" / "pyproject.toml").write_text("[project]\nname = 'edge-runtime'\n")
    else:
        (here / "edge" / "__init__.py").write_text("raise ImportError('the decoy edge')\n")
    monkeypatch.chdir(here)
    w = spawn_worker(tmp_path / "w", "w", timeout=60)
    try:
        with create_channel(w.address) as channel:
            status = pb_grpc.WorkerStub(channel).GetStatus(pb.StatusRequest(), timeout=10)
    finally:
        w.stop()
    assert status.peak_rss_bytes > 10 << 20 and status.version


def test_a_missing_peak_is_not_measured_and_fails():
    from edge.bench.report import _rss_row
    from edge.console import NOT_MEASURED, measured_peak_mib
    from edge.proto import edge_pb2 as pb

    status = pb.ClusterStatus()
    status.stages.add(stage=0, healthy=False)  # its status call failed
    zero = status.stages.add(stage=1, healthy=True)
    zero.worker.peak_rss_bytes = 0
    good = status.stages.add(stage=2, healthy=True)
    good.worker.peak_rss_bytes = 150 << 20
    assert [measured_peak_mib(s) for s in status.stages] == [None, None, 150.0]
    assert NOT_MEASURED == "not measured"

    b = {"targets": {"peak_rss_ratio_max": 0.5}, "peak_rss_ratio_max": None, "met_rss": False,
         "rss_not_measured": [1],
         "stages": [{"stage": 0, "edge_peak_rss_mib": 40.0, "torch_peak_rss_mib": 300.0},
                    {"stage": 1, "edge_peak_rss_mib": None, "torch_peak_rss_mib": 300.0}]}
    row = _rss_row(b)
    assert row[1] == "not measured" and row[-1] == "**no**" and "stage(s) 1" in row[3]
    b.update(rss_not_measured=[], peak_rss_ratio_max=0.13, met_rss=True)
    b["stages"][1]["edge_peak_rss_mib"] = 38.0
    assert _rss_row(b)[1] == "40 MiB max" and _rss_row(b)[-1] == "yes"



def test_a_corrupt_last_shard_fails_before_any_upload(tmp_path):
    """Every file of the plan is checked before the first upload: the workers' caches stay
    empty and the error names the file, the digest expected and the one found."""
    from edge.coordinator.deploy import DeployError, connect, deploy
    from edge.build import make_plan
    from edge.planning.plan import Device
    from edge.transport.channels import Deadlines, Security
    from edge.worker.launch import spawn_worker

    workers = [spawn_worker(tmp_path / "w", f"w{i}") for i in range(2)]
    try:
        devices = [Device(name=f"d{i}", address=w.address, profile="t", memory_mb=4096,
                          gflops=g, bandwidth_mbps=1000.0)
                   for i, (w, g) in enumerate(zip(workers, (1.0, 1.5)))]
        plan = make_plan(locate("ppocr-cls"), devices, tmp_path / "build",
                         bindings={"x:2": 48, "x:3": 192})
        assert len(plan.stages) == 2
        last = tmp_path / "build" / plan.stages[-1].shard
        data = bytearray(last.read_bytes())
        data[-1] ^= 0xFF  # same size, another digest
        last.write_bytes(bytes(data))
        handles = [connect(s, Security()) for s in plan.stages]
        try:
            with pytest.raises(DeployError) as e:
                deploy(plan, tmp_path / "build", handles, 1, Deadlines(ready=20))
        finally:
            for h in handles:
                h.close()
        msg = str(e.value)
        assert last.name in msg and f"expected sha256 {plan.stages[-1].sha256}" in msg
        assert "nothing was uploaded" in msg
        for w in workers:  # not even stage 0's shard
            assert not [p for p in w.cache_dir.rglob("*") if p.is_file()], w.cache_dir
    finally:
        for w in workers:
            w.stop()


# --- item 8: the upload line when everything is cached ----------------------


def test_upload_progress_counts_only_bytes_sent():
    from edge.console import format_upload

    assert format_upload(16_000_000, 0, 0, 0.0) == "all 16.0 MB cached, nothing uploaded"
    assert "GB/s" not in format_upload(16_000_000, 0, 0, 0.001)
    assert (format_upload(16_000_000, 12_000_000, 6_000_000, 2.0)
            == "6.0 MB/12.0 MB uploaded at 3.0 MB/s, 4.0 MB cached")
    assert format_upload(8_000_000, 8_000_000, 8_000_000, 0.01) == "8.0 MB/8.0 MB uploaded"


# --- item 13: calibrated profiles go to the user's folder --------------------


def test_calibrate_write_goes_to_the_users_folder_not_the_package(tmp_path, monkeypatch):
    from edge.planning.cluster import (list_profiles, load_profile, profiles_dir,
                                       update_profile, user_profiles_dir)
    from edge.worker.launch import spawn_worker

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("EDGE_DEVICES_DIR", raising=False)
    shipped = profiles_dir() / "rpi4b-2gb.yaml"
    before = shipped.read_text()
    w = spawn_worker(tmp_path, "w", device="rpi4b-2gb")
    try:
        r = subprocess.run([sys.executable, "-m", "edge", "calibrate", "--worker", w.address,
                            "--seconds", "0.3", "--link-rounds", "1", "--no-link", "--write"],
                           capture_output=True, text=True, timeout=120,
                           env={**os.environ, "HOME": str(home)})
    finally:
        w.stop()
    assert r.returncode == 0, r.stderr
    mine = home / ".config" / "edge" / "devices" / "rpi4b-2gb.yaml"
    assert user_profiles_dir() == mine.parent and str(mine) in r.stdout
    assert shipped.read_text() == before  # the package is untouched
    assert mine.read_text().count("measured by edge calibrate") == 2
    # Read first: the measured profile overrides the shipped one of the same name.
    assert load_profile("rpi4b-2gb") == load_profile(mine) != load_profile(shipped)
    assert list_profiles().count("rpi4b-2gb") == 1
    update_profile("rpi4b-2gb", {"gflops": 3.25}, "by hand")  # again: in the same file
    assert load_profile("rpi4b-2gb").gflops == 3.25 and shipped.read_text() == before


# ---------------------------------------------------------------- failover (issue 12, items 1-4)
#
# Small and fast: BERT-tiny (one rpi4b-2gb holds it whole) on local workers with one
# onnxruntime thread each, as tests/test_failover.py runs them.

FAILOVER_BINDINGS = {"batch": 1, "sequence": 16}


def _until(condition, timeout: float, what: str) -> None:
    """Wait for ``condition()`` (polled: it asks other processes) or fail saying ``what``."""
    from helpers import until

    until(condition, timeout, what, poll=0.05)


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
    from edge.build import make_plan
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
    from edge.build import make_plan
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
    from edge.build import make_plan
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


def test_a_deployment_that_fails_lets_go_of_what_it_configured(owned_cluster, bert_tiny):
    """CI, 2026-11-29: a coordinator closed in the middle of a re-deployment left a worker
    it had configured claimed for 30 s, and the next coordinator was refused ("configured
    this worker 1.3 s ago and has not subscribed yet"). A deployment that fails or stops,
    and a coordinator that closes, now let go of their workers."""
    import dataclasses

    import grpc

    from edge.coordinator.deploy import DeployError, Link, configure, upload_shard
    from edge.transport.channels import Deadlines, Security

    workers, plan, plan_dir = owned_cluster
    first = workers.workers[0].address
    solo = dataclasses.replace(plan, stages=(dataclasses.replace(plan.stages[0], index=0),))
    link = Link.open(first, Security())
    try:
        w = link.handle(solo.stages[0])
        upload_shard(w, plan_dir, Deadlines())
        configure(w, solo, 7, Deadlines(), coordinator_id="rival")  # deploying, so alive
        with _pipeline(owned_cluster) as refused:
            with pytest.raises(DeployError) as e:
                refused.start()  # configures the last stage, then is refused the first
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION, str(e.value)
        assert e.value.address == first and "rival" in str(e.value), str(e.value)
        assert e.value.configured == (workers.workers[1].address,), e.value.configured
        w.client.release("someone-else", 5)  # from anyone but the owner: nothing changes
        with pytest.raises(DeployError):
            configure(w, solo, 8, Deadlines(), coordinator_id="c-next")
        w.client.release("rival", 5)
    finally:
        link.close()
    # Neither the rival's claim nor the refused coordinator's holds any longer.
    with _pipeline(owned_cluster) as pipeline:
        pipeline.start()
        _check_answer(pipeline, bert_tiny, _tiny_input())


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


def test_a_coordinator_stopped_while_deploying_exits_cleanly(bert_tiny, tmp_path):
    """SIGTERM (systemd, k3s) during a deployment killed the process where it stood, past
    the code that lets go of the workers it had configured; Ctrl-C printed a traceback."""
    import signal
    import socket

    import yaml

    from edge.worker.launch import LocalWorkers

    with socket.socket() as s:  # a port with no worker behind it
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    with LocalWorkers(1, tmp_path / "w", threads=1) as workers:
        cluster = {"devices": [{"name": f"pi-{i}", "address": a, "profile": "rpi4b-2gb"}
                               for i, a in enumerate([workers.addresses[0], dead])]}
        (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cluster))
        run = edge("plan", str(bert_tiny), "--cluster", str(tmp_path / "cluster.yaml"),
                   "--out", str(tmp_path / "build"), "--dim", "sequence=16")
        assert run.returncode == 0, run.stderr
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # as systemd's
        notify.bind(str(tmp_path / "notify"))
        notify.settimeout(60)
        coordinator = subprocess.Popen(
            [sys.executable, "-m", "edge", "coordinator", "--plan", str(tmp_path / "build"),
             "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")})
        try:
            said = notify.recv(4096).decode()
            assert said.startswith("STATUS=deploying"), said
            time.sleep(1)  # deploying: waiting for the device that is not there
            assert coordinator.poll() is None, coordinator.communicate()
            coordinator.send_signal(signal.SIGTERM)
            out, err = coordinator.communicate(timeout=30)
        finally:
            coordinator.kill()
            notify.close()
    assert coordinator.returncode == 130, (out, err)
    assert "stopped while deploying" in err and "Traceback" not in err, err


def test_edge_coordinator_has_take_over():
    run = edge("coordinator", "--help")
    assert run.returncode == 0 and "--take-over" in run.stdout, run.stdout
