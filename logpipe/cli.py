"""``logpipe`` command line: argparse front end over the config object and the modules.

Flags override the config file through ``Config.replace`` (validated like the file). Exit codes:
0 success, 1 runtime failure, 2 bad usage or bad configuration, 4 refused by a server (wrong
credentials, an unverifiable certificate, a missing ACL or privilege: see ``logpipe.refusal``).
``check`` uses Nagios codes (a refusal is CRITICAL); ``check --state-file`` instead says whether
the state changed (``logpipe.checkstate``), for logpipe-check.service and its alert unit.
Heavy modules are imported inside each command so ``--help`` and ``config show`` stay fast and
work even on a host where a client library is broken.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from logpipe import __version__, config, log
from logpipe.config import Config, ConfigError
from logpipe.refusal import EXIT_REFUSED, Refused


def _add_common(p: argparse.ArgumentParser) -> None:
    # SUPPRESS defaults: the option works before or after the subcommand without the
    # subcommand's default overwriting a value given earlier.
    p.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                   help="config file (default: $LOGPIPE_CONFIG, else /etc/logpipe/logpipe.toml)")
    p.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   type=str.upper, default=argparse.SUPPRESS,
                   help="override logging.level")


# The top-level help names the module that decides each behaviour an operator asks about, so the
# answer is one file away (the package's modules: logpipe/<name>.py; the why: docs/DESIGN.md).
WHERE = """\
where each behaviour is decided (logpipe/<module>.py; why: docs/DESIGN.md):
  consumer loop, batches, retries    consumer.py, retries.py, sender.py
  committed offsets                  offsets.py: the first offset neither indexed (201/409)
                                     nor acknowledged by the dead-letter topic
  poison messages                    dlq.py: to kafka.dlq_topic with the reason in headers
  document ids, bulk answers         bulk.py
  the producer's count and rate      producer.py: producer.count in the config, which --count
                                     overrides (the timer's unit passes no --count)
  configuration keys and defaults    config.py (logpipe config show prints the effective one)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="logpipe",
        description="Web-log pipeline: Faker producer -> Kafka -> consumer -> Elasticsearch.",
        epilog=WHERE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"logpipe {__version__}")
    _add_common(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_common(p)
        return p

    p = command("produce", "Generate fake access logs and send them to the Kafka topic. "
                           "Exit 1 if any message was not delivered.")
    p.add_argument("--count", type=int, metavar="N",
                   help="messages to send (one-shot mode; default producer.count)")
    p.add_argument("--rate", type=float, metavar="R",
                   help="load mode: messages per second (0 = as fast as possible)")
    p.add_argument("--duration", type=float, metavar="S",
                   help="load mode: seconds to run (with --rate: sends rate x duration)")
    p.add_argument("--seed", type=int, metavar="N",
                   help="reproduce log content (ids are always new)")

    p = command("bootstrap", "Idempotently create/grow the Kafka topics and set up the "
                             "Elasticsearch index template, today's index and the alias.")
    p.add_argument("--prune", action="store_true",
                   help="also delete daily indices older than elasticsearch.retention_days")
    p.add_argument("--only", choices=("kafka", "elasticsearch"),
                   help="set up only one side")
    p.add_argument("--wait", type=float, default=60.0, metavar="S",
                   help="seconds to wait for Kafka/Elasticsearch to answer (default 60)")

    p = command("prune", "Delete daily indices older than elasticsearch.retention_days "
                         "(only names <index>-YYYY.MM.DD).")
    p.add_argument("--retention-days", type=int, metavar="N",
                   help="override elasticsearch.retention_days (0 keeps everything)")
    p.add_argument("--wait", type=float, default=60.0, metavar="S",
                   help="seconds to wait for Elasticsearch to answer (default 60)")

    p = command("consume", "Consume the topic into Elasticsearch (service, or run-once with "
                           "--max-batches).")
    p.add_argument("--max-batches", type=int, metavar="N",
                   help="stop after N batches (0 = run until stopped)")
    p.add_argument("--batch-size", type=int, metavar="N", help="messages per bulk batch")
    p.add_argument("--daemon", action="store_true",
                   help="detach into the background (hosts without systemd)")
    p.add_argument("--pidfile", metavar="PATH",
                   help="with --daemon: PID lock file (required with --daemon)")
    p.add_argument("--log-file", metavar="PATH",
                   help="with --daemon: append logs here (a daemon has no stderr)")

    p = command("status", "Per-partition end/committed offsets and lag, DLQ size, "
                          "Elasticsearch document count and newest indexed_at.")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = command("check", "Nagios-style check: exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.")
    p.add_argument("--lag-warning", type=int, metavar="N", help="override check.lag_warning")
    p.add_argument("--lag-critical", "--max-lag", type=int, metavar="N",
                   dest="lag_critical", help="override check.lag_critical")
    p.add_argument("--error-rate-warning", type=float, metavar="F",
                   help="override check.error_rate_warning (fraction, e.g. 0.01)")
    p.add_argument("--error-rate-critical", type=float, metavar="F",
                   help="override check.error_rate_critical")
    p.add_argument("--index-size-warning", type=int, metavar="BYTES",
                   dest="index_size_warning_bytes", help="override check.index_size_warning_bytes")
    p.add_argument("--index-size-critical", type=int, metavar="BYTES",
                   dest="index_size_critical_bytes",
                   help="override check.index_size_critical_bytes")
    p.add_argument("--stall-warning", type=float, metavar="S", dest="stall_warning_s",
                   help="override check.stall_warning_s (a partition with lag and no commit "
                        "for S seconds; 0 = off)")
    p.add_argument("--stall-critical", type=float, metavar="S", dest="stall_critical_s",
                   help="override check.stall_critical_s")
    p.add_argument("--state-file", metavar="PATH",
                   help="record the result in PATH and exit 8 when the state (OK, WARNING, "
                        "CRITICAL, UNKNOWN) differs from the one recorded there, else 0 "
                        "(logpipe-check.service; its OnFailure= alert unit reads PATH). A config "
                        "error is recorded as CRITICAL.")

    p = command("alert", "Alert on a failed logpipe unit (logpipe-alert@.service): a check state "
                         "change recorded in --state-file, or the unit's failure. One journald "
                         "line at the state's priority, and alert.command if set.")
    p.add_argument("unit", help="the unit that failed (the alert unit's instance, %%i)")
    p.add_argument("--state-file", metavar="PATH", required=True,
                   help="the check's state file (logpipe check --state-file)")

    p = command("config", "Configuration tools.")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = csub.add_parser("show", help="print the effective config, secrets masked",
                           description="Print the effective config (file + LOGPIPE_* "
                                       "environment), secrets masked.")
    _add_common(show)
    show.add_argument("--format", choices=("toml", "json"), default="toml",
                      help="output format (default toml)")
    return parser


def _overrides(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


# ---------------------------------------------------------------------------------------------
# TOML output (tomllib only reads)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}"
                               for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def to_toml(data: dict[str, dict[str, Any]]) -> str:
    lines: list[str] = []
    for section, values in data.items():
        if lines:
            lines.append("")
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is None:
                lines.append(f"# {key} is unset")  # TOML has no null
            else:
                lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# commands


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        log.event("stop_requested", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def cmd_produce(cfg: Config, args: argparse.Namespace) -> int:
    values = _overrides(args, ("count", "rate", "seed"))
    if args.duration is not None:
        values["duration_s"] = args.duration
    if values:
        cfg = cfg.replace("producer", **values)
    from logpipe import producer

    return producer.run(cfg, stop=_stop_on_signals())


def cmd_bootstrap(cfg: Config, args: argparse.Namespace) -> int:
    from logpipe import admin

    return admin.run(cfg, only=args.only, do_prune=args.prune, wait_timeout_s=args.wait)


def cmd_prune(cfg: Config, args: argparse.Namespace) -> int:
    if args.retention_days is not None:
        cfg = cfg.replace("elasticsearch", retention_days=args.retention_days)
    from logpipe import admin

    return admin.run_prune(cfg, wait_timeout_s=args.wait)


def cmd_consume(cfg: Config, args: argparse.Namespace) -> int:
    values = _overrides(args, ("max_batches", "batch_size"))
    if values:
        cfg = cfg.replace("consumer", **values)
    if args.pidfile and not args.daemon:
        raise _UsageError("--pidfile needs --daemon")
    from logpipe import consumer  # lazily: written separately, heavy imports

    if not args.daemon:
        return consumer.run(cfg)
    if not args.pidfile:
        raise _UsageError("--daemon needs --pidfile PATH")
    return _run_daemon(cfg, Path(args.pidfile), args.log_file, consumer.run)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


def _run_daemon(cfg: Config, pidfile: Path, log_file: str | None, run: Any) -> int:
    import daemon
    import daemon.pidfile
    from lockfile import LockError

    # The daemon changes to /: resolve paths first.
    pidfile = pidfile.resolve()
    # timeout=0: a pidfile someone else holds fails at once instead of waiting for it forever.
    lock = daemon.pidfile.PIDLockFile(str(pidfile), timeout=0)
    if lock.is_locked():
        pid = lock.read_pid()
        if pid is not None and _alive(pid):
            _complain(f"already running with pid {pid} ({pidfile})")
            return 1
        # A crashed daemon's pid, or no pid at all (a file cut short by a crash): nobody holds
        # it, and the lock would otherwise refuse every later start.
        log.warning("stale_pidfile_removed", pidfile=str(pidfile),
                    pid=pid if pid is not None else "none")
        lock.break_lock()
    stream = Path(log_file).resolve().open("a", buffering=1) if log_file else None
    # No SIGTERM entry: python-daemon's default maps it to SystemExit (and None would mean
    # ignore it). The consumer installs its own SIGTERM handler inside run(), after this
    # context is entered, so a stop still finishes the batch and commits.
    context = daemon.DaemonContext(
        pidfile=lock, stdout=stream, stderr=stream, umask=0o022,
        signal_map={signal.SIGTSTP: None, signal.SIGTTIN: None, signal.SIGTTOU: None},
    )
    try:
        # Detaches (the parent exits 0 here), redirects stdout/stderr, then takes the pidfile.
        context.open()
    except LockError as exc:
        # Another instance took the pidfile between the check above and now. This is the
        # detached child already: its stderr is the log file.
        log.setup(cfg.logging.level)
        log.error("daemon_failed", reason="pidfile_locked", pidfile=str(pidfile), error=str(exc))
        return 1
    with context:
        log.setup(cfg.logging.level)  # stderr is now the log file (or /dev/null)
        log.event("daemon_started", pid=os.getpid(), pidfile=str(pidfile))
        code: int = run(cfg)
        # Nobody waits for a daemon's exit status: the log file is the only place it shows.
        log.event("daemon_stopped", code=code, pidfile=str(pidfile))
        return code


def cmd_status(cfg: Config, args: argparse.Namespace) -> int:
    from logpipe import ops

    code, text = ops.status_command(cfg, as_json=args.json)
    print(text)
    return code


def cmd_check(cfg: Config, args: argparse.Namespace) -> int:
    values = _overrides(args, ("lag_warning", "lag_critical", "error_rate_warning",
                               "error_rate_critical", "index_size_warning_bytes",
                               "index_size_critical_bytes", "stall_warning_s",
                               "stall_critical_s"))
    if values:
        cfg = cfg.replace("check", **values)
    from logpipe import ops

    code, line = ops.check_command(cfg)
    print(line)
    if args.state_file:
        from logpipe import checkstate

        return checkstate.record(Path(args.state_file), code, line)
    return code


def cmd_alert(cfg: Config, args: argparse.Namespace) -> int:
    from logpipe import alert

    return alert.run(args.unit, Path(args.state_file), cfg.alert)


def _check_config_error(exc: ConfigError, args: argparse.Namespace) -> int:
    # Under the timer a broken config is a state like any other: CRITICAL, alerted once.
    if not getattr(args, "state_file", None):
        return 2
    from logpipe import checkstate, ops

    line = f"LOGPIPE CRITICAL - config error: {exc}"
    print(line)
    return checkstate.record(Path(args.state_file), ops.CRITICAL, line)


def _alert_config_error(exc: ConfigError, args: argparse.Namespace) -> int:
    # The alert must still be heard without a readable config: its journald line, no command.
    from logpipe import alert

    alert.run(args.unit, Path(args.state_file), Config().alert)
    return 2


def cmd_config(cfg: Config, args: argparse.Namespace) -> int:
    data = config.masked(cfg)
    if args.format == "json":
        print(json.dumps(data, indent=2))
    else:
        sys.stdout.write(to_toml(data))
    return 0


class _UsageError(Exception):
    pass


def _complain(message: str) -> None:
    """A plain ``logpipe: ...`` line on stderr for a person at a terminal, at error priority when
    stderr is the journal (it may come before logging is set up)."""
    print(f"{log.prefix(logging.ERROR)}logpipe: {message}", file=sys.stderr)


COMMANDS = {
    "produce": cmd_produce, "bootstrap": cmd_bootstrap, "prune": cmd_prune,
    "consume": cmd_consume, "status": cmd_status, "check": cmd_check, "alert": cmd_alert,
    "config": cmd_config,
}
# Commands that still have something to do when the config cannot be read.
ON_CONFIG_ERROR = {"check": _check_config_error, "alert": _alert_config_error}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config.load(getattr(args, "config", None))
        level = getattr(args, "log_level", None)
        if level:
            cfg = cfg.replace("logging", level=level)
    except ConfigError as exc:
        _complain(f"config error: {exc}")
        fallback = ON_CONFIG_ERROR.get(args.command)
        if fallback is None:
            return 2
        log.setup()
        return fallback(exc, args)
    log.setup(cfg.logging.level)
    try:
        return COMMANDS[args.command](cfg, args)
    except ConfigError as exc:
        _complain(f"config error: {exc}")
        return 2
    except Refused as exc:
        exc.refusal.log()
        return EXIT_REFUSED
    except _UsageError as exc:
        parser.error(str(exc))  # exits 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
