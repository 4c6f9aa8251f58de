"""The check's state file and the alert decisions (logpipe/checkstate.py, logpipe/alert.py).

The timer loop is played in-process: each "tick" runs ``logpipe check --state-file`` the way
logpipe-check.service does, and when it exits ``EXIT_STATE_CHANGED`` runs ``logpipe alert``
with the ``MONITOR_*`` variables systemd gives an ``OnFailure=`` unit. The alert command is a
real program that appends what it received to a file, so the tests count real alerts.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from logpipe import alert, checkstate, cli, log, ops
from logpipe.alert import Alerted, Monitor
from logpipe.checkstate import EXIT_STATE_CHANGED, CheckState
from logpipe.config import AlertConfig

T0 = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)
WARN = "LOGPIPE WARNING - lag=1500 error_rate=0.000000 index_bytes=10 (lag>1000) | lag=1500;1000"
CRIT = "LOGPIPE CRITICAL - lag=150000 error_rate=0.000000 index_bytes=10 (lag>100000) | lag=1"
OK = "LOGPIPE OK - lag=0 error_rate=0.000000 index_bytes=10 | lag=0;1000;100000;0"
CHANGED_ENV = {"MONITOR_UNIT": "logpipe-check.service", "MONITOR_SERVICE_RESULT": "exit-code",
               "MONITOR_EXIT_CODE": "exited", "MONITOR_EXIT_STATUS": str(EXIT_STATE_CHANGED)}

# A real alert command: one JSON line per run with its arguments, stdin and ALERT_* variables.
SINK = ("import json, os, sys; "
        "rec = {'argv': sys.argv[1:], 'stdin': sys.stdin.read(), "
        "'env': {k: v for k, v in os.environ.items() if k.startswith('ALERT_')}}; "
        "open(os.environ['SINK_FILE'], 'a').write(json.dumps(rec) + '\\n')")


def _sink(tmp_path: Path) -> tuple[AlertConfig, dict[str, str], Path]:
    out = tmp_path / "sink.jsonl"
    cfg = AlertConfig(command=[sys.executable, "-c", SINK, "{state}", "{unit}",
                               '{"text": "{text}"}', "{nope}"])
    return cfg, {"SINK_FILE": str(out), "PATH": os.environ.get("PATH", "")}, out


def _status(lag: int, end: int = 300_000) -> ops.Status:
    part = ops.PartitionStatus(partition=0, low=0, end=end, committed=end - lag, lag=lag)
    return ops.Status(
        kafka=ops.KafkaStatus(topic="t", group_id="g", partitions=[part], dlq_topic="t.dlq",
                              dlq_partitions=[]),
        elasticsearch=ops.EsStatus(alias="t", docs=end - lag, newest_indexed_at=None,
                                   index_bytes=10))


def _sunk(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# the state file


@pytest.mark.parametrize(("first", "changed"), [(OK, False), (WARN, True)])
def test_first_run_alerts_only_when_not_ok(tmp_path: Path, first: str, changed: bool) -> None:
    path = tmp_path / "check.state"
    code = ops.OK if first == OK else ops.WARNING
    assert checkstate.record(path, code, first, T0) == (EXIT_STATE_CHANGED if changed else 0)
    saved = checkstate.read(path)
    assert saved is not None and saved.previous_state is None
    assert saved.since == saved.checked_at == "2026-11-30T12:00:00Z"


def test_exit_code_says_whether_the_state_changed(tmp_path: Path) -> None:
    path = tmp_path / "check.state"
    runs = [(ops.OK, OK), (ops.WARNING, WARN), (ops.WARNING, WARN), (ops.WARNING, WARN),
            (ops.CRITICAL, CRIT), (ops.CRITICAL, CRIT), (ops.OK, OK), (ops.OK, OK),
            (ops.UNKNOWN, "LOGPIPE UNKNOWN - kafka: down")]
    codes = [checkstate.record(path, code, line, T0 + timedelta(minutes=i))
             for i, (code, line) in enumerate(runs)]
    assert codes == [0, 8, 0, 0, 8, 0, 8, 0, 8]


def test_state_keeps_since_and_remembers_the_previous_state(tmp_path: Path) -> None:
    path = tmp_path / "check.state"
    checkstate.record(path, ops.OK, OK, T0)
    checkstate.record(path, ops.WARNING, WARN, T0 + timedelta(minutes=1))
    checkstate.record(path, ops.WARNING, WARN.replace("1500", "1700"), T0 + timedelta(minutes=2))
    saved = checkstate.read(path)
    assert saved == CheckState(
        state="WARNING",
        summary="LOGPIPE WARNING - lag=1700 error_rate=0.000000 index_bytes=10 (lag>1000)",
        since="2026-11-30T12:01:00Z", checked_at="2026-11-30T12:02:00Z",
        previous_state="OK", previous_since="2026-11-30T12:00:00Z")
    checkstate.record(path, ops.OK, OK, T0 + timedelta(minutes=5))
    back = checkstate.read(path)
    assert back is not None
    assert (back.state, back.previous_state, back.previous_since, back.since) == (
        "OK", "WARNING", "2026-11-30T12:01:00Z", "2026-11-30T12:05:00Z")
    assert [p.name for p in tmp_path.iterdir()] == ["check.state"]  # no temporary files left


def test_unreadable_state_file_starts_over(tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "check.state"
    path.write_text("{not json")
    assert checkstate.read(path) is None
    assert checkstate.record(path, ops.CRITICAL, CRIT, T0) == EXIT_STATE_CHANGED
    assert "state_file_unreadable" in caplog.messages
    assert checkstate.read(path) is not None


def test_summary_drops_performance_data() -> None:
    assert checkstate.summary_of(WARN).endswith("(lag>1000)")
    assert checkstate.summary_of("LOGPIPE UNKNOWN - kafka: x") == "LOGPIPE UNKNOWN - kafka: x"


# ---------------------------------------------------------------------------------------------
# what to alert


def _state(state: str, since: str, previous: str | None = None,
           previous_since: str | None = None, summary: str = "S") -> CheckState:
    return CheckState(state, summary, since, since, previous, previous_since)


MON_CHANGED = Monitor.from_env(CHANGED_ENV)


def test_a_change_is_alerted_with_the_transition_and_summary() -> None:
    check = _state("WARNING", "2026-11-30T12:01:00Z", "OK", "2026-11-30T11:00:00Z",
                   checkstate.summary_of(WARN))
    got = alert.decide("logpipe-check.service", "h1", check, None, MON_CHANGED, "now")
    assert got is not None and got.state == "WARNING" and got.priority == 4
    assert got.text == ("h1 logpipe-check.service: OK -> WARNING: LOGPIPE WARNING - lag=1500 "
                        "error_rate=0.000000 index_bytes=10 (lag>1000)")
    # The same state (same since) again: already alerted.
    done = Alerted("WARNING", "2026-11-30T12:01:00Z", "x")
    assert alert.decide("logpipe-check.service", "h1", check, done, MON_CHANGED, "now") is None


def test_recovery_is_alerted_once_with_how_long_it_lasted() -> None:
    check = _state("OK", "2026-11-30T12:04:10Z", "CRITICAL", "2026-11-30T12:01:00Z", "LOGPIPE OK")
    done = Alerted("CRITICAL", "2026-11-30T12:01:00Z", "x")
    got = alert.decide("logpipe-check.service", "h1", check, done, MON_CHANGED, "now")
    assert got is not None and got.priority == 5
    assert got.text == "h1 logpipe-check.service: RECOVERED CRITICAL -> OK after 3m10s: LOGPIPE OK"


@pytest.mark.parametrize("alerted", [None, Alerted("OK", "2026-11-30T10:00:00Z", "x")])
def test_ok_with_nothing_alerted_before_is_not_a_recovery(alerted: Alerted | None) -> None:
    check = _state("OK", "2026-11-30T12:00:00Z", "WARNING", "2026-11-30T11:59:00Z")
    assert alert.decide("u", "h", check, alerted, MON_CHANGED, "now") is None


def test_a_state_that_left_and_came_back_unheard_is_alerted_again() -> None:
    # WARNING alerted; its recovery never went out (command failed); WARNING again, new since.
    check = _state("WARNING", "2026-11-30T13:00:00Z", "OK", "2026-11-30T12:30:00Z")
    done = Alerted("WARNING", "2026-11-30T12:00:00Z", "x")
    got = alert.decide("u", "h", check, done, MON_CHANGED, "now")
    assert got is not None and got.text == "h u: OK -> WARNING: S"


@pytest.mark.parametrize(("env", "how"), [
    ({"MONITOR_SERVICE_RESULT": "exit-code", "MONITOR_EXIT_CODE": "exited",
      "MONITOR_EXIT_STATUS": "1"}, "result=exit-code, exited=1"),
    ({"MONITOR_SERVICE_RESULT": "timeout", "MONITOR_EXIT_CODE": "killed",
      "MONITOR_EXIT_STATUS": "TERM"}, "result=timeout, killed=TERM"),
])
def test_any_other_failure_is_a_failed_unit_alert(env: dict[str, str], how: str) -> None:
    monitor = Monitor.from_env({"MONITOR_UNIT": "logpipe-prune.service", **env})
    check = _state("WARNING", "2026-11-30T12:01:00Z", "OK")  # not what this alert is about
    got = alert.decide("logpipe-prune.service", "h", check, None, monitor, "now")
    assert got is not None and got.state == "FAILED" and got.priority == 3
    assert got.text == (f"h logpipe-prune.service: FAILED ({how}): "
                        "see journalctl -u logpipe-prune.service")


def test_started_by_hand_sends_only_an_unsent_check_state() -> None:
    check = _state("CRITICAL", "2026-11-30T12:01:00Z", "OK")
    assert alert.decide("u", "h", check, None, None, "now") is not None
    assert alert.decide("u", "h", check, Alerted("CRITICAL", check.since, "x"), None,
                        "now") is None
    assert alert.decide("u", "h", None, None, None, "now") is None


# ---------------------------------------------------------------------------------------------
# sending: the journald line and the command


def _alert_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == "alert"]


def test_command_gets_the_text_on_stdin_in_arguments_and_environment(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg, env, out = _sink(tmp_path)
    state_file = tmp_path / "check.state"
    checkstate.record(state_file, ops.WARNING, WARN, T0)
    assert alert.run("logpipe-check.service", state_file, cfg, {**env, **CHANGED_ENV},
                     host="h1") == 0
    (rec,) = _sunk(out)
    text = ("h1 logpipe-check.service: none -> WARNING: LOGPIPE WARNING - lag=1500 "
            "error_rate=0.000000 index_bytes=10 (lag>1000)")
    assert rec["stdin"] == text + "\n"
    # {name} replaced inside an argument; other braces and unknown names left alone.
    assert rec["argv"] == ["WARNING", "logpipe-check.service", '{"text": "' + text + '"}',
                           "{nope}"]
    assert rec["env"] == {
        "ALERT_TEXT": text, "ALERT_STATE": "WARNING", "ALERT_PREVIOUS_STATE": "",
        "ALERT_SUMMARY": checkstate.summary_of(WARN), "ALERT_UNIT": "logpipe-check.service",
        "ALERT_HOST": "h1", "ALERT_SINCE": "2026-11-30T12:00:00Z", "ALERT_PRIORITY": "warning"}
    (record,) = _alert_records(caplog)
    assert record.fields == {"unit": "logpipe-check.service",  # type: ignore[attr-defined]
                             "state": "WARNING", "previous_state": "-", "text": text}


@pytest.mark.parametrize(("code", "line", "prefix", "level"), [
    (ops.WARNING, WARN, "<4>", "warning"), (ops.CRITICAL, CRIT, "<2>", "critical"),
    (ops.UNKNOWN, "LOGPIPE UNKNOWN - x", "<3>", "error"),
])
def test_journal_line_carries_the_priority(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                           code: int, line: str, prefix: str,
                                           level: str) -> None:
    state_file = tmp_path / "check.state"
    checkstate.record(state_file, code, line, T0)
    assert alert.run("logpipe-check.service", state_file, AlertConfig(), CHANGED_ENV) == 0
    (record,) = _alert_records(caplog)
    written = log.KeyValueFormatter(journal=True).format(record)
    assert written.startswith(prefix + "ts=")
    assert f" level={level} event=alert unit=logpipe-check.service " in written


def test_recovery_is_a_notice(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(log.NOTICE)
    state_file = tmp_path / "check.state"
    checkstate.record(state_file, ops.WARNING, WARN, T0)
    alert.run("logpipe-check.service", state_file, AlertConfig(), CHANGED_ENV)
    checkstate.record(state_file, ops.OK, OK, T0 + timedelta(seconds=90))
    alert.run("logpipe-check.service", state_file, AlertConfig(), CHANGED_ENV)
    recovered = _alert_records(caplog)[1]
    written = log.KeyValueFormatter(journal=True).format(recovered)
    assert written.startswith("<5>ts=") and " level=notice event=alert " in written
    assert "RECOVERED WARNING -> OK after 1m30s: LOGPIPE OK - lag=0 " in written


@pytest.mark.parametrize("level", ["WARNING", "ERROR"])
def test_alert_lines_ignore_the_log_level(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          level: str) -> None:
    log.setup(level)  # logging.level in logpipe.toml
    state_file = tmp_path / "check.state"
    checkstate.record(state_file, ops.WARNING, WARN, T0)
    alert.run("u", state_file, AlertConfig(), CHANGED_ENV)
    checkstate.record(state_file, ops.OK, OK, T0 + timedelta(minutes=1))
    alert.run("u", state_file, AlertConfig(), CHANGED_ENV)
    lines = [line for line in capsys.readouterr().err.splitlines() if " event=alert " in line]
    assert [line.split()[1] for line in lines] == ["level=warning", "level=notice"]


def test_failed_unit_is_alerted_every_time_and_never_recorded(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state_file = tmp_path / "check.state"
    checkstate.record(state_file, ops.OK, OK, T0)
    env = {"MONITOR_UNIT": "logpipe-prune.service", "MONITOR_SERVICE_RESULT": "exit-code",
           "MONITOR_EXIT_CODE": "exited", "MONITOR_EXIT_STATUS": "1"}
    for _ in range(2):
        assert alert.run("logpipe-prune.service", state_file, AlertConfig(), env) == 0
    records = _alert_records(caplog)
    assert len(records) == 2
    assert all(r.levelno == logging.ERROR and r.fields["state"] == "FAILED"  # type: ignore[attr-defined]
               for r in records)
    assert not alert.alerted_path(state_file).exists()


def test_failed_command_is_not_recorded_so_a_restart_resends(tmp_path: Path) -> None:
    state_file = tmp_path / "check.state"
    checkstate.record(state_file, ops.CRITICAL, CRIT, T0)
    failing = AlertConfig(command=[sys.executable, "-c", "import sys; sys.exit(3)"])
    assert alert.run("u", state_file, failing, CHANGED_ENV) == 1
    assert not alert.alerted_path(state_file).exists()
    cfg, env, out = _sink(tmp_path)
    assert alert.run("u", state_file, cfg, env) == 0  # by hand: no MONITOR_*
    assert len(_sunk(out)) == 1
    assert alert.run("u", state_file, cfg, env) == 0
    assert len(_sunk(out)) == 1


@pytest.mark.parametrize(("command", "reason"), [
    ([sys.executable, "-c", "import time; time.sleep(5)"], "timeout"),
    (["/nonexistent/alert-command"], "not_started"),
])
def test_hung_or_missing_command_fails_the_alert(tmp_path: Path, command: list[str],
                                                 reason: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    state_file = tmp_path / "check.state"
    checkstate.record(state_file, ops.WARNING, WARN, T0)
    cfg = AlertConfig(command=command, timeout_s=0.5)
    assert alert.run("u", state_file, cfg, CHANGED_ENV) == 1
    (record,) = [r for r in caplog.records if r.getMessage() == "alert_command_failed"]
    assert record.fields["reason"] == reason  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# the timer loop, through the CLI: one alert per state change


def test_timer_loop_alerts_once_per_state_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    cfg, env, out = _sink(tmp_path)
    state_file = tmp_path / "check.state"
    config = tmp_path / "logpipe.toml"
    config.write_text("[check]\nlag_warning = 1000\nlag_critical = 100000\n\n[alert]\n"
                      f"command = {json.dumps(cfg.command)}\n")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    lags = [0, 0, 1500, 1500, 1500, 200_000, 200_000, 0, 0, 0]
    for lag in lags:
        monkeypatch.setattr(ops, "collect", lambda cfg, lag=lag: _status(lag=lag, end=300_000))
        code = cli.main(["--config", str(config), "check", "--state-file", str(state_file)])
        if code == EXIT_STATE_CHANGED:  # OnFailure= -> logpipe-alert@logpipe-check.service
            for name, value in CHANGED_ENV.items():
                monkeypatch.setenv(name, value)
            assert cli.main(["--config", str(config), "alert", "logpipe-check.service",
                             "--state-file", str(state_file)]) == 0
            for name in CHANGED_ENV:
                monkeypatch.delenv(name)
        else:
            assert code == 0
    states = [r["argv"][0] for r in _sunk(out)]
    assert states == ["WARNING", "CRITICAL", "OK"]
    texts = [r["stdin"] for r in _sunk(out)]
    assert texts[0].split(": ", 1)[1].startswith("OK -> WARNING: LOGPIPE WARNING - lag=1500 ")
    assert re.search(r"RECOVERED CRITICAL -> OK after \d+s: LOGPIPE OK - lag=0 ", texts[2])
    capsys.readouterr()


def test_check_with_a_broken_config_records_critical_once(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str],
                                                          ) -> None:
    config = tmp_path / "logpipe.toml"
    config.write_text("[check]\nlag_warning = 'many'\n")
    state_file = tmp_path / "check.state"
    argv = ["--config", str(config), "check", "--state-file", str(state_file)]
    assert cli.main(argv) == EXIT_STATE_CHANGED
    assert cli.main(argv) == 0
    saved = checkstate.read(state_file)
    assert saved is not None and saved.state == "CRITICAL"
    assert saved.summary.startswith("LOGPIPE CRITICAL - config error: check.lag_warning:")
    # Without --state-file a broken config stays exit 2, as before.
    assert cli.main(["--config", str(config), "check"]) == 2
    capsys.readouterr()


def test_alert_with_a_broken_config_still_logs_the_alert(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str],
                                                         ) -> None:
    config = tmp_path / "logpipe.toml"
    config.write_text("[alert]\ncommand = 'not a list'\n")
    state_file = tmp_path / "check.state"
    checkstate.record(state_file, ops.CRITICAL, CRIT, T0)
    for name, value in CHANGED_ENV.items():
        monkeypatch.setenv(name, value)
    code = cli.main(["--config", str(config), "alert", "logpipe-check.service",
                     "--state-file", str(state_file)])
    err = capsys.readouterr().err
    assert code == 2
    assert "config error: alert.command" in err
    assert "level=critical event=alert unit=logpipe-check.service state=CRITICAL" in err
