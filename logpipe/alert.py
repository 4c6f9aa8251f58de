"""``logpipe alert UNIT``: what logpipe-alert@.service runs when a logpipe unit fails.

Two kinds of failure reach it through ``OnFailure=logpipe-alert@%n.service``:

* logpipe-check.service exited ``EXIT_STATE_CHANGED``: the check recorded a new state in its
  state file (logpipe/checkstate.py). The alert is that state with the check's one-line summary;
  a return to OK is the "recovered" alert.
* any other failure (logpipe-prune.service failed, the check was killed by its timeout): the
  alert says that unit FAILED, with systemd's result and exit status.

systemd tells a unit started by ``OnFailure=`` which unit failed and how in ``MONITOR_*``
variables (systemd 250+). Without them (an operator starting the alert unit by hand) the recorded
check state is alerted if it has not been yet.

What was alerted last is kept next to the check's state file (``check.alerted``), written by this
command only: an alert unit started twice for the same change alerts once. It is updated only when
the alert went out, so a failed command is retried by starting the alert unit again.

Every alert is one log line (``event=alert``) at the state's level, so journald files it at that
priority (notice for a recovery, warning, err for UNKNOWN or a failed unit, crit); with
``alert.command`` set, that command runs too.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from logpipe import checkstate, log
from logpipe.checkstate import EXIT_STATE_CHANGED, CheckState
from logpipe.config import AlertConfig

FAILED = "FAILED"
# The log level of each alert's line, hence its journald priority (log.priority): notice for a
# recovery, warning, err for UNKNOWN or a failed unit, crit.
LEVELS = {"OK": log.NOTICE, "WARNING": logging.WARNING, "UNKNOWN": logging.ERROR,
          FAILED: logging.ERROR, "CRITICAL": logging.CRITICAL}
PRIORITY_NAMES = {2: "crit", 3: "err", 4: "warning", 5: "notice"}
_OUTPUT_TAIL = 500


@dataclass(frozen=True)
class Monitor:
    """How the unit that triggered us ended, from systemd's ``MONITOR_*`` variables."""

    unit: str
    result: str        # success, exit-code, signal, timeout, core-dump, ...
    exit_code: str     # exited, killed, dumped
    exit_status: str   # the number (exited) or the signal name

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Monitor | None:
        if "MONITOR_UNIT" not in environ:
            return None
        return cls(unit=environ["MONITOR_UNIT"],
                   result=environ.get("MONITOR_SERVICE_RESULT", ""),
                   exit_code=environ.get("MONITOR_EXIT_CODE", ""),
                   exit_status=environ.get("MONITOR_EXIT_STATUS", ""))

    @property
    def state_changed(self) -> bool:
        return self.exit_code == "exited" and self.exit_status == str(EXIT_STATE_CHANGED)


@dataclass(frozen=True)
class Alerted:
    """The check state alerted last (the alert's own file)."""

    state: str
    since: str
    alerted_at: str


@dataclass(frozen=True)
class Alert:
    unit: str
    host: str
    state: str                  # OK, WARNING, CRITICAL, UNKNOWN or FAILED
    previous_state: str         # "" when unknown
    summary: str
    since: str
    text: str                   # the one line an operator reads

    @property
    def level(self) -> int:
        return LEVELS[self.state]

    @property
    def priority(self) -> int:
        return log.priority(self.level)

    def fields(self) -> dict[str, str]:
        """The names a command may use: ``{name}`` in an argument, ``ALERT_<NAME>`` in its
        environment."""
        return {"text": self.text, "state": self.state, "previous_state": self.previous_state,
                "summary": self.summary, "unit": self.unit, "host": self.host,
                "since": self.since, "priority": PRIORITY_NAMES[self.priority]}


