"""`edge demo`, the main job, as a user runs it (a tiny model so that it is quick)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


@pytest.mark.parametrize("modes", [None, "int8"])
def test_demo_runs_and_checks_its_outputs(tmp_path, modes):
    cmd = [sys.executable, "-m", "edge", "demo", "--size", "tiny", "--devices", "3",
           "--requests", "6", "--concurrency", "3", "--sequence", "32",
           "--workdir", str(tmp_path)]
    if modes:
        cmd += ["--modes", modes]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    # a row per device with its mode, then the end-to-end figures
    rows = re.findall(r"│\s+(\d)\s+│\s+rpi4b-2gb-\d\s+│.*?│\s+(fp32|int8)\s+│", out)
    assert [s for s, _ in rows] == ["0", "1", "2"]
    assert {m for _, m in rows} == {modes or "fp32"}
    assert "pipeline throughput" in out and "unsharded onnxruntime" in out
    diff = float(re.search(r"max \|sharded − unsharded\| = ([0-9.e+-]+)", out).group(1))
    if modes == "int8":
        cos = float(re.search(r"least cosine similarity ([0-9.]+) \(OK", out).group(1))
        assert 0.99 <= cos <= 1.0 and diff > 1e-6
    else:
        assert diff <= 1e-4 and "(OK: tolerance" in out
