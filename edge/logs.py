"""How edge's logs are written: plain lines with a timestamp on a terminal, syslog
priorities without a timestamp under journald, or one JSON object per line.

journald adds its own timestamp and reads a ``<N>`` prefix as the line's priority
(``SyslogLevelPrefix=``, on by default), so ``journalctl -p warning`` works. It tells a
process that its stderr goes to the journal through ``$JOURNAL_STREAM``
(``DEVICE:INODE`` of that stream): compared with stderr's own, so a shell started from a
service (whose children inherit the variable but not the stream) still gets timestamps.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from typing import TextIO

__all__ = ["LOG_FORMATS", "configure_logging", "under_journald", "JournalFormatter",
           "JsonFormatter"]

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# syslog priorities (sd-daemon.h): what journald reads from a line's "<N>" prefix.
_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
             (logging.INFO, 6), (logging.DEBUG, 7))


def _priority(levelno: int) -> int:
    for level, prio in _PRIORITY:
        if levelno >= level:
            return prio
    return 7


def under_journald(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default stderr) is the journal stream ``$JOURNAL_STREAM`` names.

    Args:
        stream: the stream logs go to.
    """
    value = os.environ.get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError, AttributeError):  # no fileno (a test's StringIO), bad value
        return False


class JournalFormatter(logging.Formatter):
    """``<N>logger: message``: journald supplies the time, ``N`` is the priority. Each
    line of a traceback gets the same prefix, so it stays one priority in the journal."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        prefix = f"<{_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.splitlines() or [""])


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC, ISO 8601), ``level``, ``logger``,
    ``message``, and ``exc`` with the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
               .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
               "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: str, fmt: str = "text", stream: TextIO | None = None) -> None:
    """Set up the root logger once, for the command line.

    Args:
        level: a logging level name (``INFO``, ``warning``, ...).
        fmt: ``text`` (a timestamp, or journald's priority prefix under journald) or
            ``json``.
        stream: where logs go (default stderr).

    Raises:
        ValueError: an unknown level or format, naming what is accepted.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"--log-format / $EDGE_LOG_FORMAT: expected {' or '.join(LOG_FORMATS)}"
                         f", got {fmt!r}")
    levels = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    if not isinstance(logging.getLevelName(level.upper()), int):  # WARN, FATAL pass too
        raise ValueError(f"--log-level / $EDGE_LOG: expected one of {', '.join(levels)}, "
                         f"got {level!r}")
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif under_journald(stream):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    # Not forced: a second call (tests calling main() again) keeps the first set-up.
    logging.basicConfig(level=level.upper(), handlers=[handler])
