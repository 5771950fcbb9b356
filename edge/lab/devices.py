"""What each emulated device becomes: profile -> name, address, link rate, memory cap, CPU
quota. This module decides (measuring the host once), ``edge.lab.lab`` builds.

A device gets the share of this host that its speed is of this host's: a 3 GFLOP/s Zero
2 W on a 150 GFLOP/s 2-core host gets 2 x 3/150 = 0.04 cores. Its memory cap is the
board's RAM (the profile's ``memory_mb``); the planner and the worker keep planning to the
smaller ``memory_budget_mb``, which leaves room for the OS the lab does not emulate.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
import logging
import math
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from edge.lab import cgroups, netns, shaping
from edge.lab.cgroups import Cgroup
from edge.lab.system import LabError, write_json
from edge.planning import cluster
from edge.profiling.calibrate import measure_gflops

__all__ = ["SUBNET", "HOST_IP", "WORKER_PORT", "MAX_DEVICES", "ROLES", "DeviceSpec",
           "LabDevice",
           "parse_device_specs", "load_profile", "host_cores", "host_gflops", "design"]

log = logging.getLogger(__name__)

SUBNET = ipaddress.ip_network("10.99.0.0/24")   # test-only; never routed beyond the lab
HOST_IP = ipaddress.ip_interface("10.99.0.1/24")
WORKER_PORT = 50051
_FIRST_DEVICE_HOST = 11                            # devices are 10.99.0.11, .12, ...
MAX_DEVICES = 250 - _FIRST_DEVICE_HOST
# What runs on a device: a worker, or nothing the lab starts (the coordinator's board).
ROLES = ("worker", "coordinator")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")


@dataclass(frozen=True)
class DeviceSpec:
    """A device to emulate.

    Attributes:
        profile: a device profile name (``rpi4b-2gb``) or yaml path.
        name: its name (default ``<profile>-<n>``).
        memory_mb: its memory cap (default: the profile's ``memory_mb``, the board's RAM);
            a cap under the profile's worker budget also lowers the budget.
        bandwidth_mbps: its link rate (default: the profile's ``bandwidth_mbps``).
        role: ``worker`` (an ``edge worker`` runs on it, and it is in the cluster file)
            or ``coordinator`` (nothing is started on it: the board the coordinator runs
            on, with the same link, memory cap and CPU quota; see ``edge lab run``).
    """

    profile: str
    name: str | None = None
    memory_mb: float | None = None
    bandwidth_mbps: float | None = None
    role: str = "worker"


def parse_device_specs(items: Iterable[str]) -> list[DeviceSpec]:
    """``["rpi4b-2gb:4", "rpi-zero-2w"]`` -> four rpi4b-2gb specs and one rpi-zero-2w.

    Raises:
        LabError: an item is not ``PROFILE[:COUNT]`` with COUNT >= 1.
    """
    specs: list[DeviceSpec] = []
    for item in items:
        profile, sep, count = item.rpartition(":")
        if not sep:
            profile, count = item, "1"
        if not profile or not count.isdigit() or int(count) < 1:
            raise LabError(f"--device expects PROFILE[:COUNT] with COUNT >= 1, got {item!r}")
        specs += [DeviceSpec(profile)] * int(count)
    return specs


@dataclass(frozen=True)
class LabDevice:
    """One emulated device as set up (also its record in the state file).

    Attributes:
        name: the device's name, also in the cluster file.
        profile: its profile's name.
        namespace: its network namespace.
        ip: its address on the lab subnet.
        address: ``ip:port`` of its worker.
        bridge_port: its veth's end in the bridge namespace (shaped: its downlink).
        bandwidth_mbps: the tbf rate of its link, both directions.
        burst_bytes: the tbf bucket.
        memory_cap_mb: its cgroup's memory cap.
        memory_budget_mb: what the planner and the worker are told it may use.
        runtime_floor_mb: the profile's idle worker RSS.
        gflops: the profile's compute speed.
        cpu_quota_us, cpu_period_us: its cgroup's CPU quota.
        threads: onnxruntime threads its worker runs with.
        cgroup: its cgroup.
        log: its worker's log file.
        cache_dir: its worker's shard cache.
        pid: its worker's pid (None before it starts).
        role: ``worker`` or ``coordinator`` (see :class:`DeviceSpec`).
    """

    name: str
    profile: str
    namespace: str
    ip: str
    address: str
    bridge_port: str
    bandwidth_mbps: float
    burst_bytes: int
    memory_cap_mb: float
    memory_budget_mb: float
    runtime_floor_mb: float
    gflops: float
    cpu_quota_us: int
    cpu_period_us: int
    threads: int
    cgroup: Cgroup
    log: str
    cache_dir: str
    pid: int | None = None
    role: str = "worker"

    @property
    def runs_worker(self) -> bool:
        return self.role == "worker"

    @property
    def shown_address(self) -> str:
        """What people are shown: the worker's ``ip:port``, or a board's ip (no worker
        listens on it)."""
        return self.address if self.runs_worker else self.ip

    @property
    def cpu_cores(self) -> float:
        return self.cpu_quota_us / self.cpu_period_us

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["cgroup"] = self.cgroup.to_dict()
        return d

    @staticmethod
    def from_dict(d: dict) -> "LabDevice":
        return LabDevice(**{**d, "cgroup": Cgroup.from_dict(d["cgroup"])})


# ---------------------------------------------------------------------- host speed


def host_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_gflops(state_dir: Path, seconds: float = 1.0) -> tuple[float, str]:
    """This host's effective fp32 GFLOP/s over all its cores, measured once and cached.

    The same benchmark as ``edge calibrate`` (a BERT-sized MLP block in onnxruntime), so a
    device's share of the host is the ratio of two numbers measured alike. Cached in
    ``state_dir/host.json`` per CPU model and core count.

    Args:
        state_dir: the lab's state folder.
        seconds: how long to measure.

    Returns:
        (GFLOP/s, where the number comes from).
    """
    key = {"cpu": _cpu_model(), "cores": host_cores()}
    cache = state_dir / "host.json"
    try:
        cached = json.loads(cache.read_text())
        if {k: cached.get(k) for k in key} == key and cached.get("gflops", 0) > 0:
            return float(cached["gflops"]), f"measured {cached['measured']}, cached in {cache}"
    except (OSError, ValueError):
        pass

    gflops, _runs = measure_gflops(seconds)
    now = datetime.datetime.now().isoformat(timespec="seconds")
    state_dir.mkdir(parents=True, exist_ok=True)
    write_json(cache, {**key, "gflops": round(gflops, 1), "measured": now})
    return gflops, f"measured now ({seconds:.0f} s)"


# ---------------------------------------------------------------------- design


def load_profile(name: str):
    """A device profile (``edge.planning.cluster.load_profile``), or LabError naming it."""
    try:
        return cluster.load_profile(name)
    except Exception as e:  # ConfigError: name the lab in the message
        raise LabError(f"device profile {name!r}: {e}") from None


def design(specs: list[DeviceSpec], link: str | None, gflops: float,
            hierarchy: cgroups.Hierarchy, state_dir: Path, cache_dir: Path
            ) -> list[LabDevice]:
    """Profiles -> names, addresses, rates, caps and quotas. Creates nothing.

    Args:
        specs: the devices, in pipeline order.
        link: ``gige`` or ``wifi`` for every device, or None for each profile's own rate.
        gflops: this host's GFLOP/s over all its cores.
        hierarchy: where the devices' cgroups will be.
        state_dir: for the workers' logs.
        cache_dir: for the workers' shard caches.

    Raises:
        LabError: an unknown profile, a bad or repeated name, a cap below the worker's floor.
    """
    cores = host_cores()
    counts: dict[str, int] = {}
    devices: list[LabDevice] = []
    for i, spec in enumerate(specs):
        if spec.role not in ROLES:
            raise LabError(f"lab device role: expected one of {', '.join(ROLES)}, got "
                           f"{spec.role!r}")
        prof = load_profile(spec.profile)
        counts[prof.name] = counts.get(prof.name, 0) + 1
        name = spec.name or f"{prof.name}-{counts[prof.name]}"
        if not _NAME_RE.fullmatch(name) or name in ("br", "host"):
            raise LabError(f"lab device name {name!r}: expected 1-40 of a-z, 0-9 and '-', "
                           "and not 'br' or 'host'")
        if any(d.name == name for d in devices):
            raise LabError(f"lab device name {name!r} is used twice")
        rate = spec.bandwidth_mbps or (shaping.LINK_RATES_MBPS[link] if link
                                       else prof.bandwidth_mbps)
        shape = shaping.shape_for(rate)
        cap = float(spec.memory_mb or prof.memory_mb)
        budget = min(prof.memory_budget_mb, cap)
        if budget <= prof.runtime_floor_mb:
            raise LabError(f"lab device {name}: a {cap:g} MiB memory cap leaves nothing "
                           f"above the worker's runtime floor ({prof.runtime_floor_mb:g} MiB)")
        # The device gets the share of this host that its speed is of this host's.
        quota = cgroups.cpu_quota(cores * prof.gflops / gflops, cores)
        if prof.gflops > gflops:
            log.warning("%s is faster (%.0f GFLOP/s) than this host (%.0f): it gets all %d "
                        "cores and will run slower than the real device", name, prof.gflops,
                        gflops, cores)
        ip = SUBNET.network_address + _FIRST_DEVICE_HOST + i
        ns = netns.namespace_for(name)
        devices.append(LabDevice(
            name=name, profile=prof.name, namespace=ns, ip=str(ip),
            address=f"{ip}:{WORKER_PORT}", bridge_port=netns.bridge_port(i),
            bandwidth_mbps=float(rate), burst_bytes=shape.burst_bytes,
            memory_cap_mb=cap, memory_budget_mb=float(budget),
            runtime_floor_mb=prof.runtime_floor_mb, gflops=prof.gflops,
            cpu_quota_us=quota.quota_us, cpu_period_us=quota.period_us,
            # onnxruntime threads beyond the quota's cores would only contend for it.
            threads=max(1, min(cores, math.ceil(quota.cores))),
            cgroup=Cgroup(ns, hierarchy.version, hierarchy.memory_base / ns,
                          hierarchy.cpu_base / ns),
            log=str(state_dir / "logs" / f"{name}.log"),
            cache_dir=str(cache_dir / name), role=spec.role))
    return devices
