"""systemd's readiness protocol (``sd_notify``) without libsystemd.

Under a unit with ``Type=notify`` systemd sets ``$NOTIFY_SOCKET`` (a unix datagram socket,
``@`` for the abstract namespace) and waits for ``READY=1`` before it counts the service
as started, so units ordered after it (and ``systemctl start``) wait until it serves.
Without ``$NOTIFY_SOCKET`` every call here does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["notify", "ready", "stopping", "status"]

log = logging.getLogger(__name__)


def notify(*fields: str) -> bool:
    """Send ``KEY=VALUE`` lines to ``$NOTIFY_SOCKET``; True when sent.

    Never raises: a readiness message that cannot be sent is logged, and the service
    then fails its start timeout, which says more than a crash here would.

    Args:
        fields: e.g. ``"READY=1"``, ``"STATUS=serving stage 2"``.
    """
    path = os.environ.get("NOTIFY_SOCKET")
    if not path or not fields:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # the abstract namespace
    elif not path.startswith("/"):
        log.warning("$NOTIFY_SOCKET=%r: expected a unix socket path or @name; not notified",
                    path)
        return False
    message = "\n".join(f.replace("\n", " ") for f in fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            sock.sendall(message)
    except OSError as e:
        log.warning("could not notify systemd at $NOTIFY_SOCKET (%s): %s", path.lstrip("\0"), e)
        return False
    return True


def ready(status_line: str = "") -> bool:
    """``READY=1``: the service serves (after it bound its port)."""
    return notify("READY=1", *([f"STATUS={status_line}"] if status_line else []),
                  f"MAINPID={os.getpid()}")


def stopping(status_line: str = "stopping") -> bool:
    """``STOPPING=1``: shutting down (calls in flight are finishing)."""
    return notify("STOPPING=1", f"STATUS={status_line}")


def status(line: str) -> bool:
    """``STATUS=...``: one line that `systemctl status` shows."""
    return notify(f"STATUS={line}")
