"""The emulated device lab: real namespaces, shaped links, cgroups and worker processes.

Needs root, `ip netns` and cgroup memory+cpu controllers; skips with the reason otherwise.
Only one lab can be up on a host, so the CLI tests (each its own lab) run before the
class that shares one lab across its tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from edge.lab import cgroups, shaping
from edge.lab.devices import DeviceSpec, host_cores, parse_device_specs
from edge.lab.lab import Lab
from edge.lab.cleanup import leftovers
from edge.lab.system import LabError

TOL = 1e-4


def _lab_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the device lab needs root (ip netns, tc, cgroups)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "the device lab needs iproute2 (ip, tc)"
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns` is unavailable: {r.stderr.strip()}"
    try:
        cgroups.detect()
    except LabError as e:
        return str(e)
    found = leftovers()
    if found:
        return (f"a lab is up on this host ({', '.join(found[:3])}...); these tests would "
                "tear it down: run `edge lab down` first")
    return None


_UNAVAILABLE = _lab_unavailable()
needs_lab = pytest.mark.skipif(_UNAVAILABLE is not None, reason=_UNAVAILABLE or "")


def edge_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge", *args], capture_output=True,
                          text=True, timeout=timeout)


def snapshot() -> dict[str, int]:
    """How many namespaces and host veths exist (all, not only the lab's), and cgroups
    where the lab makes its own (elsewhere, the host may come and go as it likes)."""
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    veths = subprocess.run(["ip", "-o", "link", "show", "type", "veth"], capture_output=True,
                           text=True).stdout
    h = cgroups.detect()
    return {"namespaces": len(ns.splitlines()), "veths": len(veths.splitlines()),
            "cgroups": sum(1 for base in {h.memory_base, h.cpu_base}
                           for p in base.iterdir() if p.is_dir())}


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if text.encode() in (p / "cmdline").read_bytes():
                    pids.append(int(p.name))
            except OSError:
                pass
    return [p for p in pids if p != os.getpid()]


def reference(model_path: Path, inputs: dict) -> dict:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, inputs)))


# ---------------------------------------------------------------------- anywhere, no root


@pytest.mark.parametrize("action", [["up", "--device", "rpi4b-2gb:2"], ["status"], ["down"]])
def test_without_root_every_command_says_what_it_needs(action, monkeypatch, capsys):
    from edge.cli import main

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert main(["lab", *action]) == 2
    err = capsys.readouterr().err
    assert f"`edge lab {action[0]}` needs root" in err and "sudo" in err, err


def test_cpu_quota_keeps_the_ratio_with_a_5ms_period_or_the_kernel_minimum():
    q = cgroups.cpu_quota(0.5, host_cores=2)
    assert (q.quota_us, q.period_us) == (2500, 5000)
    assert cgroups.cpu_quota(9.0, host_cores=2).cores == 2.0      # never above the host
    slow = cgroups.cpu_quota(0.04, host_cores=2)                   # a Zero on a fast host
    assert slow.quota_us == 1000 and abs(slow.cores - 0.04) < 1e-3


def test_burst_stays_well_below_a_message():
    assert shaping.shape_for(1000).burst_bytes == 62500
    assert shaping.shape_for(50).burst_bytes == 32 * 1024
    assert shaping.shape_for(30).tc_args()[:4] == ["tbf", "rate", "30000kbit", "burst"]


def test_device_specs():
    specs = parse_device_specs(["rpi4b-2gb:2", "rpi-zero-2w"])
    assert [s.profile for s in specs] == ["rpi4b-2gb", "rpi4b-2gb", "rpi-zero-2w"]
    for bad in ("rpi4b-2gb:0", "rpi4b-2gb:x", ":3"):
        with pytest.raises(LabError, match="PROFILE"):
            parse_device_specs([bad])


def test_cgroup_detection_and_v2_files(tmp_path):
    v1 = ("30 25 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
          "31 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n")
    h = cgroups.detect(v1, "4:memory:/ci/job\n3:cpu,cpuacct:/\n")
    assert h.version == 1 and h.memory_base == Path("/sys/fs/cgroup/memory/ci/job")
    assert h.cpu_base == Path("/sys/fs/cgroup/cpu,cpuacct")

    root = tmp_path / "unified"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    h = cgroups.detect(f"40 25 0:30 / {root} rw - cgroup2 cgroup2 rw\n", "0::/user.slice\n")
    assert h.version == 2 and h.memory_base == root
    group = h.create("edge-lab-x")
    for f in ("memory.max", "memory.swap.max", "cpu.max"):
        (group.memory_dir / f).write_text("")
    (group.memory_dir / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 2\noom_kill 2\n")
    group.limit_memory(512 << 20)
    group.limit_cpu(cgroups.cpu_quota(0.2, 2))
    assert (group.memory_dir / "memory.max").read_text() == str(512 << 20)
    assert (group.memory_dir / "memory.swap.max").read_text() == "0"
    assert (group.memory_dir / "cpu.max").read_text() == "1000 5000"
    assert group.oom_kills() == 2 and group.limit_hits() == 7
    assert "+memory" in (root / "cgroup.subtree_control").read_text()
    assert h.scan() == [group.memory_dir]

    with pytest.raises(LabError, match="no hierarchy has both"):
        cgroups.detect("30 25 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n",
                       "4:memory:/\n")


# ---------------------------------------------------------------------- a lab per test (CLI)


@needs_lab
def test_cli_up_status_down_leaves_nothing(tmp_path):
    before = snapshot()
    state, cluster = tmp_path / "state", tmp_path / "lab-cluster.yaml"
    r = edge_cli("lab", "up", "--device", "rpi4b-2gb:2", "--device", "rpi-zero-2w:1",
                 "--state-dir", str(state), "--cache-dir", str(tmp_path / "cache"),
                 "--cluster-out", str(cluster), "--host-gflops", "200")
    try:
        assert r.returncode == 0, r.stderr
        assert "10.99.0.11:50051 10.99.0.12:50051 10.99.0.13:50051" in r.stdout
        from edge.planning.cluster import load_cluster

        devices = load_cluster(cluster).devices
        assert [(d.name, d.address) for d in devices] == [
            ("rpi4b-2gb-1", "10.99.0.11:50051"), ("rpi4b-2gb-2", "10.99.0.12:50051"),
            ("rpi-zero-2w-1", "10.99.0.13:50051")]
        assert snapshot()["namespaces"] == before["namespaces"] + 4  # 3 devices + bridge

        r = edge_cli("lab", "status", "--state-dir", str(state))
        assert r.returncode == 0 and r.stdout.count("running") == 3, r.stdout + r.stderr

        r = edge_cli("lab", "up", "--device", "rpi4b-2gb", "--state-dir", str(state))
        assert r.returncode == 2 and "a lab is up already" in r.stderr
    finally:
        r = edge_cli("lab", "down", "--state-dir", str(state))
    assert r.returncode == 0, r.stderr
    assert "removed 4 namespace(s), 1 host link(s) and 6 cgroup(s)" in r.stdout
    assert snapshot() == before and leftovers() == []
    assert processes_mentioning(str(state)) == []
    r = edge_cli("lab", "status", "--state-dir", str(state))
    assert r.returncode == 1 and "no lab is up" in r.stdout


@needs_lab
def test_down_cleans_up_after_up_was_killed_and_its_state_file_lost(tmp_path):
    before = snapshot()
    state = tmp_path / "state"
    up = subprocess.Popen(
        [sys.executable, "-m", "edge", "lab", "up", "--device", "rpi4b-2gb:3",
         "--state-dir", str(state), "--cache-dir", str(tmp_path / "cache"),
         "--cluster-out", str(tmp_path / "c.yaml"), "--host-gflops", "200"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Kill it once it has started a worker: namespaces, cgroups and an orphan are left.
        deadline = time.monotonic() + 60
        while up.poll() is None and time.monotonic() < deadline:
            try:
                if any(d.get("pid") for d in
                       json.loads((state / "state.json").read_text())["devices"]):
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.005)
        up.send_signal(signal.SIGKILL)
        assert up.wait(10) == -signal.SIGKILL, "`edge lab up` finished before it was killed"
        # A process in the middle of an exec shows an empty cmdline for a moment.
        deadline = time.monotonic() + 5
        while not processes_mentioning(str(state)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert leftovers() and processes_mentioning(str(state))
        (state / "state.json").unlink()
    finally:
        r = edge_cli("lab", "down", "--state-dir", str(state))
    assert r.returncode == 0, r.stderr
    assert snapshot() == before and leftovers() == []
    deadline = time.monotonic() + 5
    while processes_mentioning(str(state)) and time.monotonic() < deadline:
        time.sleep(0.05)  # killed orphans wait for init to reap them
    assert processes_mentioning(str(state)) == []


@needs_lab
def test_failed_up_takes_down_what_it_set_up(tmp_path):
    before = snapshot()
    with pytest.raises(LabError, match="did not listen within"):
        Lab.up([DeviceSpec("rpi4b-2gb")] * 2, state_dir=tmp_path / "state",
               cache_dir=tmp_path / "cache", gflops=200, ready_timeout=0.01)
    assert snapshot() == before and leftovers() == []
    assert processes_mentioning(str(tmp_path / "state")) == []


@needs_lab
def test_lab_scaling_measures_each_cluster_with_its_coordinator_on_a_board(bert_tiny, tmp_path):
    """`edge bench`'s lab section: one device and a 2-stage pipeline, each with its
    coordinator on an emulated Pi 4 of its own, measured by a client on this host; the
    lab is gone afterwards."""
    from edge.bench.lab_pipeline import lab_scaling
    from edge.export import example_inputs

    inputs = [example_inputs("bert", "tiny", batch=1, seq=16, seed=i) for i in range(4)]
    r = lab_scaling(bert_tiny, inputs, {"batch": 1, "sequence": 16}, "rpi4b-2gb", [2], 1,
                    tmp_path, coordinator="rpi4b-2gb", requests=12, latency_requests=2,
                    host_gflops=200)
    assert r["status"] == "measured", r
    assert r["coordinator_device"] == "rpi4b-2gb"
    one, two = r["one_device"], r["pipelines"]["2"]
    assert len(one["worker_cpu_ms_per_request"]) == 1 and two["stages"] == 2
    for arm in (one, two):
        assert arm["rps"] > 0 and arm["latency_ms"] > 0
        assert arm["coordinator_cpu_ms_per_request"] > 0  # its process, on its board
        assert all(c > 0 for c in arm["worker_cpu_ms_per_request"])
    assert two["speedup"] == pytest.approx(two["rps"] / one["rps"], rel=0.01)
    assert two["latency_ratio"] == pytest.approx(two["latency_ms"] / one["latency_ms"],
                                                 rel=0.01)
    assert two["coordinator_board_ms_per_request"] > two["coordinator_cpu_ms_per_request"]
    assert leftovers() == []


# ---------------------------------------------------------------------- one shared lab


RECEIVER = """
import socket, sys, time
s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept(); n = 0; first = last = None
while True:
    b = c.recv(1 << 20)
    if not b: break
    now = time.perf_counter(); first = first or now; last = now; n += len(b)
print(n * 8 / (last - first) / 1e6, flush=True)
"""
SENDER = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2]))); left = int(sys.argv[3])
buf = bytes(1 << 16)
while left > 0:
    c.sendall(buf[:left]); left -= len(buf)
c.close()
"""


def measure_mbps(receive: list[str], send: list[str], ip: str, seconds: float,
                 rate_mbps: float) -> float:
    """Send ``seconds`` worth of data at ``rate_mbps`` from ``send`` to ``receive`` (argv
    prefixes: where each runs) and return the rate the receiver saw."""
    rx = subprocess.Popen([*receive, sys.executable, "-c", RECEIVER, ip],
                          stdout=subprocess.PIPE, text=True)
    try:
        port = rx.stdout.readline().strip()
        nbytes = int(rate_mbps * 1e6 / 8 * seconds)
        subprocess.run([*send, sys.executable, "-c", SENDER, ip, port, str(nbytes)],
                       check=True, timeout=seconds * 5 + 10)
        return float(rx.stdout.readline())
    finally:
        rx.kill()
        rx.wait()


@needs_lab
class TestLab:
    """Five devices: two Pi 4s, a Zero 2 W (30 Mbit/s Wi-Fi), and two Pi 4s with small
    memory caps: one to overflow through the pipeline, one for a plain allocator; and a
    Pi 4 without a worker, the coordinator's board."""

    @pytest.fixture(scope="class")
    @classmethod
    def lab(cls, tmp_path_factory):
        d = tmp_path_factory.mktemp("lab")
        specs = [DeviceSpec("rpi4b-2gb"), DeviceSpec("rpi4b-2gb"), DeviceSpec("rpi-zero-2w"),
                 DeviceSpec("rpi4b-2gb", name="tight", memory_mb=100),
                 DeviceSpec("rpi4b-2gb", name="alloc", memory_mb=128),
                 DeviceSpec("rpi4b-2gb", name="board", role="coordinator")]
        lab = Lab.up(specs, state_dir=d / "state", cache_dir=d / "cache")
        try:
            yield lab
        finally:
            lab.down()
        assert leftovers() == []

    # Devices a test kills on purpose; every other worker must outlive every test.
    EXPENDABLE = ("tight", "alloc")

    @pytest.fixture(autouse=True)
    def workers_survive(self, lab):
        """A worker that dies fails the test it died in, with the lab's reason and the end
        of its log, rather than the next test, with 'connection refused'."""
        yield
        dead = [s for s in lab.status() if not s.alive and s.device.runs_worker
                and s.device.name not in self.EXPENDABLE]
        if dead:
            pytest.fail("lab worker(s) died during this test:\n" + "\n".join(
                f"{s.device.name}: {s.reason}\n" + "\n".join(
                    Path(s.device.log).read_text(errors="replace").splitlines()[-20:])
                for s in dead))

    def test_devices_are_namespaces_with_shaped_links_and_caps(self, lab):
        zero = lab.device("rpi-zero-2w-1")
        assert zero.address == "10.99.0.13:50051" and zero.bandwidth_mbps == 30
        qdisc = subprocess.run(["tc", "-n", zero.namespace, "qdisc", "show", "dev", "eth0"],
                               capture_output=True, text=True).stdout
        assert "tbf" in qdisc and "rate 30Mbit" in qdisc, qdisc
        assert zero.memory_cap_mb == 512
        assert all(s.alive for s in lab.status() if s.device.runs_worker)
        # The host's routing table holds the lab subnet only through the lab's veth.
        routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
        assert [r for r in routes.splitlines() if "10.99." in r] == [
            r for r in routes.splitlines() if "dev edge-lab-host" in r]
        if lab.cgroup_version == 1:
            limit = (zero.cgroup.memory_dir / "memory.limit_in_bytes").read_text()
            assert int(limit) == 512 << 20
            quota = int((zero.cgroup.cpu_dir / "cpu.cfs_quota_us").read_text())
            period = int((zero.cgroup.cpu_dir / "cpu.cfs_period_us").read_text())
            assert (quota, period) == (zero.cpu_quota_us, zero.cpu_period_us)
            assert abs(quota / period - host_cores() * 3 / lab.host_gflops) < 0.01  # 3 GFLOP/s

    def test_edge_discover_on_this_host_lists_the_lab_workers(self, lab):
        """The workers announce by mDNS on the lab's bridge, under their device names and
        the lab CA's cluster id; this host browses through its veth."""
        from edge.transport.discovery import browse, cluster_id

        cid = cluster_id(lab.security())
        expected = {d.name: d.address for d in lab.devices if d.runs_worker}
        found = {}
        end = time.monotonic() + 20
        while set(found) != set(expected) and time.monotonic() < end:
            found = {a.name: a for a in browse(timeout=2, cluster=cid)}
        assert {n: a.best_address() for n, a in found.items()} == expected
        assert found["rpi-zero-2w-1"].profile == "rpi-zero-2w" and found["tight"].tls

    def test_shaped_link_measures_its_rate(self, lab):
        pi, zero = lab.device("rpi4b-2gb-1"), lab.device("rpi-zero-2w-1")
        # Device to device: through the Zero's downlink (its bridge port).
        got = measure_mbps(lab.command(zero.name, [], capped=False),
                           lab.command(pi.name, [], capped=False), zero.ip, 1.0, 30)
        assert abs(got - 30) <= 0.2 * 30, got
        # Device to host: through the Zero's uplink (its eth0).
        got = measure_mbps([], lab.command(zero.name, [], capped=False), lab.host_ip, 1.0, 30)
        assert abs(got - 30) <= 0.2 * 30, got

    def test_pipeline_over_the_lab_equals_unsharded_model(self, lab, bert_small, tmp_path):
        from edge.coordinator.pipeline import Pipeline
        from edge.export import example_inputs
        from edge.build import make_plan
        from edge.transport.codec import decode_tensors

        devices = [d for d in lab.cluster().devices
                   if d.name in ("rpi4b-2gb-1", "rpi4b-2gb-2", "rpi-zero-2w-1")]
        plan = make_plan(bert_small, devices, tmp_path, bindings={"batch": 1, "sequence": 16})
        assert [s.device.address for s in plan.stages] == [
            "10.99.0.11:50051", "10.99.0.12:50051", "10.99.0.13:50051"]
        with Pipeline(plan, tmp_path, diagnose=lab.diagnose, security=lab.security()) as pipeline:
            pipeline.start()
            cases = [example_inputs("bert", "small", batch=b, seq=s, seed=i)
                     for i, (b, s) in enumerate([(1, 16), (2, 9), (3, 32)])]
            with ThreadPoolExecutor(3) as pool:
                results = list(pool.map(pipeline.infer, cases * 2))
        for x, r in zip(cases * 2, results):
            want, got = reference(bert_small, x), decode_tensors(r.outputs)
            assert set(got) == set(want)
            for k in want:
                np.testing.assert_allclose(got[k], want[k], atol=TOL, rtol=0, err_msg=k)
            assert [t.stage for t in r.timings] == [0, 1, 2]

    def test_a_coordinator_on_the_board_serves_from_its_namespace_and_quota(
            self, lab, bert_small, tmp_path):
        """`edge lab run board -- edge coordinator ...`: the coordinator runs on the
        emulated board (its address, its cgroup), and a client on this host gets the
        unsharded model's outputs through it."""
        from edge.build import make_plan
        from edge.coordinator.client import InferClient
        from edge.export import example_inputs

        board = lab.device("board")
        assert board.name not in {d.name for d in lab.cluster().devices}  # serves no stage
        assert board.cpu_quota_us / board.cpu_period_us == pytest.approx(
            lab.device("rpi4b-2gb-1").cpu_cores)
        devices = [d for d in lab.cluster().devices if d.name in ("rpi4b-2gb-1", "rpi4b-2gb-2")]
        plan_dir = tmp_path / "plan"
        make_plan(bert_small, devices, plan_dir, bindings={"batch": 1, "sequence": 16})
        port_file = tmp_path / "port"
        cmd = [sys.executable, "-m", "edge", "lab", "run", "--state-dir", str(lab.state_dir),
               "board", "--", sys.executable, "-m", "edge", "coordinator",
               "--plan", str(plan_dir), "--certs", str(lab.bundle("board")),
               "--listen", f"{board.ip}:50050", "--port-file", str(port_file)]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            end = time.monotonic() + 90
            while not port_file.exists():
                assert p.poll() is None and time.monotonic() < end, p.stdout.read().decode()
                time.sleep(0.1)
            procs = board.cgroup.procs()
            assert procs, "the coordinator is not in the board's cgroup"
            r = edge_cli("lab", "status", "--state-dir", str(lab.state_dir))
            assert "coordinator's board" in r.stdout and "1 process(es) run on it" in r.stdout
            x = example_inputs("bert", "small", batch=1, seq=16, seed=3)
            with InferClient(f"{board.ip}:50050", security=lab.security()) as client:
                got = client.infer(x)
            want = reference(bert_small, x)
            for k in want:
                np.testing.assert_allclose(got[k], want[k], atol=TOL, rtol=0, err_msg=k)
        finally:
            p.terminate()
            p.wait(20)
        assert board.cgroup.procs() == []

    def test_a_device_whose_cable_is_pulled_is_failed_over_and_rejoins(self, lab, bert_small,
                                                                       tmp_path):
        """The link goes down (no reset, no error: packets vanish) mid-run; every request
        still gets the unsharded answer, and the device rejoins when the link is back."""
        from edge.coordinator.pipeline import Pipeline
        from edge.export import example_inputs
        from edge.build import make_plan
        from edge.transport.codec import decode_tensors

        devices = [d for d in lab.cluster().devices
                   if d.name in ("rpi4b-2gb-1", "rpi4b-2gb-2", "rpi-zero-2w-1")]
        plan = make_plan(bert_small, devices, tmp_path, bindings={"batch": 1, "sequence": 16})
        cases = [example_inputs("bert", "small", batch=1, seq=s, seed=i)
                 for i, s in enumerate((16, 9, 24))]
        want = [reference(bert_small, x) for x in cases]
        with Pipeline(plan, tmp_path, security=lab.security()) as pipeline:
            pipeline.start()

            def one(i: int):
                if i == 10:
                    lab.set_link("rpi4b-2gb-2", up=False)
                return i, pipeline.infer(cases[i % 3])

            try:
                with ThreadPoolExecutor(3) as pool:
                    results = list(pool.map(one, range(40)))
            finally:
                lab.set_link("rpi4b-2gb-2", up=True)
            for i, r in results:
                got = decode_tensors(r.outputs)
                for k in want[i % 3]:
                    np.testing.assert_allclose(got[k], want[i % 3][k], atol=TOL, rtol=0)
            lost = pipeline.recoveries[0]
            assert lost.lost == ("rpi4b-2gb-2",) and lost.how == "re-planned", lost
            assert lost.noticed_s < 10, lost.describe()
            end = time.monotonic() + 60
            while len(pipeline.recoveries) < 2 and time.monotonic() < end:
                time.sleep(0.2)
            back = pipeline.recoveries[-1]
            assert back.joined == ("rpi4b-2gb-2",) and back.how == "original", back
            assert back.uploaded_bytes == 0
            r = pipeline.infer(cases[0])
            assert [t.stage for t in r.timings] == [0, 1, 2]

    def test_memory_cap_kills_a_process_that_allocates_past_it(self, lab):
        alloc = lab.device("alloc")
        r = subprocess.run(lab.command("alloc", [sys.executable, "-c",
                                                 "b = bytearray(256 << 20); print('survived')"]),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode in (-9, 137) and "survived" not in r.stdout, r
        status = {s.device.name: s for s in lab.status()}["alloc"]
        assert status.oom_kills == 1 and status.peak_mb >= alloc.memory_cap_mb - 1
        # The worker (smaller) survived; the lab says what the OOM killer did.
        assert status.alive and "OOM killer killed 1" in status.reason

    def test_worker_over_its_cap_is_killed_and_the_coordinator_says_which_and_why(
            self, lab, bert_tiny, tmp_path):
        from edge.coordinator.pipeline import InferError, Pipeline
        from edge.export import example_inputs
        from edge.build import make_plan
        from edge.transport.channels import Deadlines

        tight = lab.device("tight")
        devices = {d.name: d for d in lab.cluster().devices}
        # Plan as if every device had plenty of memory: neither the planner nor the
        # coordinator's check of a request's size stops it; the kernel must.
        roomy = [dataclasses.replace(devices[name], memory_mb=64 * 1024)
                 for name in ("rpi4b-2gb-1", "tight", "rpi4b-2gb-2")]
        # Whole nodes: a cut inside a feed-forward block would carry a second hidden state,
        # past what the tight worker takes (the message sizes below are sized for these).
        plan = make_plan(bert_tiny, roomy, tmp_path, bindings={"batch": 1, "sequence": 16},
                         block_cuts=False)
        assert plan.stages[1].device.name == "tight"
        # Without failover: the request that killed it would be sent again elsewhere.
        with Pipeline(plan, tmp_path, diagnose=lab.diagnose, failover=False,
                      security=lab.security(),
                      deadlines=Deadlines(infer=60)) as pipeline:
            pipeline.start()
            pipeline.infer(example_inputs("bert", "tiny", batch=1, seq=16))
            # Attention over 12 x 512 tokens (16 x 512 peaked at 160 MiB without a cap):
            # past the cap in compute, while its messages (15.7 MB) stay within what the
            # worker takes (16 MiB at a 100 MiB budget): the kernel kills it, not gRPC.
            with pytest.raises(InferError) as e:
                pipeline.infer(example_inputs("bert", "tiny", batch=12, seq=512))
        message = str(e.value)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        assert "tight" in message and tight.address in message, message
        assert "out of memory at its 100 MiB memory cap" in message, message

        status = {s.device.name: s for s in lab.status()}
        assert not status["tight"].alive and status["tight"].oom_kills == 1
        assert all(status[n].alive for n in ("rpi4b-2gb-1", "rpi4b-2gb-2"))
        r = edge_cli("lab", "status", "--state-dir", str(lab.state_dir))
        assert r.returncode == 1, r.stdout + r.stderr
        assert "tight: killed by the kernel: out of memory at its 100 MiB memory cap" in r.stdout
