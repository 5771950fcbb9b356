"""Link shaping: a token bucket (tc tbf) on both ends of each device's veth.

A device's uplink is shaped on its own ``eth0`` (egress, inside its namespace) and its
downlink on its bridge port (egress toward it, inside the bridge namespace). Traffic
between two devices therefore runs at the slower of the two links, as through a switch.

tbf counts Ethernet frames, so TCP goodput comes out about 4% under the rate (1448 bytes
of payload per 1514-byte frame): 50 Mbit/s measured 47.9.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge.lab.system import run

__all__ = ["LINK_RATES_MBPS", "Shape", "shape_for", "apply"]

# Nominal rates for `edge lab up --link`, overriding every device's profile bandwidth.
LINK_RATES_MBPS = {
    # Gigabit Ethernet line rate; TCP gets ~940 Mbit/s of it, as on a Pi 4's port.
    "gige": 1000.0,
    # 802.11ac on 5 GHz at a Pi 4/5's distance from an access point: ~100 Mbit/s TCP in
    # published iperf3 tests. A Zero 2 W's 2.4 GHz radio is slower (its profile says 30).
    "wifi": 100.0,
}

# The bucket must stay well below a message (BERT-base activations are ~400 KB), or a
# message leaves at line rate: measured on this class of VM, 64 KiB kept 1 Gbit/s at
# 820-950 and 32 KiB kept 50 Mbit/s at 47.9. Half a millisecond at the rate, within these.
_MIN_BURST = 32 * 1024
_MAX_BURST = 64 * 1024
_BURST_SECONDS = 0.0005
# Queue a sender may build before tbf drops: enough for TCP to keep the link full.
_LATENCY_MS = 50


@dataclass(frozen=True)
class Shape:
    """A tbf setting.

    Attributes:
        rate_mbps: the rate, Mbit/s.
        burst_bytes: the bucket.
        latency_ms: the longest a packet may wait in the queue.
    """

    rate_mbps: float
    burst_bytes: int
    latency_ms: int = _LATENCY_MS

    def tc_args(self) -> list[str]:
        """The ``tbf ...`` part of a ``tc qdisc`` command."""
        return ["tbf", "rate", f"{round(self.rate_mbps * 1000)}kbit",
                "burst", str(self.burst_bytes), "latency", f"{self.latency_ms}ms"]


def shape_for(rate_mbps: float) -> Shape:
    """The tbf setting for a link of ``rate_mbps`` Mbit/s.

    Args:
        rate_mbps: the link's rate, > 0.
    """
    if rate_mbps <= 0:
        raise ValueError(f"a link rate must be > 0 Mbit/s, got {rate_mbps}")
    burst = rate_mbps * 1e6 / 8 * _BURST_SECONDS
    return Shape(rate_mbps, int(min(_MAX_BURST, max(_MIN_BURST, burst))))


def apply(namespace: str, dev: str, shape: Shape) -> None:
    """Shape ``dev``'s egress in ``namespace`` (replacing its root qdisc).

    Args:
        namespace: the network namespace the interface is in.
        dev: the interface.
        shape: the setting.
    """
    run(["tc", "-n", namespace, "qdisc", "replace", "dev", dev, "root", *shape.tc_args()])
