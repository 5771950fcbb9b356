"""Memory caps and CPU quotas for emulated devices, with cgroup v1 or v2.

One cgroup per device, named ``edge-lab-<device>``. With cgroup v1 (separate ``memory``
and ``cpu`` hierarchies) it is created beneath the cgroup of the process that runs the lab,
so a CI job's or container's own limits still hold for the lab's workers. With cgroup v2
it is created at the root of the unified hierarchy: v2 forbids processes in a cgroup whose
children use controllers, and the caller's own cgroup has processes.

A worker enters its cgroup before it execs (:meth:`Cgroup.enter_command`), so it never
runs a moment uncapped. When a worker dies, the cgroup keeps the evidence: the kernel's
OOM-kill counter (v1 ``memory.oom_control``, v2 ``memory.events``) and peak usage.
"""

from __future__ import annotations

import math
import os
import shlex
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from edge.lab.system import PREFIX, LabError

__all__ = ["CpuQuota", "cpu_quota", "Cgroup", "Hierarchy", "detect", "dir_procs",
           "lift_cpu_limit", "remove_dir"]

# The kernel ticks every 4 ms here: with the usual 100 ms period a burst of work shorter
# than that is not slowed at all, and periods of 2 ms or less over-deliver (measured here).
PERIOD_US = 5000
# The kernel refuses a quota under 1 ms (and a period over 1 s).
MIN_QUOTA_US = 1000
MAX_PERIOD_US = 1_000_000


@dataclass(frozen=True)
class CpuQuota:
    """``quota_us`` of CPU time per ``period_us``, over all of a cgroup's threads."""

    quota_us: int
    period_us: int

    @property
    def cores(self) -> float:
        return self.quota_us / self.period_us


def cpu_quota(cores: float, host_cores: int) -> CpuQuota:
    """The quota that gives ``cores`` of this host's CPUs.

    A 5 ms period, except where the quota would fall under the kernel's 1 ms minimum (a
    device slower than 0.2 host cores): then the quota is 1 ms and the period grows to
    keep the ratio, because a device that is 5x too fast would be a worse lie than a
    coarser time slice.

    Args:
        cores: host cores' worth of CPU the device gets (> 0).
        host_cores: this host's cores; the quota never exceeds them.
    """
    cores = min(float(cores), float(host_cores))
    if cores <= 0:
        raise ValueError(f"a CPU share must be > 0 cores, got {cores}")
    quota = round(cores * PERIOD_US)
    if quota >= MIN_QUOTA_US:
        return CpuQuota(quota, PERIOD_US)
    period = min(MAX_PERIOD_US, math.ceil(MIN_QUOTA_US / cores))
    return CpuQuota(MIN_QUOTA_US, period)


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as e:
        raise LabError(f"cannot write {value!r} to {path}: {e.strerror or e}") from None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _keyed(text: str | None, key: str) -> int | None:
    """The value of ``key`` in a ``key value`` per line file (memory.events, oom_control)."""
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key and parts[1].isdigit():
            return int(parts[1])
    return None


