"""Proof on aarch64: one shard served by an aarch64 ``edge worker`` under qemu-user.

A smoke test, not a benchmark (qemu is 90-290x slower than a board), and not part of CI.
It needs root and the Debian archive and PyPI; run it as ``devices/arm64-smoke.sh`` or
``python -m edge.lab.arm64``. It:

1. installs debootstrap, qemu-user-static and binfmt-support if missing, mounts
   binfmt_misc and enables qemu-aarch64;
2. builds an arm64 Debian bookworm root once (``debootstrap --variant=minbase``,
   200-300 s, 550 MB with the venv) in the cache folder and reuses it afterwards;
3. builds a wheel of this checkout (``pip wheel --no-deps``), downloads its dependencies
   as aarch64 cp311 wheels on the host, and installs both into a venv inside the root with
   ``pip --no-index``: the worker's declared dependencies, never torch;
4. on the host: exports BERT tiny, plans it over two ``rpi4b-2gb`` devices and computes
   stage 0's outputs with the host's (x86) onnxruntime;
5. starts ``edge worker --threads 1`` in the root under qemu (``QEMU_CPU=cortex-a72``);
   from the host, uploads stage 0 through the coordinator's deploy code, configures it as
   the last stage, sends one Forward and reads the result from Subscribe;
6. compares with the x86 outputs (max abs difference <= 1e-4), prints the worker's
   ``platform.machine()``, exits 0 on success and 1 on a mismatch;
7. in ``finally``: stops the worker and unmounts everything under the root. The root and
   the venv stay for the next run. ``--cleanup`` does only this, after a killed run.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
import onnxruntime as ort

from edge.build import make_plan
from edge.coordinator.deploy import DeployError, configure, connect, upload_shard, wait_healthy
from edge.errors import EdgeError
from edge.export import example_inputs, export_model
from edge.planning.cluster import cluster_from_profile
from edge.proto import edge_pb2 as pb
from edge.shards.runtime import session_options
from edge.transport.channels import Deadlines, Security
from edge.transport.codec import decode_tensors, encode_tensors
from edge.worker.launch import stop_process

if TYPE_CHECKING:
    from edge.planning.plan import Plan

__all__ = ["SmokeError", "SmokeConfig", "run_smoke", "unmount_under", "main"]

log = logging.getLogger(__name__)

TOLERANCE = 1e-4
SUITE = "bookworm"  # python3 is 3.11 there: the cp311 wheels below
PYTHON_VERSION = "3.11"
PLATFORMS = ("manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_28_aarch64")
VENV = "/opt/edge/venv"          # inside the root
WHEELS_IN_ROOT = "/mnt/wheels"   # where the host's wheel folder is bind-mounted
# A wheel's file name spells the distribution (edge-runtime) with an underscore.
_WHEEL_PREFIX = "edge_runtime-"
RUN_IN_ROOT = "/tmp/edge-arm64"  # the worker's port file and shard cache
BINFMT = Path("/proc/sys/fs/binfmt_misc")
HOST_TOOLS = {"debootstrap": "debootstrap", "qemu-aarch64-static": "qemu-user-static",
              "update-binfmts": "binfmt-support"}
# A clean environment for everything run inside the root: the host's PIP_* settings (find
# links, extra indexes) must not reach the root's pip.
ROOT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root", "LANG": "C.UTF-8", "QEMU_CPU": "cortex-a72",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONDONTWRITEBYTECODE": "1"}


class SmokeError(EdgeError):
    """The aarch64 smoke test could not be set up or run; the message says where."""


@dataclasses.dataclass(frozen=True)
class SmokeConfig:
    """What ``edge.lab.arm64`` takes.

    Attributes:
        cache: holds ``root/`` (the arm64 Debian), ``wheels/`` and the logs; kept.
        mirror: the Debian mirror debootstrap uses.
        sequence: tokens in the one request.
        boot_timeout_s: seconds the worker may take to listen: generous, since qemu is
            90-290x slower than native (here it listened in about 15 s).
        call_timeout_s: deadline of each gRPC call, and of waiting for the result.
    """

    cache: Path = Path(os.environ.get("EDGE_ARM64_CACHE", "/var/cache/edge-arm64"))
    mirror: str = "http://deb.debian.org/debian"
    sequence: int = 16
    boot_timeout_s: float = 900.0
    call_timeout_s: float = 900.0

    @property
    def root(self) -> Path:
        return self.cache / "root"


# ------------------------------------------------------------------------ running things


def _run(cmd: list[str], log_file: Path | None = None, env: dict | None = None,
         timeout: float | None = None) -> str:
    """Run ``cmd``; its output goes to ``log_file`` (appended) or is returned.

    Raises:
        SmokeError: it failed; the message has the command and the end of its output.
    """
    log.debug("run: %s", " ".join(map(str, cmd)))
    try:
        r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env,
                           timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise SmokeError(f"`{cmd[0]}` not found (needed for: {' '.join(map(str, cmd))})") from None
    except subprocess.TimeoutExpired:
        raise SmokeError(f"`{' '.join(map(str, cmd))}` did not finish in {timeout:.0f} s") from None
    out = r.stdout + r.stderr
    if log_file is not None:
        with open(log_file, "a") as f:
            f.write(f"$ {' '.join(map(str, cmd))}\n{out}\n")
    if r.returncode != 0:
        tail = "\n".join(out.strip().splitlines()[-15:]) or "no output"
        where = f" (full output: {log_file})" if log_file else ""
        raise SmokeError(f"`{' '.join(map(str, cmd))}` failed with exit {r.returncode}"
                         f"{where}:\n{tail}")
    return out


def _in_root(root: Path, argv: list[str]) -> list[str]:
    return ["chroot", str(root), *argv]


class _Steps:
    """Prints each step with the seconds since the start: the command's own output."""

    def __init__(self):
        self.start = time.monotonic()

    def __call__(self, name: str) -> None:
        print(f"[{self.elapsed():7.1f} s] {name}", flush=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.start


# ------------------------------------------------------------------------ the host


def ensure_host_tools(log_file: Path) -> list[str]:
    """apt-get install what is missing of debootstrap, qemu-user-static, binfmt-support.

    Returns:
        The packages it installed.
    """
    missing = sorted({pkg for exe, pkg in HOST_TOOLS.items() if shutil.which(exe) is None})
    if missing:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        _run(["apt-get", "update"], log_file, env)
        _run(["apt-get", "install", "-y", "--no-install-recommends", *missing], log_file, env)
    return missing


def ensure_binfmt(log_file: Path) -> None:
    """binfmt_misc mounted and qemu-aarch64 enabled with the F flag.

    F (fix binary) makes the kernel open the host's qemu-aarch64-static when the entry is
    registered, so the root needs no copy of it.
    """
    if not (BINFMT / "register").exists():
        _run(["mount", "-t", "binfmt_misc", "binfmt_misc", BINFMT], log_file)
    entry = BINFMT / "qemu-aarch64"
    if not entry.exists() or not entry.read_text().startswith("enabled"):
        _run(["update-binfmts", "--enable", "qemu-aarch64"], log_file)
    text = entry.read_text() if entry.exists() else ""
    if not text.startswith("enabled"):
        raise SmokeError(f"qemu-aarch64 is not enabled in {BINFMT} after "
                         f"`update-binfmts --enable qemu-aarch64`: {text.strip() or 'no entry'}")
    flags = next((line.split()[1] for line in text.splitlines() if line.startswith("flags:")
                  and len(line.split()) > 1), "")
    if "F" not in flags:
        raise SmokeError(f"{entry} has flags {flags!r}, expected F (fix binary); without it "
                         "the root would need its own qemu-aarch64-static")


def ensure_root(config: SmokeConfig, log_file: Path) -> bool:
    """Build the arm64 root unless a complete one is cached.

    debootstrap writes into ``root.partial`` and the folder is renamed only when it
    finished, so an interrupted build is never reused.

    Returns:
        True if it was built now.
    """
    root = config.root
    if (root / ".edge-complete").is_file():
        return False
    partial = root.with_name(root.name + ".partial")
    for stale in (partial, root):  # root unmarked: an older, unfinished attempt
        if stale.exists():
            _remove_root(stale)
    _run(["debootstrap", "--arch=arm64", "--variant=minbase",
          "--include=python3,python3-venv", SUITE, partial, config.mirror], log_file)
    (partial / ".edge-complete").write_text(f"debootstrap arm64 {SUITE} minbase "
                                            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    partial.rename(root)
    return True


def _remove_root(root: Path) -> None:
    stop_root_processes(root)
    unmount_under(root)
    if _mounts_under(root):  # never rmtree through a bind mount of the host's /dev
        raise SmokeError(f"cannot remove {root}: still mounted: {', '.join(_mounts_under(root))}")
    shutil.rmtree(root)


def checkout() -> Path:
    """The source tree this module runs from: what gets installed on the root."""
    repo = Path(__file__).resolve().parents[2]
    if not (repo / "pyproject.toml").is_file():
        raise SmokeError(f"{repo} has no pyproject.toml: run the smoke test from a clone of "
                         "the repository, not from an installed package")
    return repo


def build_wheels(wheels: Path, log_file: Path) -> Path:
    """A wheel of this checkout plus its dependencies as aarch64 cp311 wheels, in ``wheels``.

    The dependency list is the wheel's own metadata (pyproject's ``dependencies``), so
    the root gets exactly what ``pip install edge-runtime`` on a Pi gets; torch is only in
    extras.

    Returns:
        The edge wheel.
    """
    repo = checkout()
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edge-arm64-wheel-") as tmp:
        # Built from a copy: setuptools leaves build/ and *.egg-info in the source tree.
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(repo / name, src / name)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(repo / "edge", src / "edge", ignore=ignore)
        shutil.copytree(repo / "devices", src / "devices", ignore=ignore)
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
              "-w", Path(tmp) / "dist", src], log_file)
        built = next((Path(tmp) / "dist").glob(f"{_WHEEL_PREFIX}*.whl"))
        # "edge-*": wheels of before the distribution was renamed edge-runtime.
        for old in [*wheels.glob(f"{_WHEEL_PREFIX}*.whl"), *wheels.glob("edge-*.whl")]:
            old.unlink()
        wheel = wheels / built.name
        shutil.copy2(built, wheel)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    _run([sys.executable, "-m", "pip", "download", "--dest", wheels, "--only-binary=:all:",
          *platforms, "--python-version", PYTHON_VERSION, "--implementation", "cp", wheel],
         log_file)
    torch = sorted(p.name for p in wheels.glob("torch*"))
    if torch:
        raise SmokeError(f"{wheels} has {torch}: a worker never installs torch")
    return wheel


