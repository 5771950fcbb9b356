"""Running the host's tools (``ip``, ``tc``) and checking that the lab may run at all.

Every command the lab runs goes through :func:`run`, so a failure always names the
command, its exit code and what it printed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

from edge.errors import EdgeError

__all__ = ["PREFIX", "STATE_FILE", "LabError", "run", "require_root", "check_tools",
           "default_state_dir", "default_cache_dir", "process_alive", "write_json"]

log = logging.getLogger(__name__)

# Everything the lab creates on the host (namespaces, the host's veth, cgroups) is named
# with this prefix, so `edge lab down` finds it again without the state file.
PREFIX = "edge-lab-"
STATE_FILE = "state.json"
CERTS_DIR = "certs"  # the lab's CA and bundles, in the state folder


class LabError(EdgeError):
    """The device lab cannot be set up, inspected or torn down; the message says why."""


def require_root(command: str) -> None:
    """Raise LabError naming what is needed unless this process runs as root.

    Args:
        command: the command being run, for the message (``edge lab up``).
    """
    if os.geteuid() != 0:
        raise LabError(f"`{command}` needs root: it creates network namespaces and veths "
                       "(ip netns), shapes links (tc) and caps memory and CPU (cgroups). "
                       f"Run it as root, e.g. `sudo {command}` "
                       f"(this process runs as uid {os.geteuid()})")


def check_tools() -> None:
    """Raise LabError unless ``ip`` (with netns support) and ``tc`` are usable."""
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise LabError(f"the lab needs `{tool}` from iproute2, which is not on PATH "
                           "(Debian/Ubuntu: apt-get install iproute2)")
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if r.returncode != 0:
        raise LabError("the lab needs network namespaces, but `ip netns list` failed "
                       f"(exit {r.returncode}): {r.stderr.strip()}")


def run(cmd: list[str], *, check: bool = True, input: str | None = None
        ) -> subprocess.CompletedProcess:
    """Run a command and capture its output.

    Args:
        cmd: the argv.
        check: raise LabError when it exits non-zero.
        input: text for its stdin.

    Raises:
        LabError: the command is missing or failed; the message has its stderr.
    """
    log.debug("run: %s", " ".join(cmd))
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, input=input)
    except FileNotFoundError:
        raise LabError(f"`{cmd[0]}` not found (needed for: {' '.join(cmd)})") from None
    if check and r.returncode != 0:
        detail = (r.stderr or r.stdout).strip() or "no output"
        raise LabError(f"`{' '.join(cmd)}` failed (exit {r.returncode}): {detail}")
    return r


def default_state_dir() -> Path:
    """Where the state file, worker logs and port files go: ``$EDGE_LAB_DIR`` or
    ``/run/edge-lab`` (cleared at boot, like the namespaces it describes)."""
    return Path(os.environ.get("EDGE_LAB_DIR", "/run/edge-lab"))


def default_cache_dir() -> Path:
    """Where the workers keep their shards, one folder per device. On disk, not in /run:
    a tmpfs page is charged to the worker's cgroup and cannot be reclaimed, while a
    board's SD card cache can."""
    return Path(os.environ.get("EDGE_LAB_CACHE", "/var/cache/edge-lab"))


def process_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically: a reader sees the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
