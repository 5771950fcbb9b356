"""``host:port`` addresses: one parser for cluster files, worker configs, the CLI and the
loopback check, so they all agree on what an address is.

Standard library only: the worker imports this.
"""

from __future__ import annotations

import re

from edge.errors import ConfigError

__all__ = ["AddressError", "parse_address"]

# A DNS name or IPv4 address, or an IPv6 address in brackets ([::1]:50051): what gRPC
# takes as a target and what a ``host:port`` printed back from it must look like.
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)$")


class AddressError(ConfigError, ValueError):
    """Text that is not ``host:port``. The message says what was expected and what came;
    callers prefix the file and field it came from."""


def parse_address(text: str, allow_port_zero: bool = False) -> tuple[str, int]:
    """Split ``host:port``.

    Args:
        text: e.g. ``10.0.0.2:50051``, ``pi-2.local:50051`` or ``[::1]:50051``.
        allow_port_zero: accept port 0 (listen addresses: any free port).

    Returns:
        ``(host, port)``; an IPv6 host keeps its brackets, so ``f"{host}:{port}"`` is an
        address again.

    Raises:
        AddressError: no port, a port out of range, or a host that is not a name or an
            IP address.
    """
    low = 0 if allow_port_zero else 1
    host, sep, port = text.rpartition(":") if isinstance(text, str) else ("", "", "")
    if (not sep or not _HOST.fullmatch(host) or not (port.isascii() and port.isdigit())
            or not low <= int(port) < 65536):
        raise AddressError(f"expected host:port (port {low}-65535), got {text!r}")
    return host, int(port)