@dataclass(frozen=True)
class Cgroup:
    """A device's cgroup.

    Attributes:
        name: its directory name (``edge-lab-<device>``).
        version: 1 or 2.
        memory_dir: the directory holding its memory files.
        cpu_dir: the directory holding its CPU files (the same as ``memory_dir`` in v2).
    """

    name: str
    version: int
    memory_dir: Path
    cpu_dir: Path

    @property
    def dirs(self) -> list[Path]:
        return list(dict.fromkeys([self.memory_dir, self.cpu_dir]))

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version,
                "memory_dir": str(self.memory_dir), "cpu_dir": str(self.cpu_dir)}

    @staticmethod
    def from_dict(d: dict) -> "Cgroup":
        return Cgroup(d["name"], int(d["version"]), Path(d["memory_dir"]), Path(d["cpu_dir"]))

    # -------------------------------------------------------------- limits

    def limit_memory(self, memory_bytes: int) -> None:
        """Cap memory, swap included: past it the kernel's OOM killer kills a process here.

        Args:
            memory_bytes: the cap.
        """
        m = self.memory_dir
        if self.version == 1:
            _write(m / "memory.limit_in_bytes", str(memory_bytes))
            # Swap must not stretch the cap (memsw exists only with swap accounting).
            if (m / "memory.memsw.limit_in_bytes").exists():
                _write(m / "memory.memsw.limit_in_bytes", str(memory_bytes))
        else:
            _write(m / "memory.max", str(memory_bytes))
            if (m / "memory.swap.max").exists():
                _write(m / "memory.swap.max", "0")

    def limit_cpu(self, cpu: CpuQuota) -> None:
        """Cap CPU time at ``cpu.quota_us`` per ``cpu.period_us``."""
        if self.version == 1:
            _write(self.cpu_dir / "cpu.cfs_period_us", str(cpu.period_us))
            _write(self.cpu_dir / "cpu.cfs_quota_us", str(cpu.quota_us))
        else:
            _write(self.cpu_dir / "cpu.max", f"{cpu.quota_us} {cpu.period_us}")

    def enter_command(self, cmd: list[str]) -> list[str]:
        """``cmd`` wrapped so that it joins this cgroup before it starts.

        The wrapper writes its own pid into the cgroup, then execs ``cmd``: the pid stays,
        so the command is capped from its first instruction (no window, and no
        ``preexec_fn`` in a process that may have threads).
        """
        files = " ".join(shlex.quote(str(d / "cgroup.procs")) for d in self.dirs)
        script = f'for f in {files}; do echo $$ > "$f" || exit 125; done; exec "$@"'
        return ["sh", "-c", script, "edge-lab-enter", *cmd]

    # -------------------------------------------------------------- reading

    def procs(self) -> list[int]:
        """Pids in the cgroup (exited processes are not listed, zombies included)."""
        return sorted({pid for d in self.dirs for pid in dir_procs(d)})

    def oom_kills(self) -> int | None:
        """How many processes the kernel's OOM killer killed in this cgroup (None: unknown)."""
        if self.version == 1:
            return _keyed(_read(self.memory_dir / "memory.oom_control"), "oom_kill")
        return _keyed(_read(self.memory_dir / "memory.events"), "oom_kill")

    def limit_hits(self) -> int | None:
        """How often usage reached the cap (v1 ``memory.failcnt``, v2 ``max`` events)."""
        if self.version == 1:
            text = _read(self.memory_dir / "memory.failcnt")
            return int(text) if text and text.strip().isdigit() else None
        return _keyed(_read(self.memory_dir / "memory.events"), "max")

    def memory_bytes(self) -> tuple[int | None, int | None]:
        """(current, peak) memory charged to the cgroup, page cache included."""
        names = (("memory.usage_in_bytes", "memory.max_usage_in_bytes") if self.version == 1
                 else ("memory.current", "memory.peak"))
        out = []
        for n in names:
            text = _read(self.memory_dir / n)
            out.append(int(text) if text and text.strip().isdigit() else None)
        return out[0], out[1]

    def exists(self) -> bool:
        return any(d.is_dir() for d in self.dirs)


@dataclass(frozen=True)
class Hierarchy:
    """Where this host's cgroups are and where the lab's go.

    Attributes:
        version: 1 or 2: the one with both the memory and the cpu controller.
        memory_base: the directory lab cgroups are created in, for memory.
        cpu_base: the same for cpu (equal to ``memory_base`` in v2).
        mounts: every cgroup mount of the host, which ``scan`` searches.
    """

    version: int
    memory_base: Path
    cpu_base: Path
    mounts: tuple[Path, ...]

    def create(self, name: str) -> Cgroup:
        """Create the (empty, unlimited) cgroup ``name``.

        Raises:
            LabError: it exists already, or the kernel refused.
        """
        group = Cgroup(name, self.version, self.memory_base / name, self.cpu_base / name)
        if self.version == 2:
            _enable_v2_controllers(self.memory_base)
        for d in group.dirs:
            try:
                d.mkdir()
            except FileExistsError:
                raise LabError(f"cgroup {d} exists already: a lab is up, or a killed one "
                               "left it; run `edge lab down`") from None
            except OSError as e:
                raise LabError(f"cannot create cgroup {d}: {e.strerror or e}") from None
        return group

    def scan(self, prefix: str = PREFIX) -> list[Path]:
        """Every cgroup directory, in any hierarchy, whose name starts with ``prefix``.

        Deepest first, so they can be removed in order.
        """
        found: list[Path] = []
        for mount in self.mounts:
            for root, dirs, _files in os.walk(mount):
                for d in list(dirs):
                    if d.startswith(prefix):
                        found.append(Path(root) / d)
        return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def _enable_v2_controllers(parent: Path) -> None:
    control = parent / "cgroup.subtree_control"
    enabled = (_read(control) or "").split()
    missing = [c for c in ("memory", "cpu") if c not in enabled]
    if missing:
        _write(control, " ".join(f"+{c}" for c in missing))


