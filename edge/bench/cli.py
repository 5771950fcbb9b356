"""``edge bench``: the command line of the side-by-side benchmarks.

``edge.cli`` calls :func:`add_parser`; the handler imports the bench when it runs.
"""

from __future__ import annotations

import argparse
import shlex
import time

from edge.errors import ConfigError

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    """Add ``bench`` to the ``edge`` parser's subparsers."""
    p = sub.add_parser(
        "bench", help="edge against one device and torch.distributed.pipelining, hop cost, "
                      "scaling and a timeline, in one run; writes JSON, Markdown and PNGs")
    p.add_argument("--model", help="bert-tiny, bert-small or bert-base (default bert-base; "
                                   "with --quick bert-small)")
    p.add_argument("--devices", default="rpi4b-2gb:4", metavar="PROFILE:COUNT",
                   help="the devices of the compared pipeline (default rpi4b-2gb:4)")
    p.add_argument("--out", default="results", help="folder for bench.json, bench.md, "
                                                    "timeline.png, scaling.png")
    p.add_argument("--requests", type=int, help="requests per measurement (default 16; "
                                                "with --quick 4)")
    p.add_argument("--rounds", type=int, help="times every configuration is measured, "
                                              "alternating (default 3; with --quick 1)")
    p.add_argument("--scaling", default="2,4,8", metavar="N,N,...",
                   help="device counts of the scaling comparison (default 2,4,8)")
    p.add_argument("--sequence", type=int, default=128, help="tokens per request")
    p.add_argument("--no-lab", action="store_true",
                   help="skip what needs `edge lab` (root, and no other lab up): the hop on "
                        "a shaped gigabit link and the pipeline against one device on "
                        "CPU-capped emulated devices")
    p.add_argument("--lab-stages", default=None, metavar="N,N,...",
                   help="the pipelines measured against one device in edge lab (default "
                        "4,8; with --quick 2)")
    p.add_argument("--lab-coordinator", default="rpi4b-2gb", metavar="PROFILE",
                   help="the board each lab pipeline's coordinator runs on, emulated like "
                        "the devices (default rpi4b-2gb; 'host': this host, uncapped)")
    p.add_argument("--lab-direct", action="store_true",
                   help="the lab's clients send each request to the first stage and hear its "
                        "result from the last (edge infer --direct); the coordinators only "
                        "route")
    p.add_argument("--workdir", help="keep the model, plans and logs here (default: temporary)")
    p.add_argument("--quick", action="store_true",
                   help="BERT-small, 4 requests, one round: under a minute")
    p.set_defaults(func=cmd_bench)


def _config(args: argparse.Namespace):
    from edge.bench.runner import BenchConfig, parse_devices, parse_model

    profile, count = parse_devices(args.devices)
    scaling = _counts(args.scaling, "--scaling")
    given = {k: v for k, v in dict(model=args.model, requests=args.requests,
                                   rounds=args.rounds).items() if v is not None}
    for key in ("requests", "rounds"):
        if key in given and given[key] < 1:
            raise ConfigError(f"--{key}: expected >= 1, got {given[key]}")
    if "model" in given:
        parse_model(given["model"])
    if args.lab_stages is not None:
        given["lab_stages"] = _counts(args.lab_stages, "--lab-stages")
    given["lab_coordinator"] = None if args.lab_coordinator == "host" else args.lab_coordinator
    if given["lab_coordinator"]:
        parse_devices(given["lab_coordinator"])  # names the known profiles if it is not one
    common = dict(profile=profile, devices=count, out=args.out, scaling=scaling,
                  sequence=args.sequence, lab=not args.no_lab, workdir=args.workdir,
                  lab_direct=args.lab_direct,
                  command=_command(args), **given)
    return BenchConfig.quick(**common) if args.quick else BenchConfig(**common)


def _counts(text: str, flag: str) -> tuple[int, ...]:
    """``"2,4,8"`` -> ``(2, 4, 8)``.

    Raises:
        ConfigError: not device counts >= 1.
    """
    try:
        counts = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise ConfigError(f"{flag}: expected device counts >= 1 like 2,4,8, got {text!r}")
    return counts


def _command(args: argparse.Namespace) -> str:
    """The command as run, every option spelled out (for the report)."""
    argv = ["edge", "bench", "--devices", args.devices, "--out", args.out,
            "--scaling", args.scaling, "--sequence", str(args.sequence)]
    for flag, value in (("--model", args.model), ("--requests", args.requests),
                        ("--rounds", args.rounds), ("--lab-stages", args.lab_stages),
                        ("--lab-coordinator", args.lab_coordinator),
                        ("--workdir", args.workdir)):
        if value is not None:
            argv += [flag, str(value)]
    argv += (["--quick"] * args.quick + ["--no-lab"] * args.no_lab
             + ["--lab-direct"] * args.lab_direct)
    return shlex.join(argv)


def cmd_bench(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from edge.bench.report import summary_rows
    from edge.bench.runner import run_bench

    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 140)  # piped or logged: keep the table's rows whole
    config = _config(args)
    t0 = time.monotonic()
    result = run_bench(config, say=lambda line: console.print(
        f"[dim]{time.monotonic() - t0:6.1f} s  {line}[/dim]"))
    table = Table(title=f"edge bench: {config.model} over {config.devices} × {config.profile}")
    for col in ("comparison", "edge", "baseline", "ratio / value", "target", "met"):
        table.add_column(col, justify="left" if col == "comparison" else "right")
    for row in summary_rows(result):
        # The rows are Markdown: drop its emphasis and escapes for the terminal.
        table.add_row(*(cell.replace("\\|", "|").replace("*", "") for cell in row))
    console.print(table)
    console.print("[dim]modelled: stage times measured here scaled to the profile; not "
                  "measured on a Pi[/dim]")
    for path in result["files"].values():
        print(f"wrote {path}")
    return 0
