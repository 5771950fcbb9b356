"""Small defects found by using edge as a new user would, and by attacking it (issue 12)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

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


# --- issue 13, item 1: the distribution is edge-runtime; the worker installer ----------

REPO = Path(__file__).resolve().parents[1]
INSTALLER = REPO / "devices" / "install-worker.sh"
UNIT = REPO / "devices" / "edge-worker.service"
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
    text = UNIT.read_text()
    # Parsed by hand: configparser refuses the repeated Environment= keys systemd allows.
    sections: dict[str, dict[str, list[str]]] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, value = line.split("=", 1)
        current.setdefault(key, []).append(value)
    service, unit = sections["Service"], sections["Unit"]
    assert service["User"] == ["edge"] and service["StateDirectory"] == ["edge"]
    exec_start = service["ExecStart"][0]
    assert exec_start.startswith("/opt/edge/venv/bin/edge worker ")
    assert "--cache-dir /var/lib/edge/cache" in exec_start  # in the state directory
    assert int(unit["StartLimitBurst"][0]) > 0  # a worker that cannot start is not retried forever
    if shutil.which("systemd-analyze"):
        # verify wants ExecStart's binary to exist; the unit is otherwise checked as is.
        d = Path(tempfile.mkdtemp())
        (d / UNIT.name).write_text(text.replace("/opt/edge/venv/bin/edge", "/bin/true"))
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


# --- issue 13, item 3: a missing optional package gets the pip command -----------------


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


# --- issue 13, item 2: workers started from a folder that holds an `edge/` -------------


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
    from edge.demo import NOT_MEASURED, measured_peak_mib
    from edge.proto import edge_pb2 as pb

    status = pb.ClusterStatus()
    failed = status.stages.add(stage=0, healthy=False)  # its status call failed
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
    from edge.planning import make_plan
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


# --- issue 13, item 5: the upload line when everything is cached ----------------------


def test_upload_progress_counts_only_bytes_sent():
    from edge.cli import format_upload

    assert format_upload(16_000_000, 0, 0, 0.0) == "all 16.0 MB cached, nothing uploaded"
    assert "GB/s" not in format_upload(16_000_000, 0, 0, 0.001)
    assert (format_upload(16_000_000, 12_000_000, 6_000_000, 2.0)
            == "6.0 MB/12.0 MB uploaded at 3.0 MB/s, 4.0 MB cached")
    assert format_upload(8_000_000, 8_000_000, 8_000_000, 0.01) == "8.0 MB/8.0 MB uploaded"


# --- issue 13, item 3: calibrated profiles go to the user's folder --------------------


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
