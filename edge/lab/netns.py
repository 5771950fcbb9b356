"""The lab's network: one namespace per device, joined by a bridge in a namespace of its own.

::

    host (coordinator, clients)        namespace edge-lab-br             namespace edge-lab-<device>
    edge-lab-host 10.99.0.1/24 ──veth── host0 ─┐
                                               br0 ── p<i> ──────veth────── eth0 10.99.0.<10+i>/24
                                                   ── p<j> ──── ...          (edge worker listens here)

The bridge lives in its own namespace, so the device subnet never enters the host's
routing table through a bridge; the host sees only one veth, ``edge-lab-host``, whose
connected route covers the lab subnet and nothing else. No namespace has a default route
and nothing is forwarded or NATed: traffic can only go to addresses inside the lab.

Deleting a namespace deletes the veths in it, the peers of those veths and their qdiscs,
but the kernel does it asynchronously; :func:`delete_host_link` removes the host's veth at
once, so a new lab can come up straight after ``down``.
"""

from __future__ import annotations

import ipaddress

from edge.lab.system import PREFIX, LabError, run

__all__ = ["BRIDGE_NS", "HOST_LINK", "DEVICE_LINK", "namespace_for", "create_bridge",
           "add_device", "list_namespaces", "namespace_pids", "delete_namespace",
           "bridge_port", "host_links", "delete_host_link", "check_subnet_free"]

BRIDGE_NS = PREFIX + "br"
HOST_LINK = PREFIX + "host"     # the host's end of the veth into the bridge namespace
_BRIDGE = "br0"
_HOST_PEER = "host0"            # its peer, a bridge port
DEVICE_LINK = "eth0"            # a device's interface inside its namespace


def namespace_for(device: str) -> str:
    """The namespace of a device: ``edge-lab-<device>``."""
    return PREFIX + device


def bridge_port(index: int) -> str:
    """The bridge-side end of device ``index``'s veth (inside the bridge namespace)."""
    return f"p{index}"


def check_subnet_free(subnet: ipaddress.IPv4Network) -> None:
    """Raise LabError if the host already routes addresses of ``subnet``.

    Args:
        subnet: the lab's subnet.
    """
    for line in run(["ip", "-4", "-o", "route", "show"]).stdout.splitlines():
        dest = line.split()[0]
        if dest == "default":
            continue
        try:
            net = ipaddress.ip_network(dest, strict=False)
        except ValueError:
            continue
        if net.overlaps(subnet):
            raise LabError(f"the lab's subnet {subnet} overlaps a route of this host "
                           f"({line.strip()}); the lab would hide those addresses")


def create_bridge(host_ip: ipaddress.IPv4Interface) -> None:
    """Create the bridge namespace, its bridge, and the host's veth into it.

    Args:
        host_ip: the host's address on the lab subnet, e.g. ``10.99.0.1/24``.
    """
    run(["ip", "netns", "add", BRIDGE_NS])
    run(["ip", "-n", BRIDGE_NS, "link", "set", "lo", "up"])
    run(["ip", "-n", BRIDGE_NS, "link", "add", _BRIDGE, "type", "bridge"])
    run(["ip", "-n", BRIDGE_NS, "link", "set", _BRIDGE, "up"])
    # Created in one command with its peer already in the bridge namespace: there is no
    # moment when both ends sit on the host.
    run(["ip", "link", "add", HOST_LINK, "type", "veth", "peer", "name", _HOST_PEER,
         "netns", BRIDGE_NS])
    run(["ip", "-n", BRIDGE_NS, "link", "set", _HOST_PEER, "master", _BRIDGE, "up"])
    run(["ip", "addr", "add", str(host_ip), "dev", HOST_LINK])
    run(["ip", "link", "set", HOST_LINK, "up"])


def add_device(namespace: str, index: int, ip: ipaddress.IPv4Interface) -> str:
    """Create a device's namespace and plug it into the bridge.

    Args:
        namespace: its name (``namespace_for(device)``).
        index: a number unique in the lab, for the bridge port's name.
        ip: its address and prefix, e.g. ``10.99.0.11/24``.

    Returns:
        The name of its bridge port (inside ``BRIDGE_NS``), to shape the device's downlink.
    """
    port = bridge_port(index)
    run(["ip", "netns", "add", namespace])
    run(["ip", "-n", namespace, "link", "set", "lo", "up"])
    run(["ip", "-n", BRIDGE_NS, "link", "add", port, "type", "veth", "peer", "name",
         DEVICE_LINK, "netns", namespace])
    run(["ip", "-n", BRIDGE_NS, "link", "set", port, "master", _BRIDGE, "up"])
    run(["ip", "-n", namespace, "addr", "add", str(ip), "dev", DEVICE_LINK])
    run(["ip", "-n", namespace, "link", "set", DEVICE_LINK, "up"])
    return port


def set_link(namespace: str, up: bool) -> None:
    """Bring a device's link down (its packets are dropped, no reset is sent) or up."""
    run(["ip", "-n", namespace, "link", "set", DEVICE_LINK, "up" if up else "down"])


def list_namespaces(prefix: str = PREFIX) -> list[str]:
    """Names of the network namespaces that start with ``prefix``."""
    out = run(["ip", "netns", "list"]).stdout
    # Lines look like "edge-lab-br (id: 3)" or just "edge-lab-br".
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return sorted(n for n in names if n.startswith(prefix))


def namespace_pids(namespace: str) -> list[int]:
    """Processes running in a namespace (empty if it does not exist)."""
    r = run(["ip", "netns", "pids", namespace], check=False)
    return [int(p) for p in r.stdout.split() if p.isdigit()]


def delete_namespace(namespace: str) -> None:
    """Delete a namespace; its veths (and their peers and qdiscs) go with it."""
    run(["ip", "netns", "del", namespace])


def host_links(prefix: str = PREFIX) -> list[str]:
    """Interfaces in the host's namespace whose names start with ``prefix``."""
    out = run(["ip", "-o", "link", "show"]).stdout
    names = []
    for line in out.splitlines():
        # "5: edge-lab-host@if4: <BROADCAST,...> ..."
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@")[0])
    return sorted(n for n in names if n.startswith(prefix))


def delete_host_link(name: str) -> None:
    """Delete an interface of the host (and a veth's peer with it)."""
    run(["ip", "link", "del", name])
