"""The check's last state on disk, for ``logpipe check --state-file`` (logpipe-check.service).

The timer runs the check every minute, but an operator wants to hear about a change, not about
every run. So the check records its result in a small JSON file and tells systemd only whether
the state changed: exit ``EXIT_STATE_CHANGED`` makes the unit fail, and its ``OnFailure=`` starts
logpipe-alert@.service, which reads the file (``OnFailure=`` passes nothing but the unit name).
A recovery to OK is a change like any other.

The file is written by the check only (the alert keeps its own, logpipe/alert.py), replaced
atomically so a reader never sees half of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from logpipe import log

# Not a Nagios code and not one of the CLI's (0, 1, 2, 4): the alert tells a recorded change
# from a check that could not run (killed, timed out) by this status alone.
EXIT_STATE_CHANGED = 8
STATES = ("OK", "WARNING", "CRITICAL", "UNKNOWN")


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def summary_of(line: str) -> str:
    """The human part of a Nagios line (performance data after `` | `` dropped)."""
    return line.split(" | ", 1)[0].strip()


@dataclass(frozen=True)
class CheckState:
    state: str                      # OK, WARNING, CRITICAL or UNKNOWN
    summary: str                    # the check's line without performance data
    since: str                      # when this state began (UTC, ISO 8601)
    checked_at: str                 # the last run that recorded it
    previous_state: str | None      # the state before `since`; None: none recorded yet
    previous_since: str | None

    def as_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckState:
        state = data["state"]
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        return cls(state=state, summary=str(data["summary"]), since=str(data["since"]),
                   checked_at=str(data["checked_at"]),
                   previous_state=data.get("previous_state"),
                   previous_since=data.get("previous_since"))


def advance(previous: CheckState | None, state: str, line: str, now: datetime,
            ) -> tuple[CheckState, bool]:
    """The state to record after a run that found ``state``, and whether that is a change.

    The first run ever is a change only when it is not OK: there is nothing to recover from.
    """
    summary, at = summary_of(line), iso(now)
    if previous is None:
        return CheckState(state, summary, at, at, None, None), state != "OK"
    if previous.state == state:
        return CheckState(state, summary, previous.since, at, previous.previous_state,
                          previous.previous_since), False
    return CheckState(state, summary, at, at, previous.state, previous.since), True


def read(path: Path) -> CheckState | None:
    """The recorded state; None when there is none or it cannot be understood (logged)."""
    try:
        return CheckState.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        # Starting over is safe: the worst case is one alert for a state already alerted.
        log.warning("state_file_unreadable", path=str(path), error=str(exc))
        return None


def write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def record(path: Path, code: int, line: str, now: datetime | None = None) -> int:
    """Record a check result (Nagios ``code`` and line); the exit code for the unit:
    ``EXIT_STATE_CHANGED`` when the state differs from the recorded one, else 0."""
    state = STATES[code] if 0 <= code < len(STATES) else "UNKNOWN"
    new, changed = advance(read(path), state, line, now or utc_now())
    write_atomically(path, new.as_json())
    if changed:
        log.event("check_state_changed", state=new.state,
                  previous_state=new.previous_state or "-", path=str(path))
        return EXIT_STATE_CHANGED
    return 0
