"""The device lab: emulated boards on this machine, each a real ``edge worker``.

A lab device is a network namespace with its own address (``netns``), a link shaped to
the profile's bandwidth (``shaping``), and a cgroup capping memory at the profile's RAM and
CPU at the profile's GFLOP/s relative to this host (``cgroups``), with numbers decided by
``devices``. :class:`Lab` builds them, starts the workers, records everything in a state
file, tells why a worker died, and takes it all down (``cleanup``).

The workers listen on lab addresses, not loopback, so they run as real devices do: with
mutual TLS and the cluster token. Each lab has a throwaway CA in ``STATE_DIR/certs`` with a
bundle per device and one for the coordinator side (:meth:`Lab.security`,
``--certs STATE_DIR/certs/coordinator``); ``edge lab down`` deletes them.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
import logging
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from edge.lab import cgroups, netns, shaping
from edge.lab.cgroups import CpuQuota
from edge.lab.devices import (HOST_IP, MAX_DEVICES, SUBNET, DeviceSpec, LabDevice, design,
                              host_cores, host_gflops, load_profile)
from edge.lab.system import (CERTS_DIR, STATE_FILE, LabError, check_tools, default_cache_dir,
                             default_state_dir, require_root, write_json)
from edge.lab.cleanup import TeardownReport, leftovers, teardown
from edge.lab.workers import (DeviceStatus, bundle_dir, device_status, start_worker,
                              wait_listening)
from edge.planning.cluster import cluster_from_dict
from edge.transport.certs import init_ca, issue
from edge.transport.security import Security

__all__ = ["Lab", "DeviceStatus"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- the lab


@dataclass
class _State:
    """The state file: everything ``status`` and ``down`` need."""

    devices: list[LabDevice]
    host_ip: str
    host_link: str
    bridge_namespace: str
    host_gflops: float
    host_gflops_source: str
    host_cores: int
    cgroup_version: int
    created: str
    cluster_file: str | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["devices"] = [dev.to_dict() for dev in self.devices]
        return d

    @staticmethod
    def from_dict(d: dict) -> "_State":
        return _State(**{**d, "devices": [LabDevice.from_dict(x) for x in d["devices"]]})


class Lab:
    """A running lab. Make one with :meth:`up` or :meth:`load`; end it with :meth:`down`.

    Args:
        state: what was set up.
        state_dir: the folder of its state file.
        processes: the workers' processes, when this process started them.
    """

    def __init__(self, state: _State, state_dir: Path,
                 processes: dict[str, subprocess.Popen] | None = None):
        self._state = state
        self.state_dir = Path(state_dir)
        self._processes = processes or {}

    # ------------------------------------------------------------------ setting up

    @classmethod
    def up(cls, specs: list[DeviceSpec], *, link: str | None = None,
           state_dir: Path | None = None, cache_dir: Path | None = None,
           gflops: float | None = None, cluster_file: Path | None = None,
           ready_timeout: float = 60.0) -> "Lab":
        """Set up the devices and start a worker on each; return once all listen.

        Args:
            specs: the devices, in pipeline order.
            link: ``gige`` or ``wifi`` to give every device that link's rate instead of its
                profile's (a spec's own ``bandwidth_mbps`` still wins).
            state_dir: for the state file and worker logs (default ``default_state_dir()``).
            cache_dir: for the workers' shard caches (default ``default_cache_dir()``).
            gflops: this host's GFLOP/s (default: measured once, then cached).
            cluster_file: also write the cluster file here (it always goes to the state
                folder as ``cluster.yaml``).
            ready_timeout: seconds to wait for the workers to listen.

        Raises:
            LabError: not root, a tool or cgroup controller is missing, a lab is up
                already, a profile is unknown, or a worker failed to start (with its log).
                Whatever was set up before the error is taken down again.
        """
        require_root("edge lab up")
        check_tools()
        hierarchy = cgroups.detect()
        state_dir = Path(state_dir or default_state_dir())
        cache_dir = Path(cache_dir or default_cache_dir())
        if not specs:
            raise LabError("no devices to emulate: give at least one --device PROFILE[:COUNT]")
        if len(specs) > MAX_DEVICES:
            raise LabError(f"at most {MAX_DEVICES} devices fit the lab subnet "
                           f"{SUBNET}, got {len(specs)}")
        if link is not None and link not in shaping.LINK_RATES_MBPS:
            raise LabError(f"--link expects one of {', '.join(shaping.LINK_RATES_MBPS)}, "
                           f"got {link!r}")
        found = leftovers(hierarchy)
        if found or (state_dir / STATE_FILE).exists():
            what = ", ".join(found) or f"state file {state_dir / STATE_FILE}"
            raise LabError(f"a lab is up already ({what}); see `edge lab status`, or run "
                           "`edge lab down` to remove it")
        netns.check_subnet_free(SUBNET)
        if gflops is None:
            gflops, source = host_gflops(state_dir)
        else:
            source = "given"
        devices = design(specs, link, gflops, hierarchy, state_dir, cache_dir)

        state = _State(devices=devices, host_ip=str(HOST_IP), host_link=netns.HOST_LINK,
                       bridge_namespace=netns.BRIDGE_NS, host_gflops=round(gflops, 1),
                       host_gflops_source=source, host_cores=host_cores(),
                       cgroup_version=hierarchy.version,
                       created=datetime.datetime.now().isoformat(timespec="seconds"))
        lab = cls(state, state_dir)
        (state_dir / "logs").mkdir(parents=True, exist_ok=True)
        try:
            lab._save()  # first, so that `down` knows what to look for even mid-setup
            _make_certs(state_dir, devices, str(HOST_IP.ip))
            netns.create_bridge(HOST_IP)
            for i, dev in enumerate(devices):
                _build_device(dev, i, hierarchy)
            lab._start_workers(ready_timeout)
            state.cluster_file = str(cluster_file) if cluster_file else None
            lab.write_cluster(state_dir / "cluster.yaml")
            if cluster_file:
                lab.write_cluster(cluster_file)
            lab._save()
        except BaseException:
            log.error("setting up the lab failed; taking down what was set up")
            try:
                lab.down()
            except LabError as e:
                log.error("and taking it down failed too: %s", e)
            raise
        log.info("lab up: %d devices on %s", len(devices), SUBNET)
        return lab

    @classmethod
    def load(cls, state_dir: Path | None = None) -> "Lab":
        """The lab described by the state file.

        Raises:
            LabError: there is no (readable) state file.
        """
        state_dir = Path(state_dir or default_state_dir())
        path = state_dir / STATE_FILE
        try:
            state = _State.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise LabError(f"no lab is up: no state file at {path}") from None
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise LabError(f"{path}: not a lab state file ({e}); `edge lab down` removes "
                           "the lab anyway") from None
        return cls(state, state_dir)

    def _save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.state_dir / STATE_FILE, self._state.to_dict())

    def _start_workers(self, timeout: float) -> None:
        for i, dev in enumerate(self._state.devices):
            if not dev.runs_worker:
                continue
            p = start_worker(dev, self.state_dir)
            self._processes[dev.name] = p
            self._state.devices[i] = dataclasses.replace(dev, pid=p.pid)
            self._save()  # each pid as it comes, for `down` to stop if setup fails
        wait_listening([d for d in self._state.devices if d.runs_worker], self._processes,
                       self.state_dir, timeout)
        # Workers boot at host speed and get their quota now: the quota emulates the
        # device's compute, not its boot (a Zero's share would make `up` take 15 s).
        for dev in self._state.devices:
            dev.cgroup.limit_cpu(CpuQuota(dev.cpu_quota_us, dev.cpu_period_us))

    @property
    def coordinator_bundle(self) -> Path:
        """The certificate bundle for whatever talks to the workers from this host:
        ``edge coordinator --certs``, ``edge calibrate --certs``, :meth:`security`."""
        return self.state_dir / CERTS_DIR / "coordinator"

    def security(self):
        """An ``edge.transport.security.Security`` for this host's side of the lab, e.g.
        ``Pipeline(plan, plan_dir, security=lab.security())``.

        Raises:
            SecurityError: the lab was set up without certificates (an older edge).
        """
        return Security.from_dir(self.coordinator_bundle)

    # ------------------------------------------------------------------ using it

    @property
    def devices(self) -> list[LabDevice]:
        return list(self._state.devices)

    @property
    def host_ip(self) -> str:
        """The host's address on the lab subnet (what workers see the coordinator as)."""
        return str(ipaddress.ip_interface(self._state.host_ip).ip)

    @property
    def host_gflops(self) -> float:
        return self._state.host_gflops

    @property
    def cgroup_version(self) -> int:
        return self._state.cgroup_version

    def device(self, key: str) -> LabDevice:
        """A device by name, address (``ip:port``) or ip.

        Raises:
            LabError: no such device.
        """
        for d in self._state.devices:
            if key in (d.name, d.address, d.ip):
                return d
        raise LabError(f"no lab device {key!r}; the lab has "
                       f"{', '.join(d.name for d in self._state.devices)}")

    def cluster_dict(self) -> dict:
        """The cluster file's contents: every device that runs a worker, in order, with
        its address."""
        entries = []
        for d in self._state.devices:
            if not d.runs_worker:
                continue  # the coordinator's board serves no stage
            prof = load_profile(d.profile)
            e: dict = {"name": d.name, "address": d.address, "profile": d.profile}
            if d.memory_budget_mb != prof.memory_budget_mb:
                e["memory_mb"] = int(d.memory_budget_mb)  # the cluster file wants MiB
            if d.bandwidth_mbps != prof.bandwidth_mbps:
                e["bandwidth_mbps"] = (int(d.bandwidth_mbps) if d.bandwidth_mbps.is_integer()
                                       else d.bandwidth_mbps)
            entries.append(e)
        return {"devices": entries}

    def cluster(self):
        """The lab as an ``edge.planning.cluster.Cluster``, to plan for."""
        return cluster_from_dict(self.cluster_dict(), source="the lab")

    def write_cluster(self, path: Path) -> Path:
        """Write the cluster file for ``edge plan --cluster``.

        Args:
            path: where.
        """
        path = Path(path)
        header = (f"# The device lab's devices, in pipeline order; written by `edge lab up` "
                  f"on {self._state.created}.\n# Plan with: edge plan MODEL.onnx --cluster "
                  f"{path.name} --out build/\n")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + yaml.safe_dump(self.cluster_dict(), sort_keys=False))
        return path

    def command(self, device: str, cmd: list[str], capped: bool = True) -> list[str]:
        """``cmd`` as it runs inside a device: in its namespace and, if ``capped``, under
        its memory cap and CPU quota (its cgroup).

        Args:
            device: name or address.
            cmd: the argv.
            capped: join the device's cgroup (False: its network only).
        """
        dev = self.device(device)
        cmd = ["ip", "netns", "exec", dev.namespace, *cmd]
        return dev.cgroup.enter_command(cmd) if capped else cmd

    def bundle(self, device: str) -> Path:
        """The certificate bundle of a device (its address is in its certificate): what
        a coordinator run on it serves and reaches the workers with (``--certs``)."""
        return bundle_dir(self.state_dir, self.device(device))

    @property
    def coordinator_devices(self) -> list[LabDevice]:
        """The devices without a worker, for a coordinator to run on."""
        return [d for d in self._state.devices if not d.runs_worker]

    # ------------------------------------------------------------------ watching it

    def status(self) -> list[DeviceStatus]:
        """Each device's worker: alive or not, and if not, why."""
        return [self._status(d) for d in self._state.devices]

    def _status(self, dev: LabDevice) -> DeviceStatus:
        return device_status(dev, self._processes.get(dev.name))

    def diagnose(self, device) -> str | None:
        """Why a device's worker stopped answering, as far as the lab can tell.

        For ``Pipeline(diagnose=...)``: called when a stage is lost. The OOM killer's
        verdict is read from the cgroup, which outlives the process; a worker still being
        torn down by the kernel is waited for (up to a second).

        Args:
            device: a ``Device`` of a plan (matched by address), a name or an address.

        Returns:
            One line, or None if the worker is alive and nothing went wrong, or the
            device is not one of the lab's.
        """
        key = getattr(device, "address", device)
        try:
            dev = self.device(key)
        except LabError:
            return None
        s = self._status(dev)
        end = time.monotonic() + 1.0
        while s.alive and s.oom_kills and time.monotonic() < end:
            time.sleep(0.05)
            s = self._status(dev)
        if s.alive and not s.oom_kills:
            return None
        return f"lab device {dev.name}: {s.reason}"

    def set_link(self, device: str, up: bool) -> None:
        """Cut a device's network (``up=False``) or restore it, as when a board's cable is
        pulled: its worker keeps running, its packets are dropped, nobody gets a reset.

        Args:
            device: the device's name or address.
        """
        dev = self.device(device)
        netns.set_link(dev.namespace, up)

    # ------------------------------------------------------------------ taking it down

    def down(self) -> TeardownReport:
        """Stop the workers and remove everything the lab made (see :func:`teardown`)."""
        report = teardown(self.state_dir)
        for p in self._processes.values():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:  # pragma: no cover - killed already
                p.kill()
        return report

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        self.down()


def _make_certs(state_dir: Path, devices: list[LabDevice], host_ip: str) -> None:
    """A fresh CA for this lab, a bundle per device and one for the host's side."""
    ca = state_dir / CERTS_DIR
    init_ca(ca, force=True)
    for dev in devices:
        issue(ca, dev.name, hosts=[dev.ip], out=bundle_dir(state_dir, dev), force=True)
    issue(ca, "coordinator", hosts=[host_ip], out=ca / "coordinator", force=True)


def _build_device(dev: LabDevice, index: int, hierarchy: cgroups.Hierarchy) -> None:
    netns.add_device(dev.namespace, index, ipaddress.ip_interface(f"{dev.ip}/{SUBNET.prefixlen}"))
    shape = shaping.Shape(dev.bandwidth_mbps, dev.burst_bytes)
    shaping.apply(dev.namespace, netns.DEVICE_LINK, shape)        # uplink
    shaping.apply(netns.BRIDGE_NS, dev.bridge_port, shape)        # downlink
    # Memory is capped from the start; the CPU quota comes once the worker listens.
    hierarchy.create(dev.cgroup.name).limit_memory(int(dev.memory_cap_mb * 2**20))
