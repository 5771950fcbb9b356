"""Taking a lab down: from the state file if there is one, else by the name prefix alone,
so that a lab whose ``up`` was killed with SIGKILL, or whose state file is lost, still
goes away without a trace."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from edge.lab import cgroups, netns
from edge.lab.system import (CERTS_DIR, PREFIX, STATE_FILE, LabError, default_state_dir,
                             process_alive, require_root)

__all__ = ["TeardownReport", "leftovers", "teardown"]


@dataclass
class TeardownReport:
    """What ``teardown`` removed."""

    processes: list[int] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.processes or self.namespaces or self.links or self.cgroups)


def leftovers(hierarchy: cgroups.Hierarchy | None = None, prefix: str = PREFIX) -> list[str]:
    """What of a lab exists on this host now, found by name: namespaces, host links and
    cgroups whose names start with ``prefix``.

    Args:
        hierarchy: the cgroup hierarchy (default: detected; none if there is none).
        prefix: the lab's prefix.
    """
    found = [f"namespace {n}" for n in netns.list_namespaces(prefix)]
    found += [f"link {n}" for n in netns.host_links(prefix)]
    if hierarchy is None:
        try:
            hierarchy = cgroups.detect()
        except LabError:
            hierarchy = None
    if hierarchy is not None:
        found += [f"cgroup {p}" for p in hierarchy.scan(prefix)]
    return found


def _state_pids(state_dir: Path) -> list[int]:
    """Worker pids in the state file that still run that worker (not a reused pid)."""
    try:
        state = json.loads((state_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return []
    pids = []
    for d in state.get("devices", []):
        pid = d.get("pid")
        if not pid:
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"{d.get('name')}.port".encode() in b" ".join(cmdline):
            pids.append(int(pid))
    return pids


def _stop(pids: set[int], grace: float) -> None:
    """SIGTERM, up to ``grace`` seconds to exit, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + (grace if sig == signal.SIGTERM else 5.0)
        while any(process_alive(p) for p in pids) and time.monotonic() < end:
            time.sleep(0.05)
        pids = {p for p in pids if process_alive(p)}
        if not pids:
            return


def teardown(state_dir: Path | None = None, prefix: str = PREFIX,
             grace: float = 2.0) -> TeardownReport:
    """Remove a lab: stop its workers, delete its namespaces, host link and cgroups.

    Works from the names alone: after ``up`` was killed with SIGKILL, or without the state
    file, everything whose name starts with ``prefix`` is found and removed. Every process
    in the lab's cgroups and namespaces is stopped (a namespace with a process in it would
    outlive its deletion). Deleting a namespace takes its veths and their qdiscs with it.

    Args:
        state_dir: the lab's state folder (its state file, port files and certificates are
            removed; logs stay, for post-mortems).
        prefix: the lab's prefix.
        grace: seconds the workers get to stop after SIGTERM before SIGKILL.

    Raises:
        LabError: not root, or something could not be removed (after trying the rest).
    """
    require_root("edge lab down")
    state_dir = Path(state_dir or default_state_dir())
    report = TeardownReport()
    errors: list[str] = []
    try:
        groups = cgroups.detect().scan(prefix)
    except LabError:  # no cgroup controllers: the lab never made any
        groups = []
    namespaces = netns.list_namespaces(prefix)

    # Workers first: a namespace with a process in it outlives `ip netns del`, with its veths.
    pids = set(_state_pids(state_dir))
    for g in groups:
        pids.update(cgroups.dir_procs(g))
    for ns in namespaces:
        pids.update(netns.namespace_pids(ns))
    pids.discard(os.getpid())
    for g in groups:
        cgroups.lift_cpu_limit(g)  # a throttled worker would need seconds to stop
    _stop(pids, grace)
    report.processes = sorted(pids)

    # The host's veth explicitly: namespaces are destroyed asynchronously, and a new lab's
    # `up` must not find the old link still there.
    def remove(items, delete, removed: list) -> None:
        # Go on past a failure: the rest still has to go; the errors are reported at the end.
        for item in items:
            try:
                delete(item)
                removed.append(str(item))
            except LabError as e:
                errors.append(str(e))

    remove(netns.host_links(prefix), netns.delete_host_link, report.links)
    remove(namespaces, netns.delete_namespace, report.namespaces)
    remove(groups, cgroups.remove_dir, report.cgroups)
    for f in [state_dir / STATE_FILE, *state_dir.glob("*.port")]:
        f.unlink(missing_ok=True)
    shutil.rmtree(state_dir / CERTS_DIR, ignore_errors=True)  # the lab's throwaway CA
    if errors:
        raise LabError("could not remove all of the lab:\n  " + "\n  ".join(errors))
    return report