# ------------------------------------------------------------------------ mounts


def _mount_points() -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # Field 5 is the mount point, with spaces etc. escaped as octal (\040).
            point = line.split()[4]
            points.append(point.encode().decode("unicode_escape"))
    return points


def _mounts_under(root: Path) -> list[str]:
    root = os.path.realpath(root)
    return [p for p in _mount_points() if p == root or p.startswith(root + "/")]


def unmount_under(root: Path) -> list[str]:
    """Unmount everything mounted at or below ``root``, deepest first.

    Works from the kernel's mount table, not from what this process mounted, so it also
    cleans up after a run that was killed.

    Returns:
        The mount points it unmounted.
    """
    done = []
    for point in sorted(set(_mounts_under(root)), key=lambda p: p.count("/"), reverse=True):
        r = subprocess.run(["umount", point], capture_output=True, text=True)
        if r.returncode != 0:  # busy: detach now, freed when the last user goes
            r = subprocess.run(["umount", "--lazy", point], capture_output=True, text=True)
        if r.returncode != 0:
            log.warning("could not unmount %s: %s", point, r.stderr.strip())
        else:
            done.append(point)
    return done


def stop_root_processes(root: Path, timeout: float = 30.0) -> list[int]:
    """SIGTERM, then SIGKILL, the processes whose root directory is ``root``: a worker
    left behind by a killed run. Matched by pid, nothing by name.

    Returns:
        Their pids.
    """
    root_path = os.path.realpath(root)
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "root") == root_path:
                    pids.append(int(entry.name))
            except OSError:
                continue
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + timeout
    for pid in pids:
        while Path(f"/proc/{pid}").exists() and time.monotonic() < end:
            time.sleep(0.2)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
    return pids


