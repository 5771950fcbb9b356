"""The worker's shard cache: files named by their sha256, so a restarted worker needs no
new upload and no name that arrives over the wire can point outside the cache."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable

__all__ = ["ShardCache", "UploadError", "default_cache_dir", "file_sha256"]

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class UploadError(Exception):
    """An upload was refused. ``kind`` is 'invalid' (bad request) or 'corrupt' (bad data)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def default_cache_dir() -> Path:
    env = os.environ.get("EDGE_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edge" / "shards"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class ShardCache:
    """Shards on disk, by digest.

    Args:
        root: the cache folder; created if missing.
        max_shard_bytes: largest upload accepted.
    """

    def __init__(self, root: Path, max_shard_bytes: int = 8 << 30):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes

    def path(self, sha256: str) -> Path:
        """Where the shard with this digest lives. Only a 64-hex-digit name is accepted."""
        if not _SHA256.match(sha256 or ""):
            raise UploadError("invalid", f"expected a sha256 as 64 lowercase hex digits, "
                                         f"got {sha256!r}")
        return self.root / f"{sha256}.onnx"

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
                not match it (truncated, too long, other digest).
        """
        final = self.path(sha256)
        if size <= 0 or size > self.max_shard_bytes:
            raise UploadError("invalid", f"shard size must be 1..{self.max_shard_bytes} "
                                         f"bytes, got {size}")
        h = hashlib.sha256()
        got = 0
        fd, tmp = tempfile.mkstemp(prefix=".incoming-", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as f:
                for block in chunks:
                    got += len(block)
                    if got > size:
                        raise UploadError("corrupt", f"upload longer than announced: "
                                                     f"expected {size} bytes, got more")
                    h.update(block)
                    f.write(block)
            if got != size:
                raise UploadError("corrupt", f"upload truncated: expected {size} bytes, "
                                             f"got {got}")
            digest = h.hexdigest()
            if digest != sha256:
                raise UploadError("corrupt", f"shard data does not match its sha256: expected "
                                             f"{sha256}, got {digest}")
            os.replace(tmp, final)
            log.info("cached shard %s (%d bytes)", sha256[:12], size)
            return final
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
