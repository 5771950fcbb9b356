"""edge's gRPC settings reach the processes the `edge` command starts, before gRPC loads."""

from __future__ import annotations

import os
import subprocess
import sys

from edge.transport import grpc_env

_SHOW = ("from edge.transport import grpc_env; took = grpc_env.apply(); import os; "
         "print(took, repr(os.environ.get('GRPC_EXPERIMENTS')))")


def _run(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**base, **env}, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_apply_sets_the_experiments_before_grpc_loads():
    assert _run(_SHOW) == f"True {grpc_env.EXPERIMENTS!r}"


def test_a_setting_of_the_users_wins():
    assert _run(_SHOW, GRPC_EXPERIMENTS="") == "False ''"
    assert _run(_SHOW, GRPC_EXPERIMENTS="-event_engine_client") == \
        "False '-event_engine_client'"


def test_apply_says_when_grpc_was_loaded_first():
    assert _run("import grpc; " + _SHOW) == "False None"


def test_the_edge_command_applies_them_before_it_loads_grpc():
    """`edge worker`, `edge coordinator` and the rest start in edge.cli: it sets them (which
    apply does only while gRPC is not loaded), then loads gRPC."""
    out = _run("import os, sys; import edge.cli; "
               "print('grpc' in sys.modules, os.environ.get('GRPC_EXPERIMENTS'))")
    assert out == f"True {grpc_env.EXPERIMENTS}"
