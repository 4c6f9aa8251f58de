"""One line per event, ``key=value`` fields, on stderr (journald captures it).

Under systemd with stderr connected to the journal, each line starts with its sd-daemon(3)
priority (``<4>ts=... level=warning ...``): journald strips the prefix and files the line at that
priority, so ``journalctl -p warning`` shows logpipe's warnings and errors. Anywhere else (a
terminal, a pipe, a ``--daemon`` log file) lines are plain.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

_LOGGER = logging.getLogger("logpipe")

# syslog's notice (5), which Python lacks: normal but significant, such as an alert's recovery
# (logpipe/alert.py), so `journalctl -p notice` shows it without the info lines.
NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")

# Python level -> sd-daemon priority (the syslog numbers). Highest threshold first; anything
# below INFO is debug.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (NOTICE, 5),
               (logging.INFO, 6))
_DEBUG_PRIORITY = 7


def priority(levelno: int) -> int:
    """The sd-daemon priority for a Python logging level (ERROR -> 3, WARNING -> 4, ...)."""
    for threshold, prio in _PRIORITIES:
        if levelno >= threshold:
            return prio
    return _DEBUG_PRIORITY


def is_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """True when ``stream`` is the journal stream systemd connected us to.

    systemd sets ``JOURNAL_STREAM=<st_dev>:<st_ino>`` of the stdout/stderr socket it hands over
    (systemd.exec(5)). The variable is inherited by children whose stderr was redirected
    elsewhere (a pipe, a ``--daemon`` log file), so it only counts when the stream's own
    device and inode match.
    """
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (ValueError, OSError, AttributeError):
        # Not a number, or a stream without a file descriptor (pytest's capture): not journal.
        return False


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.3f}".rstrip("0").rstrip(".") if value == value else "nan"
    else:
        text = str(value)
    if text == "" or any(c in text for c in ' ="\n\t'):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=... event=... key=value ...``; with ``journal`` the line starts with its
    sd-daemon priority."""

    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [f"ts={ts}.{int(record.msecs):03d}Z", f"level={record.levelname.lower()}"]
        if record.name == _LOGGER.name or record.name.startswith(_LOGGER.name + "."):
            parts.append(f"event={record.getMessage()}")
        else:
            # A client library's own record (elastic_transport's "Node ... has failed"): its
            # free text goes into one quoted field so the line still parses as key=value.
            parts += ["event=library", f"logger={_fmt_value(record.name)}",
                      f"message={_fmt_value(record.getMessage())}"]
        fields: dict[str, Any] = getattr(record, "fields", {})
        parts.extend(f"{k}={_fmt_value(v)}" for k, v in fields.items())
        if record.exc_info and record.exc_info[1] is not None:
            parts.append(f"error={_fmt_value(repr(record.exc_info[1]))}")
        line = " ".join(parts)
        return f"<{priority(record.levelno)}>{line}" if self.journal else line


def prefix(levelno: int, stream: TextIO | None = None) -> str:
    """The priority prefix for a plain message written straight to ``stream`` (default stderr),
    e.g. ``print(log.prefix(logging.ERROR) + "logpipe: config error: ...", file=sys.stderr)``;
    empty when the stream is not the journal."""
    return f"<{priority(levelno)}>" if is_journal(stream or sys.stderr) else ""


def setup(level: str = "INFO") -> None:
    """Log to the current stderr (call again after it was redirected, as ``--daemon`` does)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter(journal=is_journal(sys.stderr)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Client libraries are chatty at INFO (every HTTP request); keep their warnings.
    for noisy in ("elastic_transport", "elasticsearch", "urllib3", "faker"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def event(name: str, level: int = logging.INFO, exc_info: bool = False, **fields: Any) -> None:
    """Log one event: ``event("batch_committed", docs=500, partitions=3)``."""
    _LOGGER.log(level, name, extra={"fields": fields}, exc_info=exc_info)


def warning(name: str, **fields: Any) -> None:
    event(name, logging.WARNING, **fields)


def error(name: str, exc_info: bool = False, **fields: Any) -> None:
    event(name, logging.ERROR, exc_info=exc_info, **fields)


class Throttle:
    """At most one line per key every ``interval_s``: an outage makes librdkafka report the same
    failure every ~50 ms (each reconnect), which would bury everything else in the journal.

    ``held(key)`` returns None when the line must be dropped, else how many lines of that key
    were dropped since the last one that went out (to log as ``repeated=N``).
    """

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last: dict[object, float] = {}
        self._dropped: dict[object, int] = {}

    def held(self, key: object) -> int | None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._dropped[key] = self._dropped.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._dropped.pop(key, 0)
