"""Small defects found by using edge as a new user would, and by attacking it (issue 12)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edge.errors import GraphError
from edge.export.zoo import locate
from edge.planning.graph import analyze
from edge.worker.cache import ShardCache, UploadError


def edge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge", *args], capture_output=True,
                          text=True, timeout=120)


def test_digest_with_a_trailing_newline_is_refused(tmp_path):
    cache = ShardCache(tmp_path)
    good = "a" * 64
    assert cache.path(good).name == good
    with pytest.raises(UploadError, match="64 lowercase hex digits"):
        cache.path(good + "\n")


def test_partial_uploads_of_a_killed_worker_are_removed_at_start(tmp_path):
    stale = tmp_path / ".incoming-abc123"
    stale.write_bytes(b"\0" * 1024)
    kept = tmp_path / ("b" * 64)
    kept.write_bytes(b"shard")
    ShardCache(tmp_path)
    assert not stale.exists()
    assert kept.exists()


@pytest.mark.parametrize("args, words", [
    (["worker", "--threads", "0"], "--threads: expected a whole number > 0, got '0'"),
    (["worker", "--memory-budget", "-5"], "--memory-budget: expected a number > 0, got '-5'"),
    (["worker", "--max-queue", "x"], "--max-queue: expected a whole number > 0, got 'x'"),
])
def test_nonsense_numbers_are_refused(args, words):
    run = edge(*args)
    assert run.returncode == 2
    assert words in run.stderr


def test_version_and_log_level_after_the_command():
    run = edge("--version")
    assert run.returncode == 0 and run.stdout.startswith("edge ")
    run = edge("devices", "--log-level", "DEBUG")
    assert run.returncode == 0, run.stderr


def test_a_dim_the_model_does_not_have_is_an_error():
    path = locate("ppocr-cls")
    with pytest.raises(GraphError, match=r"--dim hieght: expected dims of the model's inputs "
                                         r"\(x:0, x:2, x:3\)"):
        analyze(path, {"x:2": 48, "x:3": 192, "hieght": 5})
