"""`edge calibrate` measures a live worker and writes the numbers into the device profile."""

from __future__ import annotations

import shutil
import subprocess
import sys

from edge.planning.cluster import load_profile, profiles_dir
from edge.worker.launch import spawn_worker


def test_calibrate_writes_measured_numbers_into_the_profile(tmp_path):
    profile = tmp_path / "rpi4b-2gb.yaml"
    shutil.copy(profiles_dir() / "rpi4b-2gb.yaml", profile)
    before = load_profile(profile)
    w = spawn_worker(tmp_path, "w", device=str(profile))
    try:
        r = subprocess.run([sys.executable, "-m", "edge", "calibrate", "--worker", w.address,
                            "--seconds", "0.5", "--link-rounds", "2", "--write"],
                           capture_output=True, text=True, timeout=120)
    finally:
        w.stop()
    assert r.returncode == 0, r.stderr
    assert "runtime floor" in r.stdout and "GFLOP/s" in r.stdout
    after = load_profile(profile)
    assert after.gflops > 1 and after.gflops != before.gflops
    assert 20 < after.runtime_floor_mb < 200
    assert after.bandwidth_mbps > 0
    assert after.memory_budget_mb == before.memory_budget_mb  # untouched fields stay
    text = profile.read_text()
    assert text.count("measured by edge calibrate") == 3
    assert "# vendor spec" in text  # other comments are kept
