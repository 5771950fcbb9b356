"""deploy/: the systemd units, the k3s manifests, the Dockerfile and the Ansible playbook.

Checked offline: systemd-analyze scores and verifies the units, kubernetes-validate checks
the manifests against the Kubernetes schemas it bundles, ansible-playbook checks the
playbook's syntax. Every setting they pass to `edge` must be a flag `edge` has, and the
memory limits must be the device profiles' budgets.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from edge.cli import build_parser
from edge.planning.cluster import load_profile
from helpers import unit_sections

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
# The highest exposure `systemd-analyze security` may give a unit (issue 15: "<= 3.0").
MAX_EXPOSURE = 3.0
# Variables a worker or coordinator reads that are not a flag's. Not EDGE_CERTS: that is
# the folder `edge certs` keeps bundles in; --certs is EDGE_BUNDLE.
NOT_FLAGS = {"EDGE_LOG", "EDGE_LOG_FORMAT", "EDGE_DEVICES_DIR"}


def _variables(command: str) -> set[str]:
    """The EDGE_* variables `edge COMMAND` reads for its flags (edge.envvars)."""
    from edge.envvars import env_flags

    parser = build_parser()
    sub = next(a for a in parser._subparsers._group_actions).choices[command]
    return {var for _, var, _ in env_flags(sub)}


def assert_flags_exist(command: str, names, where: str) -> None:
    """Each EDGE_* name in ``names`` is a variable `edge COMMAND` reads (EDGE_MEMORY_BUDGET
    for --memory-budget, EDGE_BUNDLE for --certs)."""
    known = _variables(command) | NOT_FLAGS
    for name in names:
        if name.startswith("EDGE_"):
            assert name in known, f"{where}: `edge {command}` reads no {name}"


def _env_file(path: Path, examples: bool = False) -> dict[str, str]:
    """The assignments of an EnvironmentFile=; with ``examples``, the commented-out ones
    (``#EDGE_NAME=pi-1``) too."""
    found = re.findall(r"^(#?)([A-Z][A-Z0-9_]*)=(.*)$", path.read_text(), re.M)
    return {k: v for hash_, k, v in found if examples or not hash_}


# --------------------------------------------------------------------- the slim install


def test_a_missing_extra_from_a_wheel_install_names_its_packages(monkeypatch):
    """Installed from a wheel, the pip command lists an extra's requirements by name, with
    the extras it implies of edge-runtime itself expanded: edge-runtime is on no index."""
    import tomllib

    from edge import _extras

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    metadata = [f'{r}; extra == "{name}"' for name, reqs in extras.items() for r in reqs]
    monkeypatch.setattr(_extras, "_source_tree", lambda: None)
    monkeypatch.setattr(_extras, "requires", lambda dist: metadata)
    command = _extras.install_command("export")
    assert command.startswith(f"pip install {_extras.TORCH_PIN} && pip install ")
    assert "edge-runtime" not in command and "edge_runtime" not in command
    for req in extras["coordinator"] + extras["export"][2:]:
        assert req.split(";")[0] in command, req
    err = _extras.missing_package("cryptography.x509", "edge certs")
    assert err.extra == "coordinator" and "onnx>=" in str(err) and "torch" not in str(err)


# --------------------------------------------------------------------- systemd


def test_units_are_hardened_to_at_most_3():
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    assert {u.name for u in UNITS} == {"edge-worker.service", "edge-coordinator.service"}
    for unit in UNITS:
        r = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                           capture_output=True, text=True, timeout=60)
        m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
        assert m, (unit.name, r.stdout[-500:], r.stderr)
        assert float(m.group(1)) <= MAX_EXPOSURE, f"{unit.name}: {m.group(0)}\n{r.stdout}"


def test_units_verify(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    for unit in UNITS:
        # verify wants ExecStart's binary to exist; the unit is otherwise checked as is.
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace("/opt/edge/venv/bin/edge", "/bin/true"))
        r = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0 and not r.stderr.strip(), (unit.name, r.stderr)


@pytest.mark.parametrize("command", ["worker", "coordinator"])
def test_units_notify_and_pass_only_real_flags(command):
    unit = unit_sections(DEPLOY / "systemd" / f"edge-{command}.service")
    service = unit["Service"]
    assert service["Type"] == ["notify"] and service["NotifyAccess"] == ["main"]
    assert service["ExecStart"] == [f"/opt/edge/venv/bin/edge {command}"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices",
                "MemoryDenyWriteExecute", "DynamicUser"):
        assert service[key] == ["yes"], key
    assert service["ProtectSystem"] == ["strict"] and service["CapabilityBoundingSet"] == [""]
    assert service["EnvironmentFile"] == [f"/etc/edge/{command}.env"]
    env = _env_file(DEPLOY / "systemd" / f"edge-{command}.env", examples=True)
    env.update(e.split("=", 1) for e in service["Environment"])
    assert_flags_exist(command, env, f"edge-{command}")
    # The bundle comes as credentials, each file of `edge certs issue` by its own name.
    assert env["EDGE_BUNDLE"] == "%d"
    assert sorted(c.split(":")[0] for c in service["LoadCredential"]) == [
        "ca.crt", "node.crt", "node.key", "token"]


