"""``edge lab up | status | run | link | down``: the command line of the device lab.

``edge.cli`` calls :func:`add_parser`; the handlers import the lab when they run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    """Add ``lab`` and its subcommands to the ``edge`` parser's subparsers."""
    p = sub.add_parser("lab", help="emulated devices on this machine (namespaces, shaped "
                                   "links, memory and CPU caps); needs root")
    lab_sub = p.add_subparsers(dest="lab_command", required=True, metavar="ACTION")

    def state_dir_arg(q):
        q.add_argument("--state-dir", help="state file, worker logs and port files "
                                           "(default /run/edge-lab; env EDGE_LAB_DIR)")

    q = lab_sub.add_parser("up", help="create the devices and start a worker on each; "
                                      "returns once all listen (they keep running)")
    q.add_argument("--device", action="append", required=True, metavar="PROFILE[:COUNT]",
                   help="devices to emulate, in pipeline order (see `edge devices`); "
                        "repeatable, e.g. --device rpi4b-2gb:4 --device rpi-zero-2w:1")
    q.add_argument("--link", choices=["gige", "wifi"],
                   help="give every device this link instead of its profile's bandwidth: "
                        "gige 1000 Mbit/s, wifi 100 Mbit/s")
    q.add_argument("--host-gflops", type=float,
                   help="this host's GFLOP/s, which device CPU quotas are scaled against "
                        "(default: measured once in about 2 s, then cached)")
    q.add_argument("--coordinator", metavar="PROFILE",
                   help="also emulate the board the coordinator runs on: a device named "
                        "'coordinator' with this profile's link, memory cap and CPU quota, "
                        "and no worker; start the coordinator there with `edge lab run "
                        "coordinator -- edge coordinator ...`")
    q.add_argument("--cluster-out", default="lab-cluster.yaml",
                   help="write the cluster file for `edge plan --cluster` here "
                        "(default ./lab-cluster.yaml)")
    q.add_argument("--cache-dir", help="the workers' shard caches, one folder per device "
                                       "(default /var/cache/edge-lab; env EDGE_LAB_CACHE)")
    q.add_argument("--ready-timeout", type=float, default=60.0,
                   help="seconds to wait for the workers to listen")
    state_dir_arg(q)
    q.set_defaults(func=cmd_lab_up)

    q = lab_sub.add_parser("status", help="each device: worker alive or why it died "
                                          "(OOM kills), memory, link, CPU")
    state_dir_arg(q)
    q.set_defaults(func=cmd_lab_status)

    q = lab_sub.add_parser("link", help="pull a device's cable (down) or plug it back (up), "
                                        "to watch the coordinator fail over")
    q.add_argument("device", help="the device's name (see `edge lab status`)")
    q.add_argument("state", choices=["down", "up"])
    state_dir_arg(q)
    q.set_defaults(func=cmd_lab_link)

    q = lab_sub.add_parser("run", help="run a command on a device: in its network "
                                       "namespace, under its memory cap and CPU quota "
                                       "(e.g. the coordinator on the board of --coordinator)")
    q.add_argument("device", help="the device's name (see `edge lab status`)")
    q.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                   help="the command and its arguments, after --")
    state_dir_arg(q)
    q.set_defaults(func=cmd_lab_run)

    q = lab_sub.add_parser("down", help="stop the workers and remove every namespace, veth, "
                                        "qdisc and cgroup of the lab (also after a crash)")
    state_dir_arg(q)
    q.set_defaults(func=cmd_lab_down)


def _console():
    from rich.console import Console  # as the handlers: `edge --help` does not load rich

    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 120)  # piped or logged: do not cut addresses
    return console


def _dir(args: argparse.Namespace) -> Path | None:
    return Path(args.state_dir) if args.state_dir else None


