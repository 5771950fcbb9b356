"""``edge certs init | issue``: the command line of :mod:`edge.transport.certs`.

``edge.cli`` calls :func:`add_parser`; ``cryptography`` is imported only when a handler
runs, so ``edge worker`` never loads it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edge.transport.security import default_certs_dir

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    """Add ``certs`` and its subcommands to the ``edge`` parser's subparsers."""
    p = sub.add_parser("certs", help="make the cluster's CA and token, and a certificate "
                                     "bundle per machine (mutual TLS)")
    certs_sub = p.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    home = default_certs_dir()

    q = certs_sub.add_parser("init", help="make the cluster CA (ca.crt, ca.key) and token")
    q.add_argument("--dir", default=str(home),
                   help=f"the CA folder (default {home}; env EDGE_CERTS)")
    q.add_argument("--force", action="store_true",
                   help="replace an existing CA: every bundle it issued stops working")
    q.set_defaults(func=cmd_certs_init)

    q = certs_sub.add_parser("issue", help="make a key and certificate for one machine: a "
                                           "bundle folder DIR/NAME to copy onto it")
    q.add_argument("name", help="the machine, e.g. pi-0, coordinator, laptop")
    q.add_argument("--role", choices=("node", "client"), default="node",
                   help="node (default, as bundles were before roles): the coordinator or a "
                        "worker, may call everything; client: a machine that only sends "
                        "requests (edge infer, edge profile --coordinator) and may call "
                        "nothing else, e.g. not read other requests' results from a worker. "
                        "Roles are enforced over TLS only")
    q.add_argument("--dir", default=str(home),
                   help=f"the CA folder (default {home}; env EDGE_CERTS)")
    q.add_argument("--host", action="append", default=[], metavar="IP_OR_DNS",
                   help="an address of the machine to put in the certificate (edge checks "
                        "the CA, not addresses; this is for other tools); repeatable")
    q.add_argument("--out", help="the bundle folder (default DIR/NAME)")
    q.add_argument("--force", action="store_true", help="replace an existing bundle")
    q.set_defaults(func=cmd_certs_issue)


def cmd_certs_init(args: argparse.Namespace) -> int:
    from edge.transport.certs import init_ca

    path = init_ca(args.dir, force=args.force)
    dir_arg = "" if Path(args.dir) == default_certs_dir() else f" --dir {path}"
    print(f"wrote the cluster CA and token to {path} (ca.key stays on this machine)")
    print(f"next, a bundle per machine: edge certs issue coordinator{dir_arg}; "
          f"edge certs issue pi-0 --host 192.168.1.20{dir_arg}")
    return 0


def cmd_certs_issue(args: argparse.Namespace) -> int:
    from edge.transport.certs import issue

    bundle = issue(args.dir, args.name, hosts=args.host, out=args.out, force=args.force,
                   role=args.role)
    host = args.host[0] if args.host else "HOST"
    print(f"wrote {bundle}/ (ca.crt, node.crt, node.key, token), role {args.role}")
    if args.role == "client":
        print("a client may call the coordinator's Infer, status and profile, nothing else")
        print(f"on another machine: scp -rp {bundle} USER@{host}:edge-certs, then there "
              "`edge infer --coordinator HOST:PORT --certs ~/edge-certs ...`")
        print(f"on this machine: --certs {bundle}, e.g. `edge profile --coordinator HOST:PORT "
              f"--certs {bundle}`")
        return 0
    print("a node (coordinator or worker) may call everything; for a machine that only "
          "sends requests, issue a bundle with --role client")
    print(f"on another machine: scp -rp {bundle} USER@{host}:edge-certs, then there "
          "`edge worker --certs ~/edge-certs`")
    print(f"on this machine: --certs {bundle}, e.g. "
          f"`edge coordinator --plan build/plan.json --certs {bundle}`")
    return 0
