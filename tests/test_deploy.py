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

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
# The highest exposure `systemd-analyze security` may give a unit (issue 15: "<= 3.0").
MAX_EXPOSURE = 3.0
# Variables `edge` reads that are not a flag's.
NOT_FLAGS = {"EDGE_LOG", "EDGE_DEVICES_DIR"}


def _flags(command: str) -> set[str]:
    """The long options of `edge COMMAND`."""
    parser = build_parser()
    sub = next(a for a in parser._subparsers._group_actions).choices[command]
    return {s for a in sub._actions for s in a.option_strings if s.startswith("--")}


def assert_flags_exist(command: str, names, where: str) -> None:
    """Each EDGE_NAME in ``names`` is `edge COMMAND --name` (EDGE_MEMORY_BUDGET is
    --memory-budget), or a variable edge reads itself."""
    flags = _flags(command)
    for name in names:
        if name in NOT_FLAGS:
            continue
        flag = "--" + name.removeprefix("EDGE_").lower().replace("_", "-")
        assert flag in flags, f"{where}: {name} stands for {flag}, which `edge {command}` lacks"


def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file's sections, each key with its values in order (systemd repeats keys)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, value = line.split("=", 1)
        current.setdefault(key, []).append(value)
    return sections


def _env_file(path: Path) -> dict[str, str]:
    """The assignments of an EnvironmentFile= (comments are examples, not settings)."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines()
             if line.strip() and not line.startswith("#"))
    return {k: v for k, v in pairs}


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
    unit = _unit(DEPLOY / "systemd" / f"edge-{command}.service")
    service = unit["Service"]
    assert service["Type"] == ["notify"] and service["NotifyAccess"] == ["main"]
    assert service["ExecStart"] == [f"/opt/edge/venv/bin/edge {command}"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices",
                "MemoryDenyWriteExecute", "DynamicUser"):
        assert service[key] == ["yes"], key
    assert service["ProtectSystem"] == ["strict"] and service["CapabilityBoundingSet"] == [""]
    assert service["EnvironmentFile"] == [f"/etc/edge/{command}.env"]
    env = _env_file(DEPLOY / "systemd" / f"edge-{command}.env")
    env.update(e.split("=", 1) for e in service["Environment"])
    assert_flags_exist(command, [k for k in env if k.startswith("EDGE_")], f"edge-{command}")
    # The bundle comes as credentials, each file of `edge certs issue` by its own name.
    assert env["EDGE_CERTS"] == "%d"
    assert sorted(c.split(":")[0] for c in service["LoadCredential"]) == [
        "ca.crt", "node.crt", "node.key", "token"]


def test_the_worker_units_memory_is_its_profiles_budget():
    service = _unit(DEPLOY / "systemd" / "edge-worker.service")["Service"]
    device = _env_file(DEPLOY / "systemd" / "edge-worker.env")["EDGE_DEVICE"]
    budget = load_profile(device).memory_budget_mb
    assert service["MemoryMax"] == [f"{budget:.0f}M"] and service["MemorySwapMax"] == ["0"]
    assert service["StateDirectory"] == ["edge"]
    assert "EDGE_CACHE_DIR=/var/lib/edge/cache" in service["Environment"]


def test_a_worker_serves_with_memory_deny_write_execute(tmp_path, monkeypatch):
    """MemoryDenyWriteExecute=yes: no writable and executable mapping. PR_SET_MDWE (Linux
    6.3+) is the same rule, set before onnxruntime, grpc and zeroconf load; the worker then
    serves a real Forward."""
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
    w = spawn_worker(tmp_path, "mdwe", device="rpi4b-2gb")
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
    finally:
        assert w.stop() == 0, w.log()
