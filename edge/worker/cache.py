"""The worker's shard cache: files named by their sha256, so a restarted worker needs no
new upload and no name that arrives over the wire can point outside the cache.

A stage is an ``.onnx`` plus the external-data files it references by name. onnxruntime
resolves those names next to the ``.onnx``, so :meth:`ShardCache.stage_dir` lays out a
folder of hard links with the referenced names, after checking every name is a plain
file name.
"""

from __future__ import annotations

import hashlib
import logging
import os
import errno
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from edge.errors import EdgeError
from edge.files import file_sha256 as _file_sha256

__all__ = ["ShardCache", "UploadError", "CacheError", "default_cache_dir", "file_sha256", "drop_page_cache"]

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# What an .onnx may call its data files: no folders, no "..", nothing hidden.
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}$")


class UploadError(EdgeError):
    """A cache operation was refused. ``kind`` is 'invalid' (bad request), 'corrupt' (data
    that does not match its digest or size), 'missing' (not uploaded yet), 'exhausted'
    (larger than this cache takes, or the disk is full) or 'unwritable' (the cache folder
    cannot be written: permissions, a read-only filesystem)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class CacheError(EdgeError):
    """The cache folder cannot be created or used at all; the worker cannot start."""


def _os_error(e: OSError, doing: str) -> UploadError:
    """An OSError of a cache operation as a one-line UploadError of the right kind."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return UploadError("exhausted", f"cannot {doing}: the cache's disk is full "
                                        f"({e.strerror})")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UploadError("unwritable", f"cannot {doing}: {e.strerror} ({e.filename}); "
                                         "give the worker a writable --cache-dir")
    return UploadError("unwritable", f"cannot {doing}: {e.strerror or e} "
                                     f"({e.filename or 'the shard cache'})")


