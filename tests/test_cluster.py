"""Device profiles and cluster files: loading, overrides, and every malformed case."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from edge.errors import ConfigError
from edge.planning.cluster import (
    Cluster,
    DeviceProfile,
    cluster_from_profile,
    list_profiles,
    load_cluster,
    load_profile,
    profiles_dir,
)
from edge.planning.plan import Device

EXPECTED = {"rpi4b-1gb", "rpi4b-2gb", "rpi4b-4gb", "rpi4b-8gb", "rpi5-4gb", "rpi5-8gb",
            "rpi-zero-2w", "jetson-nano", "host"}


def test_all_profiles_load_with_positive_numbers():
    names = set(list_profiles())
    assert EXPECTED <= names
    for name in names:
        p = load_profile(name)
        assert isinstance(p, DeviceProfile) and p.name == name
        for f in ("memory_mb", "memory_budget_mb", "runtime_floor_mb", "gflops",
                  "bandwidth_mbps", "cores"):
            assert getattr(p, f) > 0, (name, f)
        assert p.runtime_floor_mb < p.memory_budget_mb <= p.memory_mb
        assert p.link in ("gige", "wifi")
        assert p.arch in ("aarch64", "x86_64")


def test_profiles_have_a_source_comment_on_every_number():
    for path in profiles_dir().glob("*.yaml"):
        for line in path.read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in ("memory_mb", "memory_budget_mb", "runtime_floor_mb", "gflops",
                       "bandwidth_mbps", "cores"):
                assert "#" in line, f"{path.name}: {key} has no comment"


def test_known_relations():
    zero, pi4, pi5 = (load_profile(n) for n in ("rpi-zero-2w", "rpi4b-2gb", "rpi5-8gb"))
    assert zero.link == "wifi" and zero.bandwidth_mbps < pi4.bandwidth_mbps
    assert zero.gflops < pi4.gflops < pi5.gflops
    assert zero.memory_budget_mb < 512


def test_profile_by_path_and_env(tmp_path, monkeypatch):
    src = profiles_dir() / "rpi4b-2gb.yaml"
    assert load_profile(src) == load_profile("rpi4b-2gb")
    (tmp_path / "mine.yaml").write_text(src.read_text().replace("name: rpi4b-2gb", "name: mine"))
    monkeypatch.setenv("EDGE_DEVICES_DIR", str(tmp_path))
    assert profiles_dir() == tmp_path
    assert list_profiles() == ["mine"]
    assert load_profile("mine").gflops == load_profile(src).gflops


def test_env_dir_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGE_DEVICES_DIR", str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="EDGE_DEVICES_DIR"):
        profiles_dir()


def _write(tmp_path: Path, text: str, name: str = "cluster.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


GOOD = """\
devices:
  - name: pi-1
    address: 10.0.0.11:50051
    profile: rpi4b-2gb
    memory_mb: 300
  - name: pi-2
    address: pi-2.local:50051
    profile: rpi5-8gb
    gflops: 25.5
    bandwidth_mbps: 500
standby:
  - name: pi-5
    address: 10.0.0.15:50051
    profile: rpi4b-2gb
