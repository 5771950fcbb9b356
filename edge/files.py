"""File helpers every part of edge shares: the planner, the coordinator and the worker.

Standard library only: the worker imports this, and workers stay light.
"""

from __future__ import annotations

import hashlib
import os

__all__ = ["file_sha256"]

_BLOCK = 1 << 20  # 1 MiB: large enough to hash at disk speed, small enough for a 1 GB board


def file_sha256(path: str | os.PathLike[str], chunk: int = _BLOCK) -> str:
    """The sha256 of a file's bytes, as 64 lowercase hex digits, read a block at a time
    (shards and models can be larger than a board's memory).

    Args:
        path: the file.
        chunk: bytes read per block.

    Raises:
        OSError: the file cannot be read.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