def cmd_lab_up(args: argparse.Namespace) -> int:
    from rich import box
    from rich.table import Table

    from edge.lab.devices import DeviceSpec, parse_device_specs
    from edge.lab.lab import Lab
    from edge.lab.system import require_root

    require_root("edge lab up")
    console = _console()
    specs = parse_device_specs(args.device)
    if args.coordinator:
        specs.append(DeviceSpec(args.coordinator, name="coordinator", role="coordinator"))
    lab = Lab.up(specs, link=args.link, state_dir=_dir(args),
                 cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                 gflops=args.host_gflops, cluster_file=Path(args.cluster_out),
                 ready_timeout=args.ready_timeout)
    table = Table(title=f"edge lab: {len(lab.devices)} devices (this host "
                        f"{lab.host_gflops:.0f} GFLOP/s, cgroup v{lab.cgroup_version})",
                  box=box.SIMPLE_HEAD)
    for col in ("device", "address", "link Mbit/s", "memory cap MiB", "CPU cores", "pid"):
        table.add_column(col, no_wrap=True,
                         justify="left" if col in ("device", "address") else "right")
    for d in lab.devices:
        table.add_row(d.name, d.shown_address, f"{d.bandwidth_mbps:g}",
                      f"{d.memory_cap_mb:.0f}", f"{d.cpu_cores:.3f}",
                      str(d.pid) if d.runs_worker else "(coordinator's board)")
    console.print(table)
    print(f"workers: {' '.join(d.address for d in lab.devices if d.runs_worker)}")
    for d in lab.coordinator_devices:
        print(f"the coordinator's board {d.name} ({d.ip}) runs no worker: start it with\n"
              f"  edge lab run {d.name} -- edge coordinator --plan build --certs "
              f"{lab.bundle(d.name)} --listen {d.ip}:50050\n"
              f"  and reach it from this host with --coordinator {d.ip}:50050 "
              f"--certs {lab.coordinator_bundle}")
    print(f"this host reaches them as {lab.host_ip}; they run in the background, logs in "
          f"{lab.state_dir / 'logs'}")
    print(f"wrote {args.cluster_out}: edge plan MODEL.onnx --cluster {args.cluster_out} "
          "--out build/")
    print(f"the workers use mutual TLS: from this host pass --certs {lab.coordinator_bundle} "
          "(edge coordinator, edge calibrate)")
    print("then: edge lab status; edge lab down")
    return 0


def cmd_lab_status(args: argparse.Namespace) -> int:
    from rich import box
    from rich.table import Table

    from edge.lab.lab import Lab
    from edge.lab.cleanup import leftovers
    from edge.lab.system import LabError, require_root

    require_root("edge lab status")
    try:
        lab = Lab.load(_dir(args))
    except LabError as e:
        found = leftovers()
        if found:
            raise LabError(f"{e}, but parts of a lab are left ({', '.join(found)}); "
                           "`edge lab down` removes them") from None
        print(f"edge lab: {e}")
        return 1
    statuses = lab.status()
    table = Table(title=f"edge lab: {len(statuses)} devices", box=box.SIMPLE_HEAD)
    for col in ("device", "address", "worker", "memory MiB now/peak/cap", "OOM kills",
                "link Mbit/s", "CPU cores"):
        table.add_column(col, no_wrap=True,
                         justify="left" if col in ("device", "address", "worker") else "right")
    fmt = (lambda v: "?" if v is None else f"{v:.0f}")
    for s in statuses:
        d = s.device
        state = ("[green]running[/green]" if s.alive else "[red]dead[/red]") \
            if d.runs_worker else "coordinator's board"
        table.add_row(d.name, d.shown_address, state,
                      f"{fmt(s.memory_mb)}/{fmt(s.peak_mb)}/{d.memory_cap_mb:.0f}",
                      "?" if s.oom_kills is None else str(s.oom_kills),
                      f"{d.bandwidth_mbps:g}", f"{d.cpu_cores:.3f}")
    _console().print(table)
    dead = [s for s in statuses if not s.alive and s.device.runs_worker]
    for s in statuses:
        if not s.alive or s.oom_kills or not s.device.runs_worker:
            print(f"{s.device.name}: {s.reason}")
    return 1 if dead else 0


def cmd_lab_down(args: argparse.Namespace) -> int:
    from edge.lab.cleanup import teardown
    from edge.lab.system import require_root

    require_root("edge lab down")
    r = teardown(_dir(args))
    if r.empty:
        print("edge lab: nothing to remove")
        return 0
    print(f"edge lab: stopped {len(r.processes)} process(es); removed "
          f"{len(r.namespaces)} namespace(s), {len(r.links)} host link(s) and "
          f"{len(r.cgroups)} cgroup(s)")
    return 0


def cmd_lab_link(args: argparse.Namespace) -> int:
    from edge.lab.lab import Lab
    from edge.lab.system import require_root

    require_root("edge lab link")
    lab = Lab.load(_dir(args))
    dev = lab.device(args.device)
    lab.set_link(dev.name, up=args.state == "up")
    print(f"edge lab: {dev.name} ({dev.shown_address}) link {args.state}")
    return 0


def cmd_lab_run(args: argparse.Namespace) -> int:
    import signal
    import subprocess

    from edge.lab.lab import Lab
    from edge.lab.system import LabError, require_root

    require_root("edge lab run")
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise LabError("edge lab run expects a command after the device, e.g. `edge lab run "
                       "coordinator -- edge coordinator --plan build ...`; got none")
    lab = Lab.load(_dir(args))
    child = subprocess.Popen(lab.command(args.device, cmd))

    def forward(signum, _frame) -> None:  # `kill` of this process stops the command too
        child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    code = child.wait()
    return code if code >= 0 else 128 - code  # its exit status is ours, as a shell's
