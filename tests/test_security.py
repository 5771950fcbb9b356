"""Security on by default: mutual TLS under the cluster CA, the cluster token on every call,
plaintext refused off loopback, and nothing in edge that unpickles.

Real servers on loopback port 0. A tampered shard is covered in test_worker.py
(test_tampered_cache_file_is_not_loaded, and the external-data case of
test_external_data_files_travel_and_are_checked): DATA_LOSS, nothing loaded.
"""

from __future__ import annotations

import ast
import stat
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import edge
from edge.cli import main
from edge.errors import SecurityError
from edge.proto import edge_pb2 as pb
from edge.proto import edge_pb2_grpc as pb_grpc
from edge.transport.channels import _OPTIONS, create_channel, create_server
from edge.transport.security import CLUSTER_NAME, Security
from edge.worker.server import WorkerConfig, start_worker

TOKEN_WRONG = "w" * 43


def _certs(*args: str) -> None:
    assert main(["certs", *args]) == 0


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A cluster CA with bundles coordinator, pi-0, pi-1 (role node), laptop (role
    client); and a stranger's CA."""
    root = tmp_path_factory.mktemp("pki")
    _certs("init", "--dir", str(root / "ca"))
    _certs("issue", "coordinator", "--dir", str(root / "ca"), "--host", "127.0.0.1")  # node
    for name in ("pi-0", "pi-1"):
        _certs("issue", name, "--dir", str(root / "ca"), "--host", "127.0.0.1", "--role", "node")
    _certs("issue", "laptop", "--dir", str(root / "ca"), "--host", "127.0.0.1", "--role", "client")
    _certs("init", "--dir", str(root / "other"))
    _certs("issue", "stranger", "--dir", str(root / "other"))
    return {"ca": root / "ca", **{n: root / "ca" / n for n in
                                  ("coordinator", "pi-0", "pi-1", "laptop")},
            "stranger": root / "other" / "stranger"}


@pytest.fixture
def tls_worker(pki, tmp_path):
    """An in-process worker with pi-0's bundle; yields its address."""
    config = WorkerConfig(listen="127.0.0.1:0", cache_dir=tmp_path / "cache",
                          security=Security.from_dir(pki["pi-0"]))
    server, port, servicer, _ = start_worker(config)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0).wait()
        servicer.stop()


def status(address: str, security: Security = Security(), channel=None) -> pb.WorkerStatus:
    with channel or create_channel(address, security=security) as ch:
        return pb_grpc.WorkerStub(ch).GetStatus(pb.StatusRequest(), timeout=5)


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value


# ---------------------------------------------------------------------- certs