def fake_cpuinfo(cores: int) -> str:
    """A Raspberry Pi 4 (Cortex-A72) ``/proc/cpuinfo``.

    qemu-user passes the host's x86 cpuinfo through. With /sys mounted, importing
    onnxruntime then segfaults in its cpuinfo library (exit 139, measured); without /sys
    it imports but cannot detect the CPU.
    """
    cpu = ("processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
           "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\n"
           "CPU part\t: 0xd08\nCPU revision\t: 3\n\n")
    return ("".join(cpu.format(i=i) for i in range(cores))
            + "Hardware\t: BCM2835\nRevision\t: c03111\n"
            + "Model\t\t: Raspberry Pi 4 Model B Rev 1.1\n")


def mount_root(config: SmokeConfig, wheels: Path, log_file: Path) -> None:
    """/proc (with the fake cpuinfo over it), /sys, /dev and the wheel folder, in the root."""
    root = config.root
    cpuinfo = config.cache / "cpuinfo-cortex-a72"
    cpuinfo.write_text(fake_cpuinfo(os.cpu_count() or 1))
    (root / WHEELS_IN_ROOT.lstrip("/")).mkdir(parents=True, exist_ok=True)
    for cmd in (["mount", "-t", "proc", "proc", root / "proc"],
                ["mount", "--bind", cpuinfo, root / "proc/cpuinfo"],
                ["mount", "-t", "sysfs", "-o", "ro", "sysfs", root / "sys"],
                ["mount", "--bind", "/dev", root / "dev"],
                ["mount", "--bind", wheels, root / WHEELS_IN_ROOT.lstrip("/")]):
        _run(cmd, log_file)


