"""The lab's worker processes: starting one inside its device, waiting for them to listen,
and telling what became of each (:class:`DeviceStatus`: running, or why not).

``edge.lab.lab`` owns the lifecycle and the state file; this module only runs and reads
processes, cgroups and logs.
"""

from __future__ import annotations

import datetime
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from edge.lab.cgroups import Cgroup
from edge.lab.devices import LabDevice, load_profile
from edge.lab.system import CERTS_DIR, LabError, process_alive
from edge.worker.launch import module_command

__all__ = ["DeviceStatus", "start_worker", "wait_listening", "device_status", "bundle_dir",
           "port_file", "tail"]


@dataclass(frozen=True)
class DeviceStatus:
    """What the lab knows about a device now.

    Attributes:
        device: the device.
        alive: its worker process runs.
        oom_kills: processes the kernel's OOM killer killed in its cgroup (None: unknown).
        memory_mb: memory charged to its cgroup now (page cache included).
        peak_mb: the most it was ever charged.
        exit_code: the worker's exit status, when this process started it and it ended.
        reason: one line for people: ``running``, or why it is not.
    """

    device: LabDevice
    alive: bool
    oom_kills: int | None
    memory_mb: float | None
    peak_mb: float | None
    exit_code: int | None
    reason: str


def bundle_dir(state_dir: Path, dev: LabDevice) -> Path:
    """The device's certificate bundle, in the lab's throwaway CA."""
    return state_dir / CERTS_DIR / "devices" / dev.name


def port_file(state_dir: Path, dev: LabDevice) -> Path:
    """The file the device's worker writes its port to once it listens."""
    return state_dir / f"{dev.name}.port"


def start_worker(dev: LabDevice, state_dir: Path) -> subprocess.Popen:
    """Start ``edge worker`` inside the device: its namespace, its cgroup, its log.

    Args:
        dev: the device, built already.
        state_dir: the lab's state folder (port files, certificates).

    Returns:
        The process, in a session of its own.
    """
    ready = port_file(state_dir, dev)
    ready.unlink(missing_ok=True)
    Path(dev.cache_dir).mkdir(parents=True, exist_ok=True)
    # module_command: the folder `edge lab up` runs in cannot shadow the package.
    cmd = ["ip", "netns", "exec", dev.namespace, *module_command(
        "edge", "--log-level", "INFO", "worker",
        "--listen", dev.address, "--device", dev.profile,
        "--cache-dir", dev.cache_dir, "--threads", str(dev.threads),
        "--port-file", str(ready), "--certs", str(bundle_dir(state_dir, dev)),
        "--name", dev.name)]  # announced by mDNS on the lab's bridge: `edge discover` sees it
    profile_budget = load_profile(dev.profile).memory_budget_mb
    if dev.memory_budget_mb != profile_budget:
        cmd += ["--memory-budget", f"{dev.memory_budget_mb:g}"]
    with open(dev.log, "ab") as out:
        out.write(f"--- {datetime.datetime.now().isoformat(timespec='seconds')} "
                  f"edge lab up: {shlex.join(cmd)}\n".encode())
        out.flush()
        # A session of its own: the worker outlives `edge lab up` and its terminal.
        return subprocess.Popen(dev.cgroup.enter_command(cmd), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def wait_listening(devices: list[LabDevice], processes: dict[str, subprocess.Popen],
                   state_dir: Path, timeout: float) -> None:
    """Return once every device's worker listens.

    Args:
        devices: the devices.
        processes: their workers, by device name.
        state_dir: the lab's state folder (port files).
        timeout: seconds to wait for all of them.

    Raises:
        LabError: a worker exited first, or did not listen in time (with its log's end).
    """
    end = time.monotonic() + timeout
    waiting = list(devices)
    while waiting:
        for dev in list(waiting):
            p = processes[dev.name]
            if port_file(state_dir, dev).exists():
                waiting.remove(dev)
            elif p.poll() is not None:
                raise LabError(f"the worker of {dev.name} exited with {p.returncode} "
                               f"before listening on {dev.address}; its log "
                               f"({dev.log}) ends:\n{tail(dev.log)}")
        if waiting and time.monotonic() > end:
            names = ", ".join(d.name for d in waiting)
            raise LabError(f"the workers of {names} did not listen within {timeout:.0f} s;"
                           f" see {waiting[0].log}:\n{tail(waiting[0].log)}")
        time.sleep(0.05)


def device_status(dev: LabDevice, process: subprocess.Popen | None) -> DeviceStatus:
    """The device's worker now: alive or not, its cgroup's memory and OOM kills, and why.

    Args:
        dev: the device.
        process: its worker, when this process started it (its exit code is then known).
    """
    exit_code = process.poll() if process is not None else None
    alive = exit_code is None and dev.pid is not None and _running(dev.pid, dev.cgroup)
    ooms = dev.cgroup.oom_kills()
    now, peak = dev.cgroup.memory_bytes()
    mb = (lambda b: None if b is None else b / 2**20)
    cap = f"{dev.memory_cap_mb:.0f} MiB"
    if not dev.runs_worker:
        procs = dev.cgroup.procs()
        reason = (f"the coordinator's board: no worker; {len(procs)} process(es) run on it"
                  if procs else "the coordinator's board: no worker; run one with "
                                f"`edge lab run {dev.name} -- edge coordinator ...`")
        if ooms:
            reason += f"; the kernel's OOM killer killed {ooms} process(es) at its {cap} cap"
        return DeviceStatus(dev, bool(procs), ooms, mb(now), mb(peak), None, reason)
    if alive:
        reason = "running"
        if ooms:
            reason += (f"; the kernel's OOM killer killed {ooms} other process(es) at "
                       f"its {cap} memory cap")
    elif ooms:
        reason = (f"killed by the kernel: out of memory at its {cap} memory cap "
                  f"(cgroup OOM kills: {ooms}, peak {mb(peak) or 0:.0f} MiB)")
    elif exit_code is not None:
        reason = f"its worker {_how_it_ended(exit_code)}; log {dev.log}"
    elif dev.pid is None:
        reason = "its worker was never started"
    else:
        reason = f"its worker (pid {dev.pid}) is gone; log {dev.log}"
    if not alive and not ooms:
        last = tail(dev.log, 1)
        if last:
            reason += f": {last}"
    return DeviceStatus(dev, alive, ooms, mb(now), mb(peak), exit_code, reason)


def _how_it_ended(exit_code: int) -> str:
    if exit_code >= 0:
        return f"exited with {exit_code}"
    try:
        return f"was killed by {signal.Signals(-exit_code).name}"
    except ValueError:
        return f"was killed by signal {-exit_code}"


def _running(pid: int, group: Cgroup) -> bool:
    """The process is in its cgroup (so not a reused pid) and not a zombie."""
    return pid in group.procs() and process_alive(pid)


def tail(path: str | Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log ("" when it cannot be read)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])