def _mounts(mountinfo: str) -> list[tuple[str, str, str, set[str]]]:
    """(fstype, mount root, mount point, options) of the cgroup mounts."""
    out = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, rfields = left.split(), right.split()
        if rfields and rfields[0] in ("cgroup", "cgroup2"):
            opts = set(rfields[2].split(",")) if len(rfields) > 2 else set()
            out.append((rfields[0], fields[3], fields[4].replace("\\040", " "), opts))
    return out


def _own_paths(self_cgroup: str) -> dict[str, str]:
    """Controller (or '' for v2) -> this process's cgroup path."""
    out: dict[str, str] = {}
    for line in self_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for ctrl in parts[1].split(","):
                out[ctrl] = parts[2]
    return out


def _under(mount_point: str, mount_root: str, own: str) -> Path:
    # A container may mount a sub-tree: /proc/self/cgroup shows the full path, the mount
    # starts at mount_root.
    rel = own[len(mount_root):] if mount_root != "/" and own.startswith(mount_root) else own
    return Path(mount_point) / rel.lstrip("/")


def detect(mountinfo: str | None = None, self_cgroup: str | None = None) -> Hierarchy:
    """Find the cgroup hierarchy that has both the memory and the cpu controller.

    cgroup v1 is preferred when it has both (it works where v2 is mounted without
    controllers, as on hybrid hosts); else cgroup v2.

    Args:
        mountinfo: contents of /proc/self/mountinfo (default: read it).
        self_cgroup: contents of /proc/self/cgroup (default: read it).

    Raises:
        LabError: neither version has both controllers; the message says what was found.
    """
    mountinfo = mountinfo if mountinfo is not None else Path("/proc/self/mountinfo").read_text()
    self_cgroup = self_cgroup if self_cgroup is not None else Path("/proc/self/cgroup").read_text()
    mounts = _mounts(mountinfo)
    own = _own_paths(self_cgroup)
    all_points = tuple(dict.fromkeys(Path(m[2]) for m in mounts))
    v1 = {ctrl: m for m in mounts if m[0] == "cgroup" for ctrl in ("memory", "cpu")
          if ctrl in m[3]}
    if "memory" in v1 and "cpu" in v1:
        mem, cpu = v1["memory"], v1["cpu"]
        return Hierarchy(1, _under(mem[2], mem[1], own.get("memory", "/")),
                         _under(cpu[2], cpu[1], own.get("cpu", "/")), all_points)
    found = []
    for fstype, _root, point, _opts in mounts:
        if fstype != "cgroup2":
            continue
        controllers = (_read(Path(point) / "cgroup.controllers") or "").split()
        if "memory" in controllers and "cpu" in controllers:
            return Hierarchy(2, Path(point), Path(point), all_points)
        found.append(f"cgroup v2 at {point} has only {' '.join(controllers) or 'no'} "
                     "controllers")
    v1_has = sorted(v1) or ["neither"]
    raise LabError("the lab caps memory and CPU with cgroups, but no hierarchy has both "
                   "the memory and the cpu controller: cgroup v1 has "
                   f"{' and '.join(v1_has)}" + (f"; {'; '.join(found)}" if found else ""))


def lift_cpu_limit(path: Path) -> None:
    """Remove the CPU quota of the cgroup directory ``path``, if it has one, so that what
    runs there can shut down at full speed."""
    for name, value in (("cpu.cfs_quota_us", "-1"), ("cpu.max", "max")):
        if (path / name).exists():
            try:
                (path / name).write_text(value)
            except OSError:
                pass


def dir_procs(path: Path) -> list[int]:
    """Pids in the cgroup directory ``path`` (empty if it is gone)."""
    return [int(p) for p in (_read(path / "cgroup.procs") or "").split()]


def remove_dir(path: Path, timeout: float = 5.0) -> list[int]:
    """Kill what runs in a cgroup directory, then remove it.

    Args:
        path: the cgroup's directory.
        timeout: seconds to wait for killed processes to leave.

    Returns:
        The pids that were killed.

    Raises:
        LabError: the directory could not be removed in time.
    """
    killed: set[int] = set()
    end = time.monotonic() + timeout
    while True:
        pids = dir_procs(path)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        try:
            path.rmdir()
            return sorted(killed)
        except FileNotFoundError:
            return sorted(killed)
        except OSError as e:
            if time.monotonic() > end:
                raise LabError(f"cannot remove cgroup {path}: {e.strerror or e} "
                               f"(still running: {pids or 'nothing listed'})") from None
        time.sleep(0.05)