"""


def test_load_cluster(tmp_path):
    c = load_cluster(_write(tmp_path, GOOD))
    assert isinstance(c, Cluster)
    assert [d.name for d in c.devices] == ["pi-1", "pi-2"]
    pi1, pi2 = c.devices
    p2, p5 = load_profile("rpi4b-2gb"), load_profile("rpi5-8gb")
    assert pi1 == Device(name="pi-1", address="10.0.0.11:50051", profile="rpi4b-2gb",
                         memory_mb=300, gflops=p2.gflops, bandwidth_mbps=p2.bandwidth_mbps,
                         runtime_floor_mb=p2.runtime_floor_mb, standby=False)
    assert pi2.memory_mb == p5.memory_budget_mb
    assert (pi2.gflops, pi2.bandwidth_mbps) == (25.5, 500)
    assert [d.name for d in c.standby] == ["pi-5"] and c.standby[0].standby
    assert not any(d.standby for d in c.devices)
    # Devices round-trip through the plan's dict form.
    assert Device.from_dict(vars(pi1)) == pi1


def test_cluster_without_standby(tmp_path):
    c = load_cluster(_write(tmp_path, "devices:\n  - {name: a, address: 'h:1', profile: host}\n"))
    assert len(c.devices) == 1 and c.standby == ()


def test_cluster_from_profile():
    c = cluster_from_profile("rpi4b-2gb", 3)
    assert [d.name for d in c.devices] == ["rpi4b-2gb-1", "rpi4b-2gb-2", "rpi4b-2gb-3"]
    assert len({d.address for d in c.devices}) == 3
    assert all(d.memory_mb == load_profile("rpi4b-2gb").memory_budget_mb for d in c.devices)
    c = cluster_from_profile("rpi5-4gb", 2, ["10.0.0.1:1", "10.0.0.2:1"])
    assert c.devices[1].address == "10.0.0.2:1"
    with pytest.raises(ConfigError, match="count"):
        cluster_from_profile("rpi5-4gb", 0)
    with pytest.raises(ConfigError, match="addresses: expected 2, got 1"):
        cluster_from_profile("rpi5-4gb", 2, ["h:1"])
    with pytest.raises(ConfigError, match="addresses\\[0\\]"):
        cluster_from_profile("rpi5-4gb", 1, ["nohost"])
    with pytest.raises(ConfigError, match="unknown profile 'rpi9'"):
        cluster_from_profile("rpi9", 1)


DEV = "  - {name: pi-1, address: '10.0.0.1:50051', profile: rpi4b-2gb}\n"

# (cluster.yaml text, fragments the message must contain besides the file name)
BAD_CLUSTERS = {
    "empty file": ("", ["expected a cluster", "got null"]),
    "not a mapping": ("- a\n- b\n", ["expected a cluster", "got list"]),
    "no devices": ("standby: []\n", ["devices: missing"]),
    "empty device list": ("devices: []\n", ["devices: expected at least one device"]),
    "devices not a list": ("devices: {a: 1}\n", ["devices: expected a list", "got dict"]),
    "device not a mapping": ("devices:\n  - pi-1\n", ["devices[0]: expected a device",
                                                      "got str"]),
    "missing address": ("devices:\n" + DEV + "  - {name: pi-2, profile: rpi4b-2gb}\n",
                        ["devices[1].address: missing", "host:port"]),
    "missing name": ("devices:\n  - {address: 'h:1', profile: host}\n",
                     ["devices[0].name: missing"]),
    "missing profile": ("devices:\n  - {name: a, address: 'h:1'}\n",
                        ["devices[0].profile: missing"]),
    "unknown profile": ("devices:\n" + DEV + DEV.replace("pi-1", "pi-2").replace(
        "10.0.0.1", "10.0.0.2") + "  - {name: pi-3, address: 'h:1', profile: rpi9}\n",
        ["devices[2].profile: unknown profile 'rpi9'", "known: ", "rpi4b-1gb"]),
    "address without port": ("devices:\n  - {name: a, address: 10.0.0.1, profile: host}\n",
                             ["devices[0].address: expected host:port", "'10.0.0.1'"]),
    "address bad port": ("devices:\n  - {name: a, address: 'h:99999', profile: host}\n",
                         ["devices[0].address", "'h:99999'"]),
    "non-integer memory": ("devices:\n  - {name: a, address: 'h:1', profile: host, "
                           "memory_mb: lots}\n",
                           ["devices[0].memory_mb: expected an integer", "str 'lots'"]),
    "float memory": ("devices:\n  - {name: a, address: 'h:1', profile: host, memory_mb: 1.5}\n",
                     ["devices[0].memory_mb: expected an integer", "1.5"]),
    "bool memory": ("devices:\n  - {name: a, address: 'h:1', profile: host, memory_mb: yes}\n",
                    ["devices[0].memory_mb: expected an integer", "bool True"]),
    "negative gflops": ("devices:\n  - {name: a, address: 'h:1', profile: host, gflops: -3}\n",
                        ["devices[0].gflops: expected a number > 0", "-3"]),
    "memory below floor": ("devices:\n  - {name: a, address: 'h:1', profile: host, "
                           "memory_mb: 40}\n",
                           ["devices[0].memory_mb: expected more than the runtime floor"]),
    "unknown field": ("devices:\n  - {name: a, address: 'h:1', profile: host, memroy_mb: 3}\n",
                      ["devices[0]: unknown field(s) memroy_mb"]),
    "unknown top-level field": ("device:\n" + DEV, ["unknown field(s) device"]),
    "duplicate names": ("devices:\n" + DEV + DEV.replace("10.0.0.1", "10.0.0.2"),
                        ["devices[1].name: expected a unique name", "'pi-1'"]),
    "duplicate name in standby": ("devices:\n" + DEV + "standby:\n"
                                  + DEV.replace("10.0.0.1", "10.0.0.2"),
                                  ["standby[0].name: expected a unique name"]),
    "duplicate address": ("devices:\n" + DEV + DEV.replace("pi-1", "pi-2"),
                          ["devices[1].address: expected a unique address"]),
    "standby not a list": ("devices:\n" + DEV + "standby: pi-5\n",
                           ["standby: expected a list"]),
    "invalid yaml": ("devices: [\n", ["not valid YAML"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CLUSTERS))
def test_malformed_cluster(tmp_path, case):
    text, fragments = BAD_CLUSTERS[case]
    path = _write(tmp_path, text, name="my-cluster.yaml")
    with pytest.raises(ConfigError) as e:
        load_cluster(path)
    msg = str(e.value)
    assert "my-cluster.yaml" in msg
    for frag in fragments:
        assert frag in msg, (case, msg)


def test_missing_cluster_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: file not found"):
        load_cluster(tmp_path / "nope.yaml")


PROFILE = """\
name: bad
description: test
memory_mb: 1024
memory_budget_mb: 600
runtime_floor_mb: 62
gflops: 10
bandwidth_mbps: 940
link: gige
cores: 4
arch: aarch64
"""

BAD_PROFILES = {
    "missing gflops": (("gflops: 10\n", ""), ["gflops: missing"]),
    "non-number gflops": (("gflops: 10", "gflops: fast"), ["gflops: expected a number",
                                                           "'fast'"]),
    "zero bandwidth": (("bandwidth_mbps: 940", "bandwidth_mbps: 0"),
                       ["bandwidth_mbps: expected a number > 0, got 0"]),
    "bad link": (("link: gige", "link: lte"), ["link: expected one of gige, wifi", "'lte'"]),
    "non-integer cores": (("cores: 4", "cores: 2.5"), ["cores: expected an integer"]),
    "budget above total": (("memory_budget_mb: 600", "memory_budget_mb: 2000"),
                           ["memory_budget_mb: expected at most memory_mb"]),
    "floor above budget": (("runtime_floor_mb: 62", "runtime_floor_mb: 700"),
                           ["runtime_floor_mb: expected less than memory_budget_mb"]),
    "name differs from file": (("name: bad", "name: other"),
                               ["name: expected 'bad'", "'other'"]),
    "unknown field": (("arch: aarch64", "arch: aarch64\ngflop: 3"),
                      ["unknown field(s) gflop"]),
}


@pytest.mark.parametrize("case", sorted(BAD_PROFILES))
def test_malformed_profile(tmp_path, case):
    (old, new), fragments = BAD_PROFILES[case]
    assert old in PROFILE
    path = _write(tmp_path, PROFILE.replace(old, new), name="bad.yaml")
    with pytest.raises(ConfigError) as e:
        load_profile(path)
    msg = str(e.value)
    assert "bad.yaml" in msg
    for frag in fragments:
        assert frag in msg, (case, msg)


def test_profile_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="bad.yaml: expected a device profile"):
        load_profile(_write(tmp_path, "[1, 2]\n", name="bad.yaml"))


def test_cluster_names_profile_file_in_error(tmp_path):
    _write(tmp_path, PROFILE.replace("link: gige", "link: lte"), name="bad.yaml")
    c = _write(tmp_path, f"devices:\n  - {{name: a, address: 'h:1', "
                         f"profile: {tmp_path / 'bad.yaml'}}}\n")
    with pytest.raises(ConfigError) as e:
        load_cluster(c)
    assert "cluster.yaml: devices[0].profile" in str(e.value)
    assert "bad.yaml: link" in str(e.value)