def default_cache_dir() -> Path:
    env = os.environ.get("EDGE_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edge" / "shards"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """``edge.files.file_sha256``, then drop the pages read from the kernel's cache
    (see ``drop_page_cache``): hashing a shard must not leave it resident."""
    digest = _file_sha256(path, chunk)
    drop_page_cache(path)
    return digest


def drop_page_cache(path: Path) -> None:
    """Write a file out and ask the kernel to forget its cached pages.

    Pages a process has just written or read stay cached in large folios, and a mapped
    embedding table then faults in whole folios: 128 looked-up rows made 72-86 of its
    89 MiB resident (benchmarks/shard_memory_modes.py). Dropped, the table comes back a
    page at a time, only where rows are read.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


class ShardCache:
    """Shards on disk, by digest.

    Args:
        root: the cache folder; created if missing.
        max_shard_bytes: largest upload accepted.
    """

    def __init__(self, root: Path, max_shard_bytes: int = 8 << 30):
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"cannot create the shard cache {self.root}: {e.strerror}; "
                             "pass a writable --cache-dir") from None
        if not self.root.is_dir():
            raise CacheError(f"the shard cache {self.root} is not a folder; pass a folder "
                             "as --cache-dir")
        if not os.access(self.root, os.W_OK | os.X_OK):
            # Shards cached already can still be served; uploads will be refused.
            log.warning("the shard cache %s is not writable: uploads will be refused",
                        self.root)
        self.max_shard_bytes = max_shard_bytes
        # Uploads cut short by a killed worker: only this worker writes here, and it has
        # just started, so none of them is in progress (3 kills left 117 MiB of them).
        for stale in self.root.glob(".incoming-*"):
            try:
                stale.unlink()
                log.info("removed a partial upload left by an earlier run: %s", stale.name)
            except OSError as e:
                log.warning("cannot remove partial upload %s: %s", stale, e)

    def path(self, sha256: str) -> Path:
        """Where the shard with this digest lives. Only a 64-hex-digit name is accepted."""
        if not _SHA256.fullmatch(sha256 or ""):
            raise UploadError("invalid", f"expected a sha256 as 64 lowercase hex digits, "
                                         f"got {sha256!r}")
        return self.root / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def receive(self, sha256: str, size: int, chunks: Iterable[bytes]) -> Path:
        """Write an upload, check its size and digest, and move it into place atomically.

        Args:
            sha256: the digest the data must have.
            size: the number of bytes announced.
            chunks: the data.

        Raises:
            UploadError: with kind 'invalid' for a bad header, 'corrupt' for data that does
                not match it (truncated, too long, other digest), 'exhausted' for a size
                larger than the cache takes or the disk has room for.
        """
        final = self.path(sha256)
        if size <= 0:
            raise UploadError("invalid", f"shard size must be 1..{self.max_shard_bytes} "
                                         f"bytes, got {size}")
        if size > self.max_shard_bytes:
            raise UploadError("exhausted", f"shard of {size} bytes is larger than this worker "
                                           f"takes; expected at most {self.max_shard_bytes}")
        try:
            free = shutil.disk_usage(self.root).free
        except OSError as e:
            raise _os_error(e, "read the cache's free space") from None
        if size > free:
            raise UploadError("exhausted", f"shard of {size} bytes does not fit: the cache's "
                                           f"disk has {free} bytes free")
        h = hashlib.sha256()
        got = 0
        try:
            fd, tmp = tempfile.mkstemp(prefix=".incoming-", dir=self.root)
        except OSError as e:
            raise _os_error(e, f"store shard {sha256[:12]}") from None
        try:
            try:
                with os.fdopen(fd, "wb") as f:
                    for block in chunks:
                        got += len(block)
                        if got > size:
                            raise UploadError("corrupt", f"upload longer than announced: "
                                                         f"expected {size} bytes, got more")
                        h.update(block)
                        f.write(block)
            except OSError as e:
                raise _os_error(e, f"store shard {sha256[:12]} after {got} of {size} "
                                   "bytes") from None
            if got != size:
                raise UploadError("corrupt", f"upload truncated: expected {size} bytes, "
                                             f"got {got}")
            digest = h.hexdigest()
            if digest != sha256:
                raise UploadError("corrupt", f"shard data does not match its sha256: expected "
                                             f"{sha256}, got {digest}")
            try:
                os.replace(tmp, final)
            except OSError as e:
                raise _os_error(e, f"store shard {sha256[:12]}") from None
            drop_page_cache(final)
            log.info("cached shard %s (%d bytes)", sha256[:12], size)
            return final
        finally:
            if os.path.exists(tmp):
                try:
                    os.unlink(tmp)
                except OSError:
                    pass  # removed at the next start

    def stage_dir(self, shard_sha256: str, data_files: Iterable[tuple[str, str]]) -> Path:
        """A folder where the stage's ``.onnx`` sits next to its data files under the names
        it references them by (hard links into the cache).

        Args:
            shard_sha256: digest of the ``.onnx``.
            data_files: (name, sha256) of each data file.

        Returns:
            The path of the ``.onnx`` inside that folder.

        Raises:
            UploadError: 'invalid' for a name that is not a plain file name or a digest that
                is not one; 'missing' for a file the cache lacks.
        """
        files = sorted(data_files)
        key = hashlib.sha256(repr((shard_sha256, files)).encode()).hexdigest()[:24]
        folder = self.root / "stages" / key
        wanted = {"model.onnx": self.path(shard_sha256)}
        for name, sha in files:
            if not _FILE_NAME.fullmatch(name) or name == "model.onnx":
                raise UploadError("invalid", f"data file name must be a plain file name, "
                                             f"got {name!r}")
            if name in wanted:
                raise UploadError("invalid", f"data file {name!r} listed twice; expected "
                                             "each name once")
            wanted[name] = self.path(sha)
        missing = [f"{name} ({source.name[:12]})" for name, source in wanted.items()
                   if not source.is_file()]
        if missing:
            raise UploadError("missing", f"not in this worker's cache: {', '.join(missing)}; "
                                         "upload them first")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for name, source in wanted.items():
                link = folder / name
                if link.exists() and os.path.samefile(link, source):
                    continue
                link.unlink(missing_ok=True)
                try:
                    os.link(source, link)
                except OSError as e:
                    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
                                   errno.EDQUOT):
                        raise
                    os.symlink(source, link)  # a filesystem without hard links
        except OSError as e:
            raise _os_error(e, f"lay out the files of shard {shard_sha256[:12]}") from None
        return folder / "model.onnx"