def test_certs_init_and_issue_make_a_ca_and_private_bundles(pki):
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca_dir = pki["ca"]
    assert {p.name for p in ca_dir.iterdir()} >= {"ca.crt", "ca.key", "token"}
    bundle = pki["pi-0"]
    assert sorted(p.name for p in bundle.iterdir()) == ["ca.crt", "node.crt", "node.key", "token"]
    for private in (ca_dir / "ca.key", ca_dir / "token", bundle / "node.key", bundle / "token"):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o700
    assert (bundle / "token").read_text() == (ca_dir / "token").read_text()
    assert len((ca_dir / "token").read_text().strip()) >= 32

    ca = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((bundle / "node.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"pi-0", CLUSTER_NAME}
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    other = x509.load_pem_x509_certificate((pki["stranger"] / "node.crt").read_bytes())
    with pytest.raises(Exception):
        other.verify_directly_issued_by(ca)


def test_certs_refuse_to_overwrite_and_bad_input(pki, tmp_path, capsys):
    assert main(["certs", "init", "--dir", str(pki["ca"])]) == 2
    assert "has a CA already" in capsys.readouterr().err
    assert main(["certs", "issue", "pi-0", "--dir", str(pki["ca"])]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["certs", "issue", "../evil", "--dir", str(pki["ca"])]) == 2
    assert "expected 1-63 of letters" in capsys.readouterr().err
    assert main(["certs", "issue", "x", "--dir", str(tmp_path / "none")]) == 2
    assert "run `edge certs init" in capsys.readouterr().err


def test_bundle_errors_say_what_is_wrong(pki, tmp_path):
    with pytest.raises(SecurityError, match="is the CA folder"):
        Security.from_dir(pki["ca"])
    with pytest.raises(SecurityError, match="no such folder"):
        Security.from_dir(tmp_path / "missing")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "ca.crt").write_bytes((pki["pi-0"] / "ca.crt").read_bytes())
    with pytest.raises(SecurityError, match="missing node.crt, node.key, token"):
        Security.from_dir(partial)
    with pytest.raises(SecurityError, match="contradict"):
        Security.from_options(str(pki["pi-0"]), insecure=True)


def test_bare_bundle_name_resolves_in_the_certs_home(pki, monkeypatch, tmp_path):
    monkeypatch.setenv("EDGE_CERTS", str(pki["ca"]))
    monkeypatch.chdir(tmp_path)
    assert Security.from_dir("laptop").source == str(pki["laptop"])


# ---------------------------------------------------------------------- mutual TLS


def test_worker_serves_a_client_with_a_bundle_of_its_cluster(tls_worker, pki):
    security = Security.from_dir(pki["coordinator"])
    assert status(tls_worker, security).configured is False
    with create_channel(tls_worker, security=security) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="edge.v1.Worker"), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_client_is_refused_by_the_handshake(tls_worker):
    e = refused(lambda: status(tls_worker))
    assert e.code() == grpc.StatusCode.UNAVAILABLE


def test_client_without_a_certificate_is_refused(tls_worker, pki):
    creds = grpc.ssl_channel_credentials(root_certificates=(pki["ca"] / "ca.crt").read_bytes())
    channel = grpc.secure_channel(tls_worker, creds, options=_OPTIONS + [
        ("grpc.ssl_target_name_override", CLUSTER_NAME)])
    e = refused(lambda: status(tls_worker, channel=channel))
    assert e.code() == grpc.StatusCode.UNAVAILABLE


def test_client_certificate_of_another_ca_is_refused(tls_worker, pki):
    # Trusts the worker's CA (so only the worker's check of the client can fail) but
    # presents a certificate signed by another CA, with this cluster's token.
    ours, theirs = Security.from_dir(pki["laptop"]), Security.from_dir(pki["stranger"])
    mixed = Security(ca=ours.ca, cert=theirs.cert, key=theirs.key, token=ours.token)
    e = refused(lambda: status(tls_worker, mixed))
    assert e.code() == grpc.StatusCode.UNAVAILABLE
    # And a client of another cluster does not trust this worker either.
    e = refused(lambda: status(tls_worker, theirs))
    assert e.code() == grpc.StatusCode.UNAVAILABLE


def test_valid_certificate_with_a_wrong_or_no_token_is_unauthenticated(tls_worker, pki):
    good = Security.from_dir(pki["laptop"])
    cases = [(Security(ca=good.ca, cert=good.cert, key=good.key, token=TOKEN_WRONG),
              "does not match"),
             (Security(ca=good.ca, cert=good.cert, key=good.key), "none was sent")]
    for security, message in cases:
        with create_channel(tls_worker, security=security) as ch:
            worker, health = pb_grpc.WorkerStub(ch), health_pb2_grpc.HealthStub(ch)
            calls = {  # every service and every kind of call
                "GetStatus": lambda: worker.GetStatus(pb.StatusRequest(), timeout=5),
                "Forward": lambda: worker.Forward(pb.Activation(request_id="r"), timeout=5),
                "Subscribe": lambda: next(worker.Subscribe(pb.SubscribeRequest(), timeout=5)),
                "UploadShard": lambda: worker.UploadShard(
                    iter([pb.ShardChunk(header=pb.ShardHeader(sha256="0" * 64, size=1))]),
                    timeout=5),
            }
            for name, call in calls.items():
                e = refused(call)
                assert e.code() == grpc.StatusCode.UNAUTHENTICATED, (name, e)
                assert message in e.details(), (name, e.details())
                assert good.token not in e.details() and TOKEN_WRONG not in e.details()
            # Health alone needs no token (probes cannot send one), but still the certificate.
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING


