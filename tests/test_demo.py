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


def test_text_demo_streams_shows_kv_and_equals_transformers(tmp_path):
    """`edge demo --model smollm2` with its hidden test model: the tiny seeded Llama
    (token ids, no tokenizer) over 3 rpi-zero-2w workers. The real SmolLM2 run takes
    minutes; it is a manual check (README: Generating text)."""
    cmd = [sys.executable, "-m", "edge", "demo", "--model", "llama-tiny", "--devices", "3",
           "--max-tokens", "12", "--workdir", str(tmp_path)]
    env = {**os.environ, "COLUMNS": "220"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "exported llama-tiny" in out
    # the plan table has the generation columns, and the line with the settings
    assert "KV cache MiB" in out and "decode" in out
    assert "generation: context 64 tokens" in out and "1 sequence(s)" in out
    # one row per device: planned MiB, planned KV, peak RSS and the measured KV caches
    rows = re.findall(r"│\s+(\d)\s+│\s+rpi-zero-2w-\d\s+│[^│]+│\s+(\d+)\s+│\s+([0-9.e-]+)\s+│"
                      r"\s+(\d+)\s+│\s+([0-9.e-]+) \((\d) seq\)", out)
    assert [row[0] for row in rows] == ["0", "1", "2"]
    assert all(float(peak) > 0 for *_, peak, _, _ in rows)
    assert any(int(seqs) == 1 and float(kv) > 0 for *_, kv, seqs in rows)
    assert re.search(r"time to first token \d+ ms, [0-9.]+ tokens/s", out)
    assert "equal transformers' greedy generate" in out and "(OK)" in out
    # a second run takes the export from the work folder
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "using the export cached in" in again.stdout
