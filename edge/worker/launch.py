"""Starting `edge worker` processes on this machine: for the demo, tests and benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["WorkerProcess", "spawn_worker", "LocalWorkers", "stop_process", "module_command",
           "wait_port_file"]

# `python -m edge` puts the current folder first on sys.path. Run from a folder that holds
# the clone as `edge/` (the Quick start's layout), that folder is imported as a namespace
# package `edge` that shadows the installed one: the worker still starts, through the
# editable finder, but `edge.__version__` is missing and every status call fails. `-P`
# (PYTHONSAFEPATH) would drop the folder, but only from Python 3.11; we support 3.10.
# `-c` puts '' (the current folder) first instead; the code removes it before importing.
_RUN_MODULE = (
    "import runpy, sys\n"
    "if not getattr(sys.flags, 'safe_path', False) and sys.path[:1] == ['']:\n"
    "    del sys.path[0]\n"
    "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)\n")


def module_command(module: str, *args: str) -> list[str]:
    """``python -m MODULE ARGS`` with this interpreter, without the current folder on
    ``sys.path``, so a folder named like the package cannot shadow it.

    Args:
        module: e.g. ``edge`` or ``edge.bench.torch_peer``.
        args: its arguments.
    """
    return [sys.executable, "-c", _RUN_MODULE, module, *args]


def stop_process(process: subprocess.Popen, timeout: float) -> int:
    """SIGTERM (a worker then stops its server gracefully), SIGKILL if it takes longer
    than ``timeout`` seconds. Returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def wait_port_file(process: subprocess.Popen, port_file: Path, timeout: float, what: str,
                   log_path: Path) -> int:
    """Wait until ``process`` (an ``edge worker`` or ``edge coordinator`` started with
    ``--port-file``) writes its port, and return it.

    Args:
        process: the process.
        port_file: the file its port is written to once it listens.
        timeout: seconds to wait; past them the process is killed.
        what: what it is, for the errors ("worker w0").
        log_path: its output, quoted when it exits.

    Raises:
        RuntimeError: it exited first (with its log).
        TimeoutError: it did not listen in time.
    """
    end = time.monotonic() + timeout
    while not port_file.exists():
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n"
                               f"{log_path.read_text(errors='replace')[-4000:]}")
        if time.monotonic() > end:
            process.kill()
            raise TimeoutError(f"{what} did not listen within {timeout:g} s")
        time.sleep(0.05)
    return int(port_file.read_text())


@dataclass
class WorkerProcess:
    process: subprocess.Popen
    port: int
    cache_dir: Path
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL if it does not stop in time. Returns the exit code."""
        return stop_process(self.process, timeout)

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except OSError:
            return ""


def spawn_worker(workdir: Path, name: str, device: str | None = None,
                 threads: int | None = None, port: int = 0, cache_dir: Path | None = None,
                 extra_args: list[str] | None = None, timeout: float = 60.0,
                 announce: bool = False) -> WorkerProcess:
    """Start ``edge worker`` on loopback and wait until it listens.

    Args:
        workdir: where its port file, log and (by default) shard cache go.
        name: a label for those files.
        device: its device profile.
        threads: onnxruntime threads.
        port: 0 lets the OS choose.
        cache_dir: shard cache (default ``workdir/cache-NAME``), reuse it to test restarts.
        extra_args: more `edge worker` arguments.
        timeout: seconds to wait for it to listen.
        announce: announce it by mDNS (off by default: the demo's, tests' and benchmarks'
            workers on loopback are nobody else's business, and zeroconf adds about 3.3 MiB
            to a worker's RSS that memory measurements should not see).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / f"{name}.port"
    port_file.unlink(missing_ok=True)
    cache_dir = cache_dir or workdir / f"cache-{name}"
    log_path = workdir / f"{name}.log"
    cmd = module_command("edge", "--log-level", os.environ.get("EDGE_LOG", "INFO"),
                         "worker", "--listen", f"127.0.0.1:{port}", "--port-file", str(port_file),
                         "--cache-dir", str(cache_dir))
    if device:
        cmd += ["--device", device]
    if threads:
        cmd += ["--threads", str(threads)]
    if not announce:
        cmd.append("--no-announce")
    cmd += extra_args or []
    with open(log_path, "ab") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    port = wait_port_file(process, port_file, timeout, f"worker {name}", log_path)
    return WorkerProcess(process, port, cache_dir, log_path)


class LocalWorkers:
    """N workers on loopback, stopped on exit.

    Args:
        count: how many.
        workdir: where their files go.
        device: profile for all of them.
        threads: onnxruntime threads each.
    """

    def __init__(self, count: int, workdir: Path, device: str | None = None,
                 threads: int | None = None):
        self.count, self.workdir, self.device, self.threads = count, Path(workdir), device, threads
        self.workers: list[WorkerProcess] = []

    def __enter__(self) -> "LocalWorkers":
        try:
            for i in range(self.count):
                self.workers.append(spawn_worker(self.workdir, f"worker-{i}", self.device,
                                                 self.threads))
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        for w in self.workers:
            w.stop()

    @property
    def addresses(self) -> list[str]:
        return [w.address for w in self.workers]
