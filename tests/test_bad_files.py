"""Malformed files given to the real CLI: exit code 2 and a message naming the file and the
field, never a Python traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

GOOD_DEVICE = "  - name: pi-1\n    address: 127.0.0.1:50051\n    profile: rpi4b-2gb\n"


def edge_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge", *args], capture_output=True,
                          text=True, timeout=120)


def assert_refused(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in r.stderr, f"{w!r} not in {r.stderr!r}"


@pytest.mark.parametrize("text, words", [
    ("devices:\n  - name: pi-1\n    address: \"127.0.0.1:50051\n    profile: rpi4b-2gb\n",
     ["not valid YAML", "line 3, column 14"]),
    ("devices:\n\t- name: pi-1\n", ["not valid YAML", "line 2"]),
    ("devices:\n" + GOOD_DEVICE + "    memory_mb: lots\n",
     ["devices[0].memory_mb", "expected an integer", "'lots'"]),
    ("devices:\n  - name: pi-1\n    address: 127.0.0.1:50051\n    profile: rpi9-64gb\n",
     ["devices[0].profile", "unknown profile 'rpi9-64gb'", "rpi4b-2gb"]),
    ("devices:\n" + GOOD_DEVICE + "    memroy_mb: 900\n",
     ["devices[0]", "unknown field(s) memroy_mb"]),
    ("devices: []\n", ["devices", "at least one device"]),
])
def test_malformed_cluster_yaml(tmp_path, bert_tiny, text, words):
    cluster = tmp_path / "my-cluster.yaml"
    cluster.write_text(text)
    r = edge_cli("plan", str(bert_tiny), "--cluster", str(cluster), "--out", str(tmp_path / "o"))
    assert_refused(r, "my-cluster.yaml", *words)
    assert not (tmp_path / "o" / "plan.json").exists()


@pytest.fixture(scope="module")
def plan_json(bert_tiny, tmp_path_factory) -> dict:
    from edge.build import make_plan
    from edge.planning.cluster import cluster_from_profile

    out = tmp_path_factory.mktemp("plan")
    make_plan(bert_tiny, cluster_from_profile("rpi4b-2gb", 2).devices, out,
              bindings={"batch": 1, "sequence": 16})
    return json.loads((out / "plan.json").read_text())


def _without(d: dict, *path):
    *parents, last = path
    for p in parents:
        d = d[p]
    del d[last]


def _set(value):
    def change(d: dict, *path):
        *parents, last = path
        for p in parents:
            d = d[p]
        d[last] = value
    return change


@pytest.mark.parametrize("change, path, words", [
    (_without, ("stages", 1, "sha256"), ["stages[1].sha256", "missing", "sha256"]),
    (_without, ("stages", 0, "device"), ["stages[0].device", "missing"]),
    (_set(2), ("version",), ["'version'", "expected 1, got 2"]),
    (_set(None), ("version",), ["'version'", "expected 1, got None"]),
    (_set("0.5"), ("stages", 0, "shard_bytes"), ["stages[0].shard_bytes", "integer", '"0.5"']),
    (_set("fp64"), ("stages", 0, "mode"), ["stages[0].mode", "fp32-lean", "fp64"]),
    (_set("../../etc/passwd"), ("stages", 0, "data_files", 0, "path"),
     ["stages[0].data_files[0].path", "inside the plan's folder"]),
    (_set([]), ("stages",), ["'stages'", "at least one stage"]),
    (_set(5), ("stages", 1, "inputs", 0, "shape"), ["stages[1].inputs[0].shape", "a list"]),
    (_set(0), ("stages", 1, "index"), ["stages[1].index", "expected 1"]),
])
def test_malformed_plan_json(tmp_path, plan_json, change, path, words):
    raw = json.loads(json.dumps(plan_json))
    change(raw, *path)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(raw))
    # The coordinator reads the plan before it contacts any worker.
    r = edge_cli("coordinator", "--plan", str(plan), "--listen", "127.0.0.1:0",
                 "--ready-timeout", "1")
    assert_refused(r, str(plan), *words)


def test_plan_json_that_is_not_json(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text('{"version": 1, "stages": [')
    r = edge_cli("coordinator", "--plan", str(plan), "--listen", "127.0.0.1:0")
    assert_refused(r, str(plan), "not valid JSON", "line 1")


@pytest.mark.parametrize("kind", ["truncated", "text", "empty"])
@pytest.mark.parametrize("command", ["plan", "profile"])
def test_malformed_onnx(tmp_path, bert_tiny, kind, command):
    model = tmp_path / "broken.onnx"
    data = bert_tiny.read_bytes()
    model.write_bytes({"truncated": data[:len(data) // 2], "text": b"name: not a model\n",
                       "empty": b""}[kind])
    if kind == "truncated":  # its external data is there: only the .onnx is cut
        shutil.copy(Path(str(bert_tiny) + ".data"), Path(str(model) + ".data"))
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("devices:\n" + GOOD_DEVICE)
    args = (["plan", str(model), "--cluster", str(cluster), "--out", str(tmp_path / "o")]
            if command == "plan" else ["profile", str(model)])
    r = edge_cli(*args)
    assert_refused(r, str(model), "not an ONNX model", "expected")