def test_insecure_mode_still_checks_a_token_file(tmp_path):
    token = "t0ken-" * 6
    (tmp_path / "token").write_text(token + "\n")
    server_side = Security.from_options(insecure=True, token_file=str(tmp_path / "token"))
    server, port = create_server("127.0.0.1:0", security=server_side)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", {
        "Echo": grpc.unary_unary_rpc_method_handler(lambda r, c: r)}),))
    server.start()
    try:
        address = f"127.0.0.1:{port}"
        for security, code in ((Security(), grpc.StatusCode.UNAUTHENTICATED),
                               (Security(token=token), None)):
            with create_channel(address, security=security) as ch:
                echo = ch.unary_unary("/t.T/Echo")
                if code:
                    assert refused(lambda: echo(b"x", timeout=5)).code() == code
                else:
                    assert echo(b"x", timeout=5) == b"x"
                # health is open, token or not
                assert health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=5).status == \
                    health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(0)


# ---------------------------------------------------------------------- plaintext off loopback


def test_plaintext_is_refused_off_loopback_in_one_place():
    for address in ("0.0.0.0:1", "192.168.1.20:50051", "pi-0.local:50051", "[::]:1"):
        with pytest.raises(SecurityError, match=r"--certs DIR .* or --insecure"):
            create_channel(address)
        with pytest.raises(SecurityError, match="refusing to listen on"):
            create_server(address)
    for address in ("127.0.0.1:0", "localhost:0", "[::1]:0"):
        Security().require_safe(address, "listen on")
    create_channel("192.168.1.20:50051", security=Security.plaintext()).close()


def test_cli_clients_refuse_plaintext_off_loopback(tmp_path, capsys):
    np.savez(tmp_path / "in.npz", x=np.zeros(1))
    assert main(["infer", "--coordinator", "192.0.2.1:50050", "--input", str(tmp_path / "in.npz"),
                 "--output", str(tmp_path / "out.npz")]) == 2
    assert "refusing to connect to 192.0.2.1:50050 in plaintext" in capsys.readouterr().err
    assert main(["calibrate", "--worker", "192.0.2.1:50051"]) == 2
    assert "Pass --certs DIR" in capsys.readouterr().err
    assert main(["profile", "--coordinator", "192.0.2.1:50050"]) == 2
    assert "refusing to connect to 192.0.2.1:50050" in capsys.readouterr().err


def test_plaintext_worker_will_not_forward_off_loopback(tmp_path):
    """The worker-to-worker hop obeys the same rule: a plaintext worker configured with a
    LAN next hop says so instead of sending activations in the clear."""
    from test_worker import chunks, config, make_shard

    sha = make_shard(tmp_path / "shard.onnx")
    server, port, servicer, _ = start_worker(WorkerConfig(listen="127.0.0.1:0",
                                                          cache_dir=tmp_path / "cache"))
    try:
        with create_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.WorkerStub(ch)
            stub.UploadShard(chunks(sha, (tmp_path / "shard.onnx").read_bytes()), timeout=10)
            cfg = config(sha)
            cfg.num_stages, cfg.next_address = 2, "192.0.2.1:50051"
            e = refused(lambda: stub.Configure(cfg, timeout=30))
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "cannot forward to 192.0.2.1:50051" in e.details()
            assert "--insecure" in e.details()
    finally:
        server.stop(0).wait()
        servicer.stop()