def _duration(start: str, end: str) -> str:
    seconds = int((checkstate.parse_iso(end) - checkstate.parse_iso(start)).total_seconds())
    hours, rest = divmod(max(seconds, 0), 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h" if hours else "") + (f"{minutes}m" if hours or minutes else "") \
        + f"{secs}s"


def state_alert(unit: str, host: str, check: CheckState) -> Alert:
    previous = check.previous_state or ""
    if check.state == "OK":
        after = (f" after {_duration(check.previous_since, check.since)}"
                 if check.previous_since else "")
        what = f"RECOVERED {previous or 'none'} -> OK{after}"
    else:
        what = f"{previous or 'none'} -> {check.state}"
    return Alert(unit=unit, host=host, state=check.state, previous_state=previous,
                 summary=check.summary, since=check.since,
                 text=f"{host} {unit}: {what}: {check.summary}")


def failure_alert(unit: str, host: str, monitor: Monitor, now: str) -> Alert:
    how = (f"result={monitor.result or '?'}, "
           f"{monitor.exit_code or 'exit'}={monitor.exit_status or '?'}")
    summary = f"{unit} failed ({how})"
    return Alert(unit=unit, host=host, state=FAILED, previous_state="", summary=summary,
                 since=now, text=f"{host} {unit}: FAILED ({how}): see journalctl -u {unit}")


def decide(unit: str, host: str, check: CheckState | None, alerted: Alerted | None,
           monitor: Monitor | None, now: str) -> Alert | None:
    """The alert to send, or None when there is nothing new to say."""
    if monitor is not None and not monitor.state_changed:
        return failure_alert(unit, host, monitor, now)
    if check is None:
        return None
    if check.state == "OK" and (alerted is None or alerted.state == "OK"):
        return None  # nothing was alerted that could recover
    if alerted is not None and (alerted.state, alerted.since) == (check.state, check.since):
        return None  # this very state was alerted already
    return state_alert(unit, host, check)


def read_alerted(path: Path) -> Alerted | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Alerted(state=str(data["state"]), since=str(data["since"]),
                       alerted_at=str(data["alerted_at"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("state_file_unreadable", path=str(path), error=str(exc))
        return None


def alerted_path(state_file: Path) -> Path:
    return state_file.with_suffix(".alerted")


def log_alert(alert: Alert) -> None:
    """The alert as one key=value line at its level: under systemd, log.py prefixes it with the
    syslog priority (``<4>``...), which journald files it under (``journalctl -p warning``).

    Written whatever ``logging.level`` says (a site at WARNING would otherwise lose the notice
    of a recovery): handing the record to the handlers skips only the level check."""
    logger = logging.getLogger("logpipe")
    fields = {"unit": alert.unit, "state": alert.state,
              "previous_state": alert.previous_state or "-", "text": alert.text}
    logger.handle(logger.makeRecord(logger.name, alert.level, __file__, 0, "alert", (), None,
                                    extra={"fields": fields}))


def command_argv(command: list[str], alert: Alert) -> list[str]:
    """``command`` with each ``{name}`` replaced: plain text replacement, no shell and no
    format mini-language, so other braces (a JSON body) pass through untouched."""
    out = []
    for arg in command:
        for name, value in alert.fields().items():
            arg = arg.replace("{" + name + "}", value)
        out.append(arg)
    return out


def run_command(alert: Alert, cfg: AlertConfig, environ: Mapping[str, str]) -> bool:
    argv = command_argv(cfg.command, alert)
    env = {**environ, **{f"ALERT_{k.upper()}": v for k, v in alert.fields().items()}}
    # Only the program's name is logged: the arguments may hold a webhook URL.
    program = os.path.basename(argv[0])
    try:
        proc = subprocess.run(argv, input=alert.text + "\n", text=True, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=cfg.timeout_s, check=False)
    except subprocess.TimeoutExpired:
        log.error("alert_command_failed", command=program, reason="timeout",
                  timeout_s=cfg.timeout_s)
        return False
    except OSError as exc:
        log.error("alert_command_failed", command=program, reason="not_started",
                  error=exc.strerror or str(exc))
        return False
    if proc.returncode != 0:
        log.error("alert_command_failed", command=program, reason="exit_status",
                  status=proc.returncode, output=proc.stdout[-_OUTPUT_TAIL:].strip())
        return False
    log.event("alert_command_done", command=program, state=alert.state)
    return True


def run(unit: str, state_file: Path, cfg: AlertConfig, environ: Mapping[str, str] | None = None,
        host: str | None = None) -> int:
    """CLI entry for ``logpipe alert``: 0 when the alert went out (or there was none to send),
    1 when the command failed (the alert unit fails, visible in ``systemctl --failed``)."""
    env = os.environ if environ is None else environ
    now = checkstate.iso(checkstate.utc_now())
    alerted_file = alerted_path(state_file)
    alert = decide(unit, host or socket.gethostname(), checkstate.read(state_file),
                   read_alerted(alerted_file), Monitor.from_env(env), now)
    if alert is None:
        log.event("alert_skipped", unit=unit, reason="nothing_new")
        return 0
    log_alert(alert)
    if cfg.command and not run_command(alert, cfg, env):
        return 1
    if alert.state != FAILED:
        record = Alerted(state=alert.state, since=alert.since, alerted_at=now)
        checkstate.write_atomically(alerted_file, json.dumps(asdict(record), indent=2) + "\n")
    return 0
