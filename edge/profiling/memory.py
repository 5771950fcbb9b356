"""Memory and device facts of the current process and machine (psutil, /proc)."""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys

import psutil

__all__ = ["rss_bytes", "peak_rss_bytes", "device_facts", "tune_malloc"]

log = logging.getLogger(__name__)


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size now."""
    return psutil.Process(pid).memory_info().rss


def peak_rss_bytes(pid: int | None = None) -> int:
    """Peak resident set size (``VmHWM``) of a process.

    ``ru_maxrss`` of a child started by subprocess can report the parent's peak, so read the
    kernel's high-water mark instead.
    """
    path = f"/proc/{pid or 'self'}/status"
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss_bytes(pid)  # not Linux: the best we can do


def device_facts() -> dict:
    """What psutil and platform know about this machine."""
    freq = psutil.cpu_freq()
    vm = psutil.virtual_memory()
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:  # pragma: no cover
        ort_version = ""
    return dict(
        hostname=platform.node(),
        machine=platform.machine(),
        system=f"{platform.system()} {platform.release()}",
        cpu_count=psutil.cpu_count() or 0,
        cpu_freq_mhz=float(freq.current) if freq else 0.0,
        memory_total_bytes=vm.total,
        memory_available_bytes=vm.available,
        python=sys.version.split()[0],
        onnxruntime=ort_version,
    )


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc() -> bool:
    """Keep glibc from returning large buffers to the kernel after every message.

    With glibc's defaults every activation-sized protobuf buffer is mmap'd and unmapped, and
    encoding a 393 KB activation took 1.1–1.5 ms; with these thresholds, 70 µs
    (ONNX-NOTES.md). Same effect as MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ in the
    environment, but it also works once the process is running.

    Returns:
        True if glibc accepted the settings.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 64 << 20) == 1
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20) == 1
        return bool(ok)
    except (OSError, AttributeError):
        log.debug("mallopt not available; keeping the allocator's defaults")
        return False
