"""One line per event, ``key=value`` fields, on stderr (journald captures it)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

_LOGGER = logging.getLogger("logpipe")


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.3f}".rstrip("0").rstrip(".") if value == value else "nan"
    else:
        text = str(value)
    if text == "" or any(c in text for c in ' ="\n\t'):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [f"ts={ts}.{int(record.msecs):03d}Z", f"level={record.levelname.lower()}",
                 f"event={record.getMessage()}"]
        fields: dict[str, Any] = getattr(record, "fields", {})
        parts.extend(f"{k}={_fmt_value(v)}" for k, v in fields.items())
        if record.exc_info and record.exc_info[1] is not None:
            parts.append(f"error={_fmt_value(repr(record.exc_info[1]))}")
        return " ".join(parts)


def setup(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
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