# ------------------------------------------------------------------------ the root's venv


def install_worker(config: SmokeConfig, wheel: Path, wheels: Path, log_file: Path) -> str:
    """Create the root's venv (once) and pip-install the worker into it, offline.

    The dependencies are installed when the set of wheels changed; the edge wheel itself
    every run, since it is this checkout.

    Returns:
        What the root's python reports: its version and ``platform.machine()``.
    """
    root = config.root
    py = f"{VENV}/bin/python"
    if not (root / py.lstrip("/")).exists():
        _run(_in_root(root, ["/usr/bin/python3", "-m", "venv", VENV]), log_file, ROOT_ENV)
    pip = [py, "-m", "pip", "install", "--no-index", "--find-links", WHEELS_IN_ROOT]
    stamp = root / "opt/edge/installed-wheels.txt"
    deps = "\n".join(sorted(p.name for p in wheels.glob("*.whl")
                            if not p.name.startswith((_WHEEL_PREFIX, "edge-")))) + "\n"
    in_root = f"{WHEELS_IN_ROOT}/{wheel.name}"
    if not stamp.is_file() or stamp.read_text() != deps:
        _run(_in_root(root, [*pip, in_root]), log_file, ROOT_ENV)
        stamp.write_text(deps)
    _run(_in_root(root, [*pip, "--no-deps", "--force-reinstall", in_root]), log_file, ROOT_ENV)
    return _run(_in_root(root, [py, "-c", "import platform, sys; "
                                          "print(sys.version.split()[0], platform.machine())"]),
                None, ROOT_ENV).strip()


# ------------------------------------------------------------------------ the worker


