"""What huge calls do to a worker's memory: a real `edge worker` process, Forward calls of
about 480 MB, first without the cluster token, then with it (issue: "one call can take a
board's memory").

Prints the worker's RSS before, after each call and at the end, its peak (VmHWM), and
the status code of each call.

Usage:
    PYTHONPATH=$PWD python benchmarks/big_calls.py [--mb 480] [--bare 3] [--authed 5]
        [-- extra edge worker arguments, e.g. --memory-budget 900]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from edge.profiling.memory import memory_breakdown
from edge.proto import edge_pb2 as pb
from edge.transport.channels import Security, create_channel, serialized_unary
from edge.transport.codec import encode_activation
from edge.worker.launch import spawn_worker

_FORWARD = pb.DESCRIPTOR.services_by_name["Worker"].methods_by_name["Forward"]
MiB = 1 << 20


def activation_bytes(size: int) -> bytes:
    """A serialized Activation with one float32 tensor of ``size`` bytes (zeros: calloc's
    pages are not resident until read, so the wire bytes are the one copy)."""
    return encode_activation("big", 0, {"x": np.zeros(size // 4, dtype=np.float32)})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=480.0, help="MB per call (10^6 bytes)")
    p.add_argument("--bare", type=int, default=3, help="calls without the token")
    p.add_argument("--authed", type=int, default=5, help="calls with the token")
    p.add_argument("worker_args", nargs="*", help="extra `edge worker` arguments (after --)")
    args = p.parse_args(argv)

    token = "big-calls-token-0123456789"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "token").write_text(token)
        worker = spawn_worker(Path(tmp), "w", threads=1,
                              extra_args=["--token-file", str(Path(tmp) / "token"),
                                          *args.worker_args])
        pid = worker.process.pid

        def rss() -> str:
            m = memory_breakdown(pid)
            return f"RSS {m['rss'] / MiB:6.0f} MiB (peak {m['peak_rss'] / MiB:6.0f} MiB)"

        try:
            payload = activation_bytes(int(args.mb * 1e6))
            time.sleep(1.0)
            print(f"worker {' '.join(args.worker_args) or '(defaults)'}")
            print(f"before:                 {rss()}")
            for label, count, security in (("no token", args.bare, Security()),
                                           ("token", args.authed, Security(token=token))):
                with create_channel(worker.address, security=security) as ch:
                    forward = serialized_unary(ch, _FORWARD, pb.Ack)
                    for i in range(count):
                        start = time.perf_counter()
                        try:
                            forward(payload, timeout=120)
                            code = "OK"
                        except grpc.RpcError as e:
                            code = e.code().name
                        took = time.perf_counter() - start
                        print(f"{label:8s} call {i + 1}: {code:20s} {took:5.1f} s  {rss()}")
                time.sleep(1.0)
                print(f"after {label:8s}:        {rss()}")
        finally:
            worker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
