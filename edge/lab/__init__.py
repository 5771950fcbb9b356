"""The emulated device lab: Pi-class boards on one Linux machine, for tests and benchmarks.

Each device is a network namespace with its own address, a link shaped with tc tbf to its
profile's bandwidth, and a cgroup that caps its memory at the profile's RAM and its CPU at
the profile's GFLOP/s relative to this host; a real ``edge worker`` runs inside. The host
(the coordinator, tests, clients) reaches the devices through one veth into the bridge::

    host: edge-lab-host 10.99.0.1 ── bridge (namespace edge-lab-br) ─┬─ edge-lab-<dev1> 10.99.0.11:50051
                                                                     ├─ edge-lab-<dev2> 10.99.0.12:50051
                                                                     └─ ...

Modules, mechanism first:

- ``system``: running ``ip``/``tc`` with clear errors; the root check; the name prefix.
- ``netns``: namespaces, the bridge, veths, addresses.
- ``shaping``: tbf settings (rate, burst) and applying them to both ends of a link.
- ``cgroups``: memory caps, CPU quotas and OOM counters, cgroup v1 or v2.
- ``devices``: policy: what each profile becomes (address, link rate, memory cap, CPU
  quota against this host's measured GFLOP/s).
- ``lab``: the lifecycle: building devices, starting workers, the state file, status.
- ``workers``: the workers' processes: starting one in its device, waiting for it to
  listen, and why one died.
- ``cleanup``: removing it all, from the state file or by name after a crash.
- ``cli``: ``edge lab up | status | down``.

Everything needs root; without it each entry point raises ``LabError`` saying so.
"""

from __future__ import annotations

__all__ = ["Lab", "LabDevice", "DeviceSpec", "DeviceStatus", "LabError", "parse_device_specs",
           "teardown", "leftovers"]

_WHERE = {"Lab": "lab", "DeviceStatus": "workers", "LabDevice": "devices", "DeviceSpec": "devices",
          "parse_device_specs": "devices", "LabError": "system", "teardown": "cleanup",
          "leftovers": "cleanup"}


def __getattr__(name: str):
    # `edge --help` builds the lab's parser: keep importing this package free.
    if name in __all__:
        import importlib

        return getattr(importlib.import_module(f"edge.lab.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'edge.lab' has no attribute {name!r}")
