"""Device profiles (``devices/*.yaml``) and cluster files (``cluster.yaml``).

A profile describes a device class (a Raspberry Pi 4B with 2 GB); a cluster file lists the
actual boards, in pipeline order, each naming a profile and optionally overriding its
numbers. Both are user-written files, so every malformed value raises ``ConfigError``
naming the file and the field, what was expected and what came.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from edge.errors import ConfigError
from edge.planning.plan import Device
from edge.planning.schema import FieldError, Schema, Table
from edge.address import AddressError, parse_address

__all__ = [
    "DeviceProfile",
    "Cluster",
    "profiles_dir",
    "user_profiles_dir",
    "profile_dirs",
    "list_profiles",
    "load_profile",
    "load_cluster",
    "cluster_from_dict",
    "cluster_from_profile",
    "update_profile",
]

_ENV_DIR = "EDGE_DEVICES_DIR"


@dataclass(frozen=True)
class DeviceProfile:
    """One device class.

    Attributes:
        name: profile name, e.g. ``rpi4b-2gb`` (the yaml file's stem).
        description: one line for people.
        memory_mb: total RAM (MiB).
        memory_budget_mb: RAM (MiB) a worker may use after the OS and headroom, runtime
            floor included.
        runtime_floor_mb: resident memory (MiB) of an idle worker process.
        gflops: effective fp32 GFLOP/s that onnxruntime reaches on the CPU.
        bandwidth_mbps: effective link bandwidth, Mbit/s.
        link: ``gige`` or ``wifi``.
        cores: CPU cores.
        arch: ``aarch64`` or ``x86_64``.
    """

    name: str
    description: str
    memory_mb: float
    memory_budget_mb: float
    runtime_floor_mb: float
    gflops: float
    bandwidth_mbps: float
    link: str
    cores: int
    arch: str


@dataclass(frozen=True)
class Cluster:
    """The devices a plan may use.

    Attributes:
        devices: the pipeline's devices, in order (stage 0 on ``devices[0]``).
        standby: spare devices for failover (``Device.standby`` is True).
    """

    devices: tuple[Device, ...]
    standby: tuple[Device, ...] = ()

    def all_devices(self) -> tuple[Device, ...]:
        """Pipeline devices, then standby devices."""
        return self.devices + self.standby


# --- finding profiles -------------------------------------------------------------------


def profiles_dir() -> Path:
    """The folder of device profiles.

    ``$EDGE_DEVICES_DIR`` if set; else ``devices/`` next to the ``edge`` package (source
    and editable installs); else ``<sys.prefix>/share/edge/devices`` (wheel installs).

    Raises:
        ConfigError: ``$EDGE_DEVICES_DIR`` is set but is not a folder.
    """
    env = os.environ.get(_ENV_DIR)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise ConfigError(f"${_ENV_DIR}: expected a folder of device profiles, "
                              f"got {str(path)!r}, which is not a folder")
        return path
    source = Path(__file__).resolve().parents[2] / "devices"
    if source.is_dir():
        return source
    return Path(sys.prefix) / "share" / "edge" / "devices"


def user_profiles_dir() -> Path:
    """Where ``edge calibrate --write`` puts measured profiles: ``~/.config/edge/devices``,
    next to the certificates (``~/.config/edge/certs``). Not the installed package, whose
    files an upgrade replaces."""
    return Path.home() / ".config" / "edge" / "devices"


def profile_dirs() -> list[Path]:
    """The folders profiles are looked up in, first match wins.

    ``$EDGE_DEVICES_DIR`` alone if set; else ``user_profiles_dir()`` (measured profiles
    override the shipped ones of the same name), then ``profiles_dir()``.

    Raises:
        ConfigError: ``$EDGE_DEVICES_DIR`` is set but is not a folder.
    """
    if os.environ.get(_ENV_DIR):
        return [profiles_dir()]
    return [user_profiles_dir(), profiles_dir()]


def list_profiles() -> list[str]:
    """Names of the profiles in ``profile_dirs()``, sorted."""
    return sorted({p.stem for d in profile_dirs() if d.is_dir() for p in d.glob("*.yaml")})


# --- field checking ---------------------------------------------------------------------


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context, since = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context and since:
            context += f" (from line {since.line + 1}, column {since.column + 1})"
        what = " ".join(x for x in (context, getattr(e, "problem", None)) if x) or str(e)
        raise ConfigError(f"{path}: not valid YAML{at}: {what}") from None


# Values are shown as Python writes them ('lots', True): close to how YAML writes them.
_SCHEMA = Schema(kinds={"link": ("one of gige, wifi", lambda v: v in _LINKS)})


def _address(v: Any, where: str) -> None:
    """A kind: ``host:port`` of a worker."""
    _SCHEMA.fields(v, "str", where)
    try:
        parse_address(v)
    except AddressError as e:
        raise FieldError(where, str(e)) from None


_address.what = "host:port of its worker"  # type: ignore[attr-defined]


# --- profiles ---------------------------------------------------------------------------

_PROFILE_NUMBERS = ("memory_mb", "memory_budget_mb", "runtime_floor_mb", "gflops",
                    "bandwidth_mbps")
_LINKS = ("gige", "wifi")
_PROFILE = Table({"name": ("str", False), "description": ("any", False),
                  **{k: ("positive", True) for k in _PROFILE_NUMBERS},
                  "link": ("link", True), "cores": ("count", True), "arch": ("str", True)},
                 what="a device profile")


def _is_path(s: str) -> bool:
    """A yaml file's path rather than a profile's name."""
    return s.endswith((".yaml", ".yml")) or os.sep in s or "/" in s


def _profile_path(name_or_path: str | os.PathLike[str]) -> Path:
    s = os.fspath(name_or_path)
    if _is_path(s):
        return Path(s)
    dirs = profile_dirs()
    for d in dirs:
        path = d / f"{s}.yaml"
        if path.is_file():
            return path
    known = ", ".join(list_profiles()) or "(none)"
    raise ConfigError(f"unknown profile {s!r} (looked in {', '.join(map(str, dirs))}); "
                      f"known: {known}")


def load_profile(name_or_path: str | os.PathLike[str]) -> DeviceProfile:
    """Load a device profile.

    Args:
        name_or_path: a profile name (``rpi4b-2gb``, looked up in ``profile_dirs()``) or the
            path of a yaml file.

    Raises:
        ConfigError: unknown profile, unreadable file, or a missing or malformed field.
    """
    path = _profile_path(name_or_path)
    f = path.name
    d = _read_yaml(path)
    _SCHEMA.check(d, _PROFILE, f)
    name = d.get("name", path.stem)
    if name != path.stem:
        # Devices record the profile by name; the name must find this file again.
        raise ConfigError(f"{f}: name: expected {path.stem!r} (the file's name), got {name!r}")
    nums = {k: float(d[k]) for k in _PROFILE_NUMBERS}
    if nums["memory_budget_mb"] > nums["memory_mb"]:
        raise ConfigError(f"{f}: memory_budget_mb: expected at most memory_mb "
                          f"({nums['memory_mb']:g}), got {nums['memory_budget_mb']:g}")
    if nums["runtime_floor_mb"] >= nums["memory_budget_mb"]:
        raise ConfigError(f"{f}: runtime_floor_mb: expected less than memory_budget_mb "
                          f"({nums['memory_budget_mb']:g}), got {nums['runtime_floor_mb']:g}")
    return DeviceProfile(
        name=name,
        description=str(d.get("description", "")),
        link=d["link"],
        cores=d["cores"],
        arch=d["arch"],
        **nums,
    )


# --- clusters ---------------------------------------------------------------------------

_DEVICE = Table({"name": ("str", True), "address": (_address, True), "profile": ("str", True),
                 "memory_mb": ("count", False), "gflops": ("positive", False),
                 "bandwidth_mbps": ("positive", False)}, what="a device")


def _devices(required: bool) -> Any:
    """A kind: a list of devices; ``standby:`` left empty is no standby devices."""
    def check(v: Any, where: str) -> None:
        if v is None and not required:
            return
        _SCHEMA.fields(v, ("list", _DEVICE), where)
        if required and not v:
            raise FieldError(where, "expected at least one device, got an empty list")
    check.what = "a list of devices"  # type: ignore[attr-defined]
    return check


_CLUSTER = Table({"devices": (_devices(True), True), "standby": (_devices(False), False)},
                 what="a cluster with a 'devices' list")


def _check_address(v: Any, where: str) -> str:
    try:
        _address(v, "")
    except FieldError as e:
        raise ConfigError(f"{where}: {e}") from None
    return v


def _device(e: Mapping[str, Any], where: str, f: str, standby: bool,
            profiles: dict[str, DeviceProfile]) -> Device:
    """A device entry that the schema has checked, with its profile's numbers."""
    pname = e["profile"]
    if pname not in profiles:
        try:
            profiles[pname] = load_profile(pname)
        except ConfigError as err:
            if pname in list_profiles() or "/" in pname or pname.endswith((".yaml", ".yml")):
                raise ConfigError(f"{f}: {where}.profile: {err}") from None
            raise ConfigError(f"{f}: {where}.profile: unknown profile {pname!r}; known: "
                              f"{', '.join(list_profiles()) or '(none)'}") from None
    prof = profiles[pname]
    memory = float(e.get("memory_mb", prof.memory_budget_mb))
    if memory <= prof.runtime_floor_mb:
        raise ConfigError(f"{f}: {where}.memory_mb: expected more than the runtime floor "
                          f"of {prof.name} ({prof.runtime_floor_mb:g} MiB), got {memory:g}")
    return Device(
        name=e["name"],
        address=e["address"],
        profile=prof.name,
        memory_mb=memory,
        gflops=float(e.get("gflops", prof.gflops)),
        bandwidth_mbps=float(e.get("bandwidth_mbps", prof.bandwidth_mbps)),
        runtime_floor_mb=prof.runtime_floor_mb,
        standby=standby,
    )


def cluster_from_dict(d: Any, source: str = "cluster.yaml") -> Cluster:
    """Build a cluster from the parsed contents of a cluster file.

    Args:
        d: the mapping (``devices``, optional ``standby``).
        source: the file name to use in error messages.

    Raises:
        ConfigError: a missing or malformed field.
    """
    _SCHEMA.check(d, _CLUSTER, source)
    profiles: dict[str, DeviceProfile] = {}
    groups: dict[str, list[Device]] = {}
    for key, standby in (("devices", False), ("standby", True)):
        groups[key] = [_device(e, f"{key}[{i}]", source, standby, profiles)
                       for i, e in enumerate(d.get(key) or [])]
    seen: dict[str, str] = {}
    seen_addr: dict[str, str] = {}
    for key, devs in groups.items():
        for i, dev in enumerate(devs):
            where = f"{source}: {key}[{i}]"
            if dev.name in seen:
                raise ConfigError(f"{where}.name: expected a unique name, got {dev.name!r} "
                                  f"again (also {seen[dev.name]})")
            if dev.address in seen_addr:
                raise ConfigError(f"{where}.address: expected a unique address, got "
                                  f"{dev.address!r} again (also {seen_addr[dev.address]})")
            seen[dev.name] = seen_addr[dev.address] = f"{key}[{i}]"
    return Cluster(devices=tuple(groups["devices"]), standby=tuple(groups["standby"]))


def load_cluster(path: str | os.PathLike[str]) -> Cluster:
    """Load a cluster file.

    Args:
        path: a yaml file with ``devices`` (pipeline order) and optional ``standby`` lists;
            each device has ``name``, ``address`` (host:port), ``profile``, and optional
            ``memory_mb`` (else the profile's ``memory_budget_mb``), ``gflops`` and
            ``bandwidth_mbps`` overrides.

    Raises:
        ConfigError: the file is missing, not YAML, or has a missing or malformed field;
            the message names the file and the field.
    """
    path = Path(path)
    return cluster_from_dict(_read_yaml(path), source=path.name)


def cluster_from_profile(profile: str, count: int,
                         addresses: list[str] | None = None) -> Cluster:
    """A cluster of ``count`` devices of one profile, named ``<profile>-1`` ... .

    Args:
        profile: profile name or path.
        count: number of devices (>= 1).
        addresses: their ``host:port`` addresses; default ``127.0.0.1:50051``, ``:50052``...
            (all workers on one machine).

    Raises:
        ConfigError: unknown profile, count < 1, or a wrong number of addresses.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"cluster_from_profile: count: expected an integer >= 1, "
                          f"got {count!r}")
    if addresses is None:
        addresses = [f"127.0.0.1:{50051 + i}" for i in range(count)]
    if len(addresses) != count:
        raise ConfigError(f"cluster_from_profile: addresses: expected {count}, "
                          f"got {len(addresses)}")
    prof = load_profile(profile)
    devices = tuple(
        Device(name=f"{prof.name}-{i + 1}",
               address=_check_address(addr, f"cluster_from_profile: addresses[{i}]"),
               profile=prof.name, memory_mb=prof.memory_budget_mb, gflops=prof.gflops,
               bandwidth_mbps=prof.bandwidth_mbps, runtime_floor_mb=prof.runtime_floor_mb)
        for i, addr in enumerate(addresses))
    return Cluster(devices=devices)


def update_profile(name_or_path: str | os.PathLike[str], values: Mapping[str, float],
                   note: str) -> Path:
    """Write measured numbers into a device profile, keeping its other lines and comments.

    Each ``key: value  # comment`` line named in ``values`` becomes
    ``key: <measured>  # <note>``; keys the file lacks are appended.

    A path is updated in place. A name is written to ``user_profiles_dir()`` (or
    ``$EDGE_DEVICES_DIR`` when set), starting from the profile it resolves to now: never
    into the installed package, where an upgrade would lose it.

    Args:
        name_or_path: profile name or yaml path.
        values: e.g. ``{"gflops": 9.7, "runtime_floor_mb": 58}``.
        note: where the numbers come from (goes into the comment).

    Returns:
        The file written.

    Raises:
        ConfigError: unknown key, or the result is not a valid profile.
    """
    source = _profile_path(name_or_path)
    path = source if _is_path(os.fspath(name_or_path)) else profile_dirs()[0] / source.name
    known = {f.name for f in dataclasses.fields(DeviceProfile)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{path.name}: cannot set unknown field(s) {', '.join(unknown)}")
    lines = source.read_text().splitlines()
    pending = dict(values)
    for i, line in enumerate(lines):
        key = line.split(":", 1)[0].strip()
        if key in pending and not line.startswith((" ", "#")):
            lines[i] = f"{key}: {_fmt(pending.pop(key))}  # {note}"
    lines += [f"{k}: {_fmt(v)}  # {note}" for k, v in pending.items()]
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as d:
        tmp = Path(d) / path.name  # same name: a profile's name must match its file
        tmp.write_text(text)
        load_profile(tmp)  # never write a profile that does not load
        os.replace(tmp, path)
    return path


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.3g}"
