"""gRPC settings that must be in a process's environment before gRPC loads.

grpcio 1.85 does every connection's reads and writes on its EventEngine threads, by
default, and hands each completed operation to the Python thread that waits for it. edge
turns that off: the older I/O path does them on the thread that polls for the completion.
That saves a thread wake-up per message; at the request rates of a pipeline of Pi-class
boards, wake-ups are most of what a message costs in gRPC. The setting is one of gRPC's
experiments (``GRPC_EXPERIMENTS``), read once, when gRPC loads: the ``edge`` command
applies it first thing (``apply``), so every worker and coordinator it starts has it.
Measured side by side on loopback (BENCHMARKS.md, "gRPC's I/O on the thread that waits for
it"): the coordinator's CPU 11% lower at 2 requests a second over 4 stages, a worker's CPU
per hop 14% lower.

A ``GRPC_EXPERIMENTS`` already in the environment wins, so ``GRPC_EXPERIMENTS= edge ...``
(empty) runs with gRPC's defaults.
"""

from __future__ import annotations

import os
import sys

__all__ = ["EXPERIMENTS", "apply"]

# EventEngine for outgoing and incoming connections, for the callback completion queue, and
# for every other endpoint: off (the "-" prefix).
EXPERIMENTS = ("-event_engine_client,-event_engine_listener,-event_engine_callback_cq,"
               "-event_engine_for_all_other_endpoints")


def apply() -> bool:
    """Put edge's gRPC settings into this process's environment (and its children's).

    Returns:
        Whether they take effect here: False when gRPC was loaded already or the
        environment sets ``GRPC_EXPERIMENTS`` otherwise.
    """
    if "grpc" in sys.modules:
        return False
    os.environ.setdefault("GRPC_EXPERIMENTS", EXPERIMENTS)
    return os.environ["GRPC_EXPERIMENTS"] == EXPERIMENTS