class RootWorker:
    """``edge worker`` running inside the root under qemu, on this machine's loopback
    (a chroot shares the host's network namespace).

    Args:
        config: the smoke test's settings.
        log_path: where the worker's output goes, on the host.
    """

    def __init__(self, config: SmokeConfig, log_path: Path):
        self.config, self.log_path = config, log_path
        run_dir = config.root / RUN_IN_ROOT.lstrip("/")
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh shard cache: upload for real
        run_dir.mkdir(parents=True)
        self.port_file = run_dir / "port"
        argv = [f"{VENV}/bin/edge", "--log-level", "INFO", "worker",
                "--listen", "127.0.0.1:0", "--port-file", f"{RUN_IN_ROOT}/port",
                "--cache-dir", f"{RUN_IN_ROOT}/cache", "--threads", "1"]
        with open(log_path, "wb") as log_file:
            self.process = subprocess.Popen(_in_root(config.root, argv), env=ROOT_ENV,
                                            stdout=log_file, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)

    def wait_listening(self) -> str:
        """Wait for the port file; returns ``127.0.0.1:PORT``.

        Raises:
            SmokeError: the worker exited or did not listen in time; with its log.
        """
        end = time.monotonic() + self.config.boot_timeout_s
        while not self.port_file.exists():
            if self.process.poll() is not None:
                raise SmokeError(f"the aarch64 worker exited with {self.process.returncode} "
                                 f"before listening:\n{self.log_tail()}")
            if time.monotonic() > end:
                raise SmokeError(f"the aarch64 worker did not listen within "
                                 f"{self.config.boot_timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(0.5)
        return f"127.0.0.1:{int(self.port_file.read_text())}"

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (graceful: the worker stops its server), SIGKILL if it takes too long."""
        return stop_process(self.process, timeout)


# ------------------------------------------------------------------------ the check


@dataclasses.dataclass
class Prepared:
    """Stage 0 of a plan, its input and its x86 outputs."""

    plan: "Plan"
    plan_dir: Path
    inputs: dict
    expected: dict


def prepare_on_host(work: Path, sequence: int) -> Prepared:
    """Export BERT tiny, plan it over two rpi4b-2gb, run stage 0 with x86 onnxruntime.

    The reference runs the shard as the worker does (its outputs, plus the inputs it only
    passes on), with plain onnxruntime: none of the worker's code.
    """
    model = export_model("bert", size="tiny", seed=0, out=work / "bert-tiny.onnx")
    # The addresses are placeholders: stage 0 is pointed at the aarch64 worker later.
    cluster = cluster_from_profile("rpi4b-2gb", 2)
    plan = make_plan(model, cluster.devices, work / "build",
                     bindings={"batch": 1, "sequence": sequence}, modes=("fp32",))
    if len(plan.stages) < 2:
        raise SmokeError(f"the plan has {len(plan.stages)} stage(s); the smoke test needs a "
                         "real cut, at least 2")
    stage = plan.stages[0]
    inputs = example_inputs("bert", "tiny", batch=1, seq=sequence, seed=0)
    inputs = {s.name: inputs[s.name] for s in stage.inputs}
    session = ort.InferenceSession(str(work / "build" / stage.shard),
                                   sess_options=session_options(1, stage.mode),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    produced = dict(zip(names, session.run(names, {i.name: inputs[i.name]
                                                   for i in session.get_inputs()})))
    expected = {s.name: produced[s.name] if s.name in produced else inputs[s.name]
                for s in stage.outputs}
    return Prepared(plan, work / "build", inputs, expected)


def forward_once(address: str, prepared: Prepared, timeout: float) -> tuple[dict, float, object]:
    """Upload stage 0 to the worker at ``address``, configure it as the only (last) stage,
    send one Forward and take its result from Subscribe.

    Returns:
        The decoded outputs, the stage's compute time on the worker (ms) and the
        worker's ``GetStatus`` reply.

    Raises:
        SmokeError: a call failed, or the worker reported a failure.
    """
    plan = prepared.plan
    stage = plan.stages[0]
    stage = dataclasses.replace(stage, device=dataclasses.replace(stage.device, address=address))
    # A one-stage plan: deploy's configure() then makes it the last stage (no next hop),
    # so its result comes back on Subscribe.
    solo = dataclasses.replace(plan, stages=(stage,))
    deadlines = Deadlines(control=timeout, forward=timeout, upload=timeout, load=timeout,
                          infer=timeout, ready=timeout)
    worker = connect(stage, Security())
    events: queue.Queue = queue.Queue()
    try:
        try:
            wait_healthy(worker, deadlines)
            upload_shard(worker, prepared.plan_dir, deadlines)
            configure(worker, solo, epoch=1, deadlines=deadlines)
        except DeployError as e:
            raise SmokeError(f"deploying stage 0 to the aarch64 worker: {e}") from None
        stream = worker.stub.Subscribe(pb.SubscribeRequest(), timeout=timeout)

        def collect():
            try:
                for event in stream:
                    events.put(event)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.CANCELLED:
                    events.put(e)

        threading.Thread(target=collect, name="subscribe", daemon=True).start()
        try:
            worker.stub.Forward(pb.Activation(request_id="arm64-smoke", epoch=1,
                                              tensors=encode_tensors(prepared.inputs)),
                                timeout=timeout)
            try:
                event = events.get(timeout=timeout)
            except queue.Empty:
                raise SmokeError(f"no result from the aarch64 worker within "
                                 f"{timeout:.0f} s") from None
            if isinstance(event, grpc.RpcError):
                raise SmokeError(f"Subscribe failed: {event.code().name}: {event.details()}")
            if event.WhichOneof("kind") != "result":
                raise SmokeError(f"the aarch64 worker reported a failure: {event}")
            status = worker.stub.GetStatus(pb.StatusRequest(), timeout=timeout)
        except grpc.RpcError as e:
            raise SmokeError(f"calling the aarch64 worker: {e.code().name}: "
                             f"{e.details()}") from None
        finally:
            stream.cancel()
        compute_ms = sum(t.compute_ms for t in event.result.timings)
        return decode_tensors(event.result.tensors), compute_ms, status
    finally:
        worker.close()


def compare(got: dict, expected: dict) -> dict[str, float]:
    """Max abs difference per output. Raises SmokeError if the names or shapes differ."""
    if set(got) != set(expected):
        raise SmokeError(f"the worker sent {sorted(got)}, expected {sorted(expected)}")
    diffs = {}
    for name, want in expected.items():
        have = got[name]
        if have.shape != want.shape or have.dtype != want.dtype:
            raise SmokeError(f"{name}: the worker sent {have.dtype}{list(have.shape)}, "
                             f"expected {want.dtype}{list(want.shape)}")
        diffs[name] = float(np.max(np.abs(have.astype(np.float64) - want.astype(np.float64)),
                                   initial=0.0))
    return diffs


# ------------------------------------------------------------------------ the whole run


def run_smoke(config: SmokeConfig) -> int:
    """The steps in the module docstring. Returns the exit code: 0 equal within 1e-4, 1 not.

    Raises:
        SmokeError: a step failed (not root, a tool, debootstrap, pip, the worker).
    """
    if os.geteuid() != 0:
        raise SmokeError("needs root: it installs packages, mounts binfmt_misc and /proc, "
                         f"/sys, /dev into a chroot (this process runs as uid {os.geteuid()})")
    config.cache.mkdir(parents=True, exist_ok=True)
    lock = open(config.cache / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SmokeError(f"another smoke test is using {config.cache}") from None
    setup_log = config.cache / "setup.log"
    setup_log.write_text("")
    wheels = config.cache / "wheels"
    step = _Steps()
    worker: RootWorker | None = None
    try:
        step("host tools: debootstrap, qemu-user-static, binfmt-support")
        installed = ensure_host_tools(setup_log)
        print(f"          {'installed ' + ', '.join(installed) if installed else 'present'}")
        ensure_binfmt(setup_log)
        step(f"arm64 root in {config.root}")
        built = ensure_root(config, setup_log)
        print(f"          {'built with debootstrap' if built else 'cached, reused'}")
        step("aarch64 wheels: this checkout + its dependencies (pip download, host)")
        wheel = build_wheels(wheels, setup_log)
        print(f"          {len(list(wheels.glob('*.whl')))} wheels in {wheels}")
        stop_root_processes(config.root)  # leftovers of a killed run
        unmount_under(config.root)
        mount_root(config, wheels, setup_log)
        step(f"install into {VENV} inside the root (pip --no-index, under qemu)")
        print(f"          root python: {install_worker(config, wheel, wheels, setup_log)}")
        step("start `edge worker --threads 1` in the root under qemu (QEMU_CPU=cortex-a72)")
        worker = RootWorker(config, config.cache / "worker.log")
        with tempfile.TemporaryDirectory(prefix="edge-arm64-") as tmp:
            # While the worker boots under qemu, the host exports, plans and computes.
            step("host (x86): export BERT tiny, plan over 2 x rpi4b-2gb, stage 0 reference")
            prepared = prepare_on_host(Path(tmp), config.sequence)
            stage = prepared.plan.stages[0]
            print(f"          {len(prepared.plan.stages)} stages; stage 0: "
                  f"{stage.total_bytes / 2**20:.1f} MiB, inputs "
                  f"{', '.join(s.name for s in stage.inputs)}; outputs "
                  f"{', '.join(s.name for s in stage.outputs)}")
            step("wait for the aarch64 worker to listen")
            address = worker.wait_listening()
            print(f"          listening on {address}")
            step("gRPC: UploadShard, Configure (last stage), Forward, Subscribe")
            got, compute_ms, status = forward_once(address, prepared, config.call_timeout_s)
        diffs = compare(got, prepared.expected)
        worst = max(diffs.values())
        facts = status.facts
        print(f"worker: machine={facts.machine} python={facts.python} "
              f"onnxruntime={facts.onnxruntime} system={facts.system}")
        for name, d in diffs.items():
            print(f"  {name}: max abs diff {d:.3g}")
        print(f"stage 0 compute on the emulated worker: {compute_ms:.0f} ms (qemu: not a "
              f"timing); total {step.elapsed():.0f} s")
        print(f"max abs diff vs x86: {worst:.3g} (tolerance {TOLERANCE:g})")
        ok = worst <= TOLERANCE and facts.machine == "aarch64"
        if facts.machine != "aarch64":
            print(f"FAIL: the worker reports machine {facts.machine!r}, expected aarch64")
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        if worker is not None:
            code = worker.stop()
            log.info("aarch64 worker stopped with exit code %s", code)
        unmount_under(config.root)
        lock.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m edge.lab.arm64 [--cache DIR] [--mirror URL] [--cleanup]``."""
    parser = argparse.ArgumentParser(
        prog="python -m edge.lab.arm64",
        description="Proof on aarch64: serve one shard from an aarch64 `edge worker` under "
                    "qemu-user and compare its gRPC result with x86 (needs root).")
    default = SmokeConfig()
    parser.add_argument("--cache", type=Path, default=default.cache,
                        help=f"root, wheels and logs, kept between runs (default "
                             f"{default.cache}; env EDGE_ARM64_CACHE)")
    parser.add_argument("--mirror", default=default.mirror, help="Debian mirror for debootstrap")
    parser.add_argument("--sequence", type=int, default=default.sequence,
                        help="tokens in the one request")
    parser.add_argument("--cleanup", action="store_true",
                        help="only stop the worker and unmount what a killed run left "
                             "under the root")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = SmokeConfig(cache=args.cache, mirror=args.mirror, sequence=args.sequence)
    if args.cleanup:
        for pid in stop_root_processes(config.root):
            print(f"stopped process {pid} running in {config.root}")
        for point in unmount_under(config.root) + unmount_under(
                config.root.with_name(config.root.name + ".partial")):
            print(f"unmounted {point}")
        return 0

    # SIGTERM (a timeout, `kill`) unwinds like Ctrl-C, so the finally clauses unmount.
    def on_sigterm(*_):
        print("arm64 smoke test: SIGTERM, stopping the worker and unmounting", file=sys.stderr,
              flush=True)
        sys.exit(143)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return run_smoke(config)
    except SmokeError as e:
        print(f"arm64 smoke test: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
