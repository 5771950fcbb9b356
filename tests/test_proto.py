"""The generated gRPC code is reproducible from protos/ and imports without edits."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ["edge_pb2.py", "edge_pb2_grpc.py", "edge_pb2.pyi"]


def test_generated_code_matches_protos(tmp_path):
    pytest.importorskip("grpc_tools")
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Iprotos", "--python_out=.",
                    "--grpc_python_out=.", "--pyi_out=.", "protos/edge/proto/edge.proto"],
                   cwd=tmp_path, check=True)
    for name in GENERATED:
        fresh = (tmp_path / "edge" / "proto" / name).read_text()
        committed = (ROOT / "edge" / "proto" / name).read_text()
        assert fresh == committed, (
            f"edge/proto/{name} differs from what protos/ generates; regenerate with "
            "python -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. "
            "--pyi_out=. protos/edge/proto/edge.proto")


def test_stubs_import_as_a_package():
    code = "from edge.proto import edge_pb2_grpc; print(edge_pb2_grpc.WorkerStub.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd="/")
    assert out.stdout.strip() == "WorkerStub"
