"""The memory sampler's readings: the same as the kernel's and psutil's, at a fraction of
their cost (a worker takes ten samples a second on a board that needs its CPU)."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from edge.profiling.memory import heap_in_use, memory_breakdown
from edge.profiling.sampler import Sampler

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _status_by_lines(pid: int) -> dict[str, int]:
    """/proc/PID/status the slow, obvious way: the reference."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            out[key] = int(rest.split()[0]) * 1024 if rest.strip().endswith("kB") else rest
    return out


def test_memory_breakdown_reads_what_the_kernel_says():
    # A sleeping child: its memory holds still while both readings are taken.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.3)
        got = memory_breakdown(child.pid)
        want = _status_by_lines(child.pid)
    finally:
        child.kill()
        child.wait()
    assert got == {"rss": want["VmRSS"], "rss_anon": want["RssAnon"],
                   "rss_file": want["RssFile"] + want["RssShmem"], "peak_rss": want["VmHWM"]}
    assert got["rss"] > 0


def test_heap_in_use_counts_an_allocation():
    before = heap_in_use()
    block = np.ones(16 << 20, dtype=np.uint8)  # 16 MiB, from the C heap (mmapped)
    during = heap_in_use()
    del block
    assert during - before >= 15 << 20


def test_cpu_percent_of_a_busy_and_an_idle_spell():
    sampler = Sampler(interval_s=60)  # sampled by hand here, not by its thread
    sampler.sample()
    end = time.process_time() + 0.3
    while time.process_time() < end:  # one core busy
        pass
    busy = sampler.sample().cpu_percent
    time.sleep(0.3)
    idle = sampler.sample().cpu_percent
    assert busy > 30, busy  # 0.3 s of CPU within at most 1 s of a shared machine
    assert idle < 20, idle