def test_worker_off_loopback_needs_certs_or_insecure(tmp_path):
    cmd = [sys.executable, "-m", "edge", "worker", "--listen", "0.0.0.0:0",
           "--cache-dir", str(tmp_path / "cache"), "--port-file", str(tmp_path / "port")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "refusing to listen on 0.0.0.0:0 in plaintext" in r.stderr
    assert "--certs DIR" in r.stderr and "edge certs issue NAME" in r.stderr
    assert "--insecure" in r.stderr

    p = subprocess.Popen(cmd + ["--insecure"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        end = time.monotonic() + 60
        while not (tmp_path / "port").exists():
            assert p.poll() is None, p.stdout.read()
            assert time.monotonic() < end
            time.sleep(0.05)
        port = int((tmp_path / "port").read_text())
        assert status(f"127.0.0.1:{port}").configured is False
    finally:
        p.terminate()
        p.wait(10)


# ---------------------------------------------------------------------- end to end


def test_tls_pipeline_equals_unsharded_model(pki, bert_tiny, tmp_path):
    """Coordinator -> worker -> worker over mutual TLS with the token: the worker-to-worker
    hop uses the worker's own bundle as a client certificate."""
    from edge.coordinator.client import InferClient
    from edge.coordinator.deploy import DeployError
    from edge.coordinator.direct import DirectClient
    from edge.coordinator.pipeline import Pipeline
    from edge.coordinator.server import start_coordinator
    from edge.export import example_inputs
    from edge.build import make_plan
    from edge.planning.cluster import cluster_from_profile
    from edge.transport.channels import Deadlines
    from edge.transport.codec import decode_tensors
    from edge.worker.launch import spawn_worker

    workers = [spawn_worker(tmp_path / "w", f"pi-{i}", threads=1,
                            extra_args=["--certs", str(pki[f"pi-{i}"])]) for i in range(2)]
    try:
        addresses = [w.address for w in workers]
        cluster = cluster_from_profile("rpi4b-2gb", 2, addresses=addresses)
        plan = make_plan(bert_tiny, cluster.devices, tmp_path / "plan",
                         bindings={"batch": 1, "sequence": 16})
        assert len(plan.stages) == 2
        x = example_inputs("bert", "tiny", batch=2, seq=12, seed=5)
        session = ort.InferenceSession(str(bert_tiny), providers=["CPUExecutionProvider"])
        want = dict(zip([o.name for o in session.get_outputs()], session.run(None, x)))

        # A coordinator with no bundle gets nowhere: the workers refuse its handshake.
        with Pipeline(plan, tmp_path / "plan", deadlines=Deadlines(ready=1.0)) as plain:
            with pytest.raises(DeployError):
                plain.start()
        # A right certificate with a wrong token is refused at once, not after the timeout.
        good = Security.from_dir(pki["coordinator"])
        wrong = Security(ca=good.ca, cert=good.cert, key=good.key, token=TOKEN_WRONG)
        start = time.monotonic()
        with Pipeline(plan, tmp_path / "plan", security=wrong) as bad:
            with pytest.raises(DeployError) as e:
                bad.start()
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED and time.monotonic() - start < 20

        with Pipeline(plan, tmp_path / "plan", security=good) as pipeline:
            pipeline.start()
            got = decode_tensors(pipeline.infer(x).outputs)
            for k in want:
                np.testing.assert_allclose(got[k], want[k], atol=1e-4, rtol=0, err_msg=k)
            # The coordinator serves clients over mutual TLS too, with the same bundle.
            server, port = start_coordinator(pipeline, "127.0.0.1:0")
            try:
                with InferClient(f"127.0.0.1:{port}", retries=0,
                                 security=Security.from_dir(pki["laptop"])) as client:
                    got = client.infer(x)
                np.testing.assert_allclose(got["last_hidden_state"], want["last_hidden_state"],
                                           atol=1e-4, rtol=0)
                # A direct client with the same bundle: to the first stage, its results
                # from the last; a client certificate may do nothing more with workers.
                laptop = Security.from_dir(pki["laptop"])
                with DirectClient(f"127.0.0.1:{port}", security=laptop, timeout=60) as client:
                    got = client.infer(x)
                np.testing.assert_allclose(got["last_hidden_state"], want["last_hidden_state"],
                                           atol=1e-4, rtol=0)
                with create_channel(addresses[1], security=laptop) as ch:
                    e = refused(lambda: pb_grpc.WorkerStub(ch).Forward(pb.Activation(
                        request_id="r", epoch=pipeline.epoch, reply_to="c"), timeout=5))
                    assert e.code() == grpc.StatusCode.PERMISSION_DENIED
                    assert "only to the first stage" in e.details()
                with create_channel(addresses[0], security=laptop) as ch:
                    e = refused(lambda: next(pb_grpc.WorkerStub(ch).Subscribe(
                        pb.SubscribeRequest(client_id="c"), timeout=5)))
                    assert e.code() == grpc.StatusCode.PERMISSION_DENIED
                    assert "only at the last stage" in e.details()
                with create_channel(addresses[1], security=laptop) as ch:
                    # Letting go of a worker is its owner's (a coordinator's) alone.
                    e = refused(lambda: next(pb_grpc.WorkerStub(ch).Subscribe(
                        pb.SubscribeRequest(client_id="c", release=True,
                                            coordinator_id=pipeline.coordinator_id),
                        timeout=5)))
                    assert e.code() == grpc.StatusCode.PERMISSION_DENIED
                    assert "let go" in e.details(), e.details()
                with InferClient(f"127.0.0.1:{port}", retries=0, timeout=5) as client:
                    e = refused(lambda: client.infer(x))
                assert e.code() == grpc.StatusCode.UNAVAILABLE
                np.savez(tmp_path / "in.npz", **x)
                r = subprocess.run(
                    [sys.executable, "-m", "edge", "infer", "--coordinator", f"127.0.0.1:{port}",
                     "--certs", str(pki["laptop"]), "--input", str(tmp_path / "in.npz"),
                     "--output", str(tmp_path / "out.npz")],
                    capture_output=True, text=True, timeout=120)
                assert r.returncode == 0, r.stderr
            finally:
                server.stop(0)
        for w in workers:
            assert "mutual TLS + cluster token" in w.log()
            # The worker reads PEM files with grpc; cryptography stays off the device.
            assert "cryptography" not in Path(f"/proc/{w.process.pid}/maps").read_text()
    finally:
        for w in workers:
            w.stop()


def test_worker_imports_neither_torch_nor_cryptography():
    code = ("import sys, edge.cli, edge.worker.server, edge.transport.channels;"
            "edge.cli.build_parser();"
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'transformers', 'cryptography'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(edge.__file__).parent.parent)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------- no unpickling

_PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "joblib"}


def unpickling_calls(source: str, filename: str = "<src>") -> list[str]:
    """Places in ``source`` that may unpickle: importing a pickler, ``allow_pickle=True``,
    ``torch.load`` without ``weights_only=True``, ``read_pickle``, ``marshal.load(s)``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names
                      if a.name.split(".")[0] in _PICKLERS]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _PICKLERS:
            found.append(f"{where} from {node.module} import")
        elif isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            kw = {k.arg: k.value for k in node.keywords}
            flag = kw.get("allow_pickle")
            if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                found.append(f"{where} {func}(allow_pickle=...)")
            if func.endswith("torch.load"):
                w = kw.get("weights_only")
                if not (isinstance(w, ast.Constant) and w.value is True):
                    found.append(f"{where} {func} without weights_only=True")
            if func.endswith(("read_pickle", "marshal.load", "marshal.loads")):
                found.append(f"{where} {func}")
    return found


def test_the_unpickling_scan_finds_what_it_looks_for():
    bad = ("import pickle\nfrom dill import loads\nimport numpy as np\n"
           "np.load('x', allow_pickle=True)\nimport torch\ntorch.load('w.pt')\n"
           "torch.load('w.pt', weights_only=False)\nimport pandas\npandas.read_pickle('p')\n")
    assert len(unpickling_calls(bad)) == 6
    ok = ("import numpy as np\nnp.load('x', allow_pickle=False)\nimport torch\n"
          "torch.load('w.pt', weights_only=True)\n# pickle in a comment\ns = 'pickle'\n")
    assert unpickling_calls(ok) == []


def test_nothing_in_edge_unpickles():
    package = Path(edge.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        found += unpickling_calls(path.read_text(), str(path.relative_to(package.parent)))
    assert found == [], "edge must never unpickle:\n" + "\n".join(found)
