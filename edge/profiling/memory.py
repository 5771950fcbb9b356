"""Memory and device facts of the current process and machine (psutil, /proc)."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import sys

import psutil

__all__ = ["rss_bytes", "peak_rss_bytes", "memory_breakdown", "heap_in_use", "device_facts",
           "tune_malloc", "release_free_heap", "release_file_pages"]

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


def memory_breakdown(pid: int | None = None) -> dict[str, int]:
    """RSS split by the kernel into anonymous and file-backed memory, plus the peak, in bytes.

    File-backed pages (code, memory-mapped weights) can be dropped and re-read by the
    kernel under pressure; anonymous ones (heap, arena, copied weights) cannot.

    Returns:
        rss, rss_anon, rss_file, peak_rss (zeros for fields the kernel does not give).
    """
    out = dict.fromkeys(_STATUS_FIELDS.values(), 0)
    try:
        # One read of the whole file and a scan of its bytes: the sampler calls this four
        # times a second on a board whose CPU the stage's compute needs (a line-by-line
        # text read cost about 0.2 ms of a loaded worker's CPU per sample).
        fd = os.open(f"/proc/{pid or 'self'}/status", os.O_RDONLY)
        try:
            text = os.read(fd, 1 << 16)
        finally:
            os.close(fd)
    except OSError:
        rss = rss_bytes(pid)
        out.update(rss=rss, rss_anon=rss, peak_rss=rss)
    else:
        for key, name in _STATUS_FIELDS.items():
            at = text.find(key)
            if at >= 0:
                end = text.find(b"\n", at + 1)
                out[name] = int(text[at + len(key):end if end >= 0 else None].split()[0]) * 1024
    out["rss_file"] += out.pop("rss_shmem")
    return out


# /proc/PID/status lines read by memory_breakdown (each at the start of its line).
_STATUS_FIELDS = {b"\nVmRSS:": "rss", b"\nRssAnon:": "rss_anon", b"\nRssFile:": "rss_file",
                  b"\nRssShmem:": "rss_shmem", b"\nVmHWM:": "peak_rss"}


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def heap_in_use() -> int:
    """Bytes the C heap has handed out (glibc ``mallinfo2``): onnxruntime's CPU arena and
    every tensor it allocates live here. 0 where glibc does not say."""
    fn = _mallinfo2()
    if fn is None:
        return 0
    info = fn()
    return int(info.uordblks + info.hblkhd)


@functools.lru_cache(maxsize=1)
def _mallinfo2():
    """glibc's ``mallinfo2``, looked up once (the sampler asks four times a second), or
    None where there is none."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


def device_facts() -> dict:
    """What psutil and platform know about this machine."""
    freq = psutil.cpu_freq()
    vm = psutil.virtual_memory()
    try:  # only for its version, when asked: the transport imports this module
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
_M_ARENA_MAX = -8

# malloc arenas a tuned process may have. glibc gives threads their own arenas (up to 8 per
# core), and each keeps the free memory of the buffers its thread once held: a live
# BERT-base worker (gRPC handler threads decoding requests, a compute thread, a send
# thread, onnxruntime's pool) peaked 13-22 MiB higher than with one arena
# (benchmarks/worker_overhead.py), at no measurable cost in throughput.
MALLOC_ARENAS = 1


def tune_malloc() -> bool:
    """Keep glibc from returning large buffers to the kernel after every message, and from
    keeping a heap per thread.

    With glibc's defaults every activation-sized protobuf buffer is mmap'd and unmapped, and
    encoding a 393 KB activation took 1.1–1.5 ms; with these thresholds, 70 µs (measured
    on x86-64, grpcio 1.85). Same effect as MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ /
    MALLOC_ARENA_MAX in the environment (which win over these settings), but it also works
    once the process is running. Call it before the process starts its threads: a thread
    that already has an arena keeps it.

    Returns:
        True if glibc accepted the settings.
    """
    # Messages up to 16 MiB reuse heap instead of a fresh mmap each; up to 32 MiB of free
    # heap may stay with the process before glibc trims it (256 MiB would let a 512 MB
    # board keep a quarter of its memory as free heap).
    settings = [("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD, 16 << 20),
                ("MALLOC_TRIM_THRESHOLD_", _M_TRIM_THRESHOLD, 32 << 20),
                ("MALLOC_ARENA_MAX", _M_ARENA_MAX, MALLOC_ARENAS)]
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        log.debug("mallopt not available; keeping the allocator's defaults")
        return False
    ok = True
    for env, param, value in settings:
        if not os.environ.get(env):
            ok &= mallopt(param, value) == 1
    return bool(ok)


def release_free_heap() -> None:
    """Give free heap back to the kernel (``malloc_trim``): after loading a shard, the
    parser's and optimizer's temporary buffers would otherwise stay resident."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_MADV_DONTNEED = 4


def _unwritten_file_mappings(smaps: str = "/proc/self/smaps") -> list[tuple[int, int, int]]:
    """(start, end, resident KiB) of this process's read-only private mappings of regular
    files that hold no anonymous (copied-on-write) page: code and constant data of the
    shared libraries, whose every resident page is a clean copy of the file."""
    out, cur = [], None
    with open(smaps) as f:
        for line in f:
            head = line.split()
            if not head:
                continue
            if "-" in head[0] and not head[0].endswith(":"):
                # address perms offset dev inode path
                cur = None
                if (len(head) == 6 and head[1] in ("r--p", "r-xp") and head[4] != "0"
                        and head[5].startswith("/") and not head[5].startswith("/dev/")):
                    start, end = (int(x, 16) for x in head[0].split("-"))
                    cur = [start, end, 0, 0]
                    out.append(cur)
            elif cur is not None and head[0] in ("Rss:", "Anonymous:", "Locked:"):
                if head[0] == "Rss:":
                    cur[2] = int(head[1])
                elif int(head[1]):
                    cur[3] = 1  # an anonymous or locked page: leave the whole mapping
    return [(s, e, rss) for s, e, rss, keep in out if rss and not keep]


def release_file_pages() -> int:
    """Unmap from this process the resident pages of its shared libraries' code and
    read-only data (``MADV_DONTNEED``); the pages it still runs fault back in from the
    page cache.

    Importing onnxruntime, gRPC and numpy, and loading a shard, touch many pages that
    serving never does again (onnxruntime's graph optimizers and model parser, gRPC's
    and OpenSSL's set-up code): a BERT-base worker's RSS held 48 MiB of file pages, of
    which serving uses 22-24. Only clean file pages are dropped: read-only private
    mappings of regular files (no ``(deleted)`` ones, no devices) without a single
    anonymous or locked page, so no content is lost, and the pages stay in the page cache
    for the next fault. Writable mappings (onnxruntime's mapped weights, library data)
    are left alone. ``MADV_PAGEOUT`` would be kinder to the page cache but skips pages
    other processes map too (every library page, on loopback), so it freed nothing.

    Returns:
        Bytes unmapped (0 where madvise or /proc/self/smaps is not available).
    """
    try:
        ranges = _unwritten_file_mappings()
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    dropped = 0
    for start, end, rss_kib in ranges:
        if madvise(start, end - start, _MADV_DONTNEED) == 0:
            dropped += rss_kib << 10
    return dropped