def test_the_worker_units_memory_is_its_profiles_budget():
    service = unit_sections(DEPLOY / "systemd" / "edge-worker.service")["Service"]
    device = _env_file(DEPLOY / "systemd" / "edge-worker.env")["EDGE_DEVICE"]
    budget = load_profile(device).memory_budget_mb
    assert service["MemoryMax"] == [f"{budget:.0f}M"] and service["MemorySwapMax"] == ["0"]
    assert service["StateDirectory"] == ["edge"]
    assert "EDGE_CACHE_DIR=/var/lib/edge/cache" in service["Environment"]


def test_the_worker_units_settings_start_a_worker_that_notifies_and_serves_mtls(tmp_path):
    """`edge worker` with exactly the unit's environment (its Environment= lines and the
    env file), the paths systemd would provide put under tmp_path: it reads its profile,
    sends READY=1 on $NOTIFY_SOCKET, and its health service answers over mutual TLS with
    the bundle it got as credentials."""
    import socket

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from edge.proto import edge_pb2 as pb
    from edge.proto import edge_pb2_grpc as pb_grpc
    from edge.transport.certs import init_ca, issue
    from edge.transport.channels import create_channel
    from edge.transport.security import Security
    from edge.worker.launch import module_command, stop_process

    unit = unit_sections(DEPLOY / "systemd" / "edge-worker.service")["Service"]
    settings = dict(e.split("=", 1) for e in unit["Environment"])
    settings.update(_env_file(DEPLOY / "systemd" / "edge-worker.env"))
    ca = init_ca(tmp_path / "ca")
    credentials = issue(ca, "pi-1", out=tmp_path / "credentials")  # systemd's %d
    state = tmp_path / "state"  # /var/lib/edge, the StateDirectory
    where = {"%d": str(credentials), "/var/lib/edge": str(state),
             "/opt/edge/devices": str(REPO / "devices")}
    for key, value in settings.items():
        for path, here in where.items():
            value = value.replace(path, here)
        settings[key] = value
    assert settings["EDGE_LISTEN"].endswith(":50051")
    # Loopback and a free port in a test; no mDNS announcement from a test.
    settings.update(EDGE_LISTEN="127.0.0.1:0", EDGE_PORT_FILE=str(tmp_path / "port"),
                    EDGE_NO_ANNOUNCE="1")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
    env.update(settings, NOTIFY_SOCKET=str(tmp_path / "notify"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(60)
    command = unit["ExecStart"][0].split()[1:]  # after /opt/edge/venv/bin/edge
    process = subprocess.Popen(module_command("edge", *command), env=env, cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert sock.recv(4096).decode().splitlines()[0] == "READY=1"
        address = f"127.0.0.1:{(tmp_path / 'port').read_text()}"
        coordinator = Security.from_dir(issue(ca, "coordinator", out=tmp_path / "coord"))
        with create_channel(address, security=coordinator) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="edge.v1.Worker"), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            status = pb_grpc.WorkerStub(channel).GetStatus(pb.StatusRequest(), timeout=10)
        assert status.device == settings["EDGE_DEVICE"] == "rpi4b-2gb"
        assert (state / "cache").is_dir()  # the shard cache, in the state directory
    finally:
        code = stop_process(process, 20)
        sock.close()
    assert code == 0, process.stderr.read().decode()[-2000:]


def test_a_worker_serves_with_memory_deny_write_execute(tmp_path, monkeypatch):
    """MemoryDenyWriteExecute=yes: no writable and executable mapping. PR_SET_MDWE (Linux
    6.3+) is the same rule, set before onnxruntime, grpc, zeroconf and prometheus-client
    load; the worker then announces itself, serves a real Forward and its metrics."""
    import socket
    import urllib.request

    from test_worker import Events, assert_serves, make_shard, upload_and_configure

    from edge.proto import edge_pb2_grpc as pb_grpc
    from edge.transport.channels import create_channel
    from edge.worker.launch import spawn_worker

    site = tmp_path / "mdwe"
    site.mkdir()
    state = tmp_path / "mdwe-state"
    (site / "sitecustomize.py").write_text(
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "ok = libc.prctl(65, 1, 0, 0, 0) == 0  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN\n"
        f"open({str(state)!r}, 'w').write(str(libc.prctl(66, 0, 0, 0, 0)) if ok else 'no')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    shard = tmp_path / "shard.onnx"
    sha = make_shard(shard)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        metrics_port = s.getsockname()[1]
    w = spawn_worker(tmp_path, "mdwe", device="rpi4b-2gb", announce=True,
                     extra_args=["--metrics-port", str(metrics_port), "--name", "mdwe-test"])
    try:
        if state.read_text() == "no":
            pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
        assert state.read_text() == "1"  # the worker runs under it
        with create_channel(w.address) as channel:
            stub = pb_grpc.WorkerStub(channel)
            upload_and_configure(stub, (shard, sha))
            events = Events(stub)
            try:
                assert_serves(stub, events)
            finally:
                events.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            assert b"edge_" in r.read()
    finally:
        assert w.stop() == 0, w.log()


def test_onnxruntime_telemetry_is_off_wherever_edge_is_deployed(tmp_path):
    """onnxruntime 1.32 keeps a telemetry database under ~/.cache/Microsoft (SQLite, written
    on every session) unless ORT_DISABLE_TELEMETRY is set: every deployment sets it, and it
    still works."""
    import sys

    code = ("import onnxruntime as ort, sys\n"
            "from test_worker import make_shard\n"
            "from pathlib import Path\n"
            "make_shard(Path(sys.argv[1]))\n"
            "ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n")
    env = {**os.environ, "HOME": str(tmp_path), "ORT_DISABLE_TELEMETRY": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.onnx")], env=env, check=True,
                   timeout=60)
    assert not (tmp_path / ".cache").exists()
    for unit in UNITS:
        assert "ORT_DISABLE_TELEMETRY=1" in unit_sections(unit)["Service"]["Environment"], unit.name
    assert "ORT_DISABLE_TELEMETRY=1" in (DEPLOY / "docker" / "Dockerfile").read_text()
    for _, doc in _manifests():
        if doc["kind"] in ("DaemonSet", "Deployment"):
            for c in doc["spec"]["template"]["spec"]["containers"]:
                assert _container_env(c)["ORT_DISABLE_TELEMETRY"] == "1", doc["metadata"]["name"]


# --------------------------------------------------------------------- k3s


def _manifests() -> list[tuple[Path, dict]]:
    """Every document of deploy/k3s, with its file."""
    docs = []
    for path in sorted((DEPLOY / "k3s").rglob("*.yaml")):
        docs += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_manifests_validate_against_the_kubernetes_schemas():
    import kubernetes_validate

    docs = _manifests()
    kinds = sorted({d["kind"] for _, d in docs})
    assert kinds == ["DaemonSet", "Deployment", "Namespace", "PersistentVolumeClaim",
                     "Secret", "Service"]
    # k3s 1.30 (the oldest release still patched when written) and the newest schemas.
    for version in ("1.30.0", kubernetes_validate.latest_version()):
        for path, doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']} against "
                            f"{version}: {e.message} at {'.'.join(map(str, e.path))}")


def test_a_bad_manifest_is_caught():
    """The validation above can fail: a typo'd field and a wrong type are refused."""
    import kubernetes_validate

    _, daemonset = next((p, d) for p, d in _manifests() if d["kind"] == "DaemonSet")
    bad = yaml.safe_load(yaml.safe_dump(daemonset))
    bad["spec"]["template"]["spec"]["hostNetwrok"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.30.0", strict=True)
    bad = yaml.safe_load(yaml.safe_dump(daemonset))
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "50051"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.30.0", strict=True)


def _container_env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def test_each_worker_daemonset_is_its_profile_guaranteed():
    daemonsets = [d for _, d in _manifests() if d["kind"] == "DaemonSet"]
    assert len(daemonsets) >= 2
    for ds in daemonsets:
        pod = ds["spec"]["template"]["spec"]
        profile = pod["nodeSelector"]["edge.dev/profile"]
        (worker,) = pod["containers"]
        env = _container_env(worker)
        assert env["EDGE_DEVICE"] == profile == ds["metadata"]["labels"]["edge.dev/profile"]
        assert ds["metadata"]["name"] == f"edge-worker-{profile}"
        # Guaranteed QoS: requests == limits for cpu and memory, memory the budget.
        res = worker["resources"]
        assert res["requests"] == res["limits"] and set(res["limits"]) == {"cpu", "memory"}
        assert res["limits"]["memory"] == f"{load_profile(profile).memory_budget_mb:.0f}Mi"
        assert int(env["EDGE_THREADS"]) == int(res["limits"]["cpu"])  # no CFS throttling
        assert pod["hostNetwork"] is True
        assert worker["ports"][0]["containerPort"] == worker["ports"][0]["hostPort"] == int(
            env["EDGE_LISTEN"].rsplit(":", 1)[1])
        mounts = {m["name"]: m for m in worker["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert mounts["certs"]["readOnly"] is True and "secret" in volumes["certs"]
        assert mounts["certs"]["mountPath"] == env["EDGE_BUNDLE"]
        assert mounts["cache"]["mountPath"] == env["EDGE_CACHE_DIR"]
        assert worker["securityContext"]["readOnlyRootFilesystem"] is True
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert_flags_exist("worker", env, ds["metadata"]["name"])


def test_the_coordinator_deployment_and_service():
    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in _manifests()}
    deployment = docs["Deployment", "edge-coordinator"]
    pod = deployment["spec"]["template"]["spec"]
    (coordinator,) = pod["containers"]
    env = _container_env(coordinator)
    assert_flags_exist("coordinator", env, "edge-coordinator")
    assert deployment["spec"]["replicas"] == 1  # two would take the workers from each other
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    state = next(v for v in pod["volumes"] if v["name"] == "state")
    assert ("PersistentVolumeClaim", state["persistentVolumeClaim"]["claimName"]) in docs
    mount = next(m for m in coordinator["volumeMounts"] if m["name"] == "state")
    assert env["EDGE_PLAN"].startswith(mount["mountPath"] + "/")  # re-plans are written there
    service = docs["Service", "edge-coordinator"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["port"] == int(env["EDGE_LISTEN"].rsplit(":", 1)[1])
    # The secrets the pods mount are the ones the example shows.
    secrets = {name for kind, name in docs if kind == "Secret"}
    mounted = {v["secret"]["secretName"] for _, d in _manifests()
               if d["kind"] in ("DaemonSet", "Deployment")
               for v in d["spec"]["template"]["spec"]["volumes"] if "secret" in v}
    assert mounted == secrets == {"edge-worker-certs", "edge-coordinator-certs"}
    for kind, name in docs:
        if kind == "Secret":
            assert set(docs[kind, name]["stringData"]) == {"ca.crt", "node.crt", "node.key",
                                                           "token"}


# --------------------------------------------------------------------- Docker, Ansible


def test_the_dockerfile_runs_edge_as_a_user_with_real_flags():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+(?: \S+)* AS (\w+)$", text, re.M)
    assert stages[-1] == "worker"  # a plain `docker build` makes the worker
    worker = text[text.rindex("AS worker"):]
    assert 'ENTRYPOINT ["edge", "worker"]' in worker and "USER 10001" in worker
    assert "[" not in worker.split("pip install", 1)[1].split("\n", 1)[0]  # no extra
    coordinator = text[text.index("AS coordinator"):text.rindex("AS worker")]
    assert_flags_exist("worker", re.findall(r"\b(EDGE_[A-Z_]+)=", worker), "Dockerfile worker")
    assert_flags_exist("coordinator", re.findall(r"\b(EDGE_[A-Z_]+)=", coordinator),
                       "Dockerfile coordinator")
    # The build context holds what the wheel is built from, and nothing else.
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    kept = {line[1:] for line in ignore if line.startswith("!")}
    assert ignore[0] == "*" and kept == {"pyproject.toml", "README.md", "edge", "devices"}
    copied = {p for line in re.findall(r"^COPY (.+)$", text, re.M) for p in line.split()[:-1]}
    assert copied <= kept, copied
    if shutil.which("hadolint"):
        r = subprocess.run(["hadolint", str(DEPLOY / "docker" / "Dockerfile")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr


def test_the_playbook_parses_and_writes_cluster_yaml(tmp_path):
    if not shutil.which("ansible-playbook"):
        pytest.skip("ansible-playbook is not installed (ansible-core, in the [dev] extra "
                    "from Python 3.11)")
    from edge.planning.cluster import load_cluster

    playbook = DEPLOY / "ansible" / "playbook.yml"
    inventory = DEPLOY / "ansible" / "inventory.example.yml"
    env = {**os.environ, "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"),
           "ANSIBLE_HOME": str(tmp_path / "home"), "ANSIBLE_NOCOLOR": "1"}
    r = subprocess.run(["ansible-playbook", "--syntax-check", "-i", str(inventory),
                        str(playbook)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    # The cluster.yaml play alone (it reaches no board), on the example inventory.
    out = tmp_path / "cluster.yaml"
    r = subprocess.run(["ansible-playbook", "-i", str(inventory), str(playbook), "--tags",
                        "cluster", "-e", f"edge_cluster_yaml={out}"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    hosts = yaml.safe_load(inventory.read_text())["all"]["children"]["edge_workers"]["hosts"]
    devices = load_cluster(out).devices
    assert [d.name for d in devices] == list(hosts)
    assert [d.address for d in devices] == [f"{h['ansible_host']}:50051" for h in hosts.values()]
    assert [d.memory_mb for d in devices] == [load_profile(h["edge_profile"]).memory_budget_mb
                                              for h in hosts.values()]
