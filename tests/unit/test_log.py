"""The key=value log lines, their journald priority prefix, and librdkafka's lines through them."""

from __future__ import annotations

import ast
import io
import logging
import os
import shlex
from pathlib import Path

import pytest

from logpipe import log
from logpipe.kafka import RdKafkaLogger

PACKAGE = Path(log.__file__).parent


def _record(level: int, name: str = "logpipe", msg: str = "batch_committed",
            **fields: object) -> logging.LogRecord:
    record = logging.LogRecord(name, level, __file__, 1, msg, None, None)
    record.fields = fields
    return record


@pytest.mark.parametrize(("level", "prio"), [
    (logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (log.NOTICE, 5),
    (logging.INFO, 6), (logging.DEBUG, 7), (logging.ERROR + 5, 3), (logging.INFO + 3, 6),
    (logging.NOTSET, 7),
])
def test_priority_follows_the_sd_daemon_numbers(level: int, prio: int) -> None:
    assert log.priority(level) == prio


@pytest.mark.parametrize(("level", "prefix"), [
    (logging.CRITICAL, "<2>"), (logging.ERROR, "<3>"), (logging.WARNING, "<4>"),
    (log.NOTICE, "<5>"), (logging.INFO, "<6>"), (logging.DEBUG, "<7>"),
])
def test_journal_lines_start_with_their_priority(level: int, prefix: str) -> None:
    record = _record(level, docs=3)
    line = log.KeyValueFormatter(journal=True).format(record)
    assert line.startswith(prefix + "ts=")
    plain = log.KeyValueFormatter().format(record)
    assert line == prefix + plain
    assert plain.startswith("ts=") and plain.endswith("event=batch_committed docs=3")


def test_a_library_record_is_one_quoted_field() -> None:
    text = 'Node <Urllib3HttpNode(http://127.0.0.1:2)> has failed\nfor "1" times'
    line = log.KeyValueFormatter(journal=True).format(
        _record(logging.WARNING, name="elastic_transport.node_pool", msg=text))
    assert "\n" not in line
    fields = dict(p.split("=", 1) for p in shlex.split(line.removeprefix("<4>")))
    assert fields["event"] == "library"
    assert fields["logger"] == "elastic_transport.node_pool"
    assert fields["message"] == text.replace("\n", "\\n")
    # A logpipe child logger is still logpipe's own event.
    own = log.KeyValueFormatter().format(_record(logging.INFO, name="logpipe.consumer"))
    assert "event=batch_committed" in own and "logger=" not in own


def _stream_id(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def test_journal_only_when_the_stream_is_the_journal_stream(tmp_path: Path) -> None:
    journal, other = tmp_path / "journal", tmp_path / "other"
    journal.touch()
    other.touch()
    with journal.open("w") as stream, other.open("w") as redirected:
        env = {"JOURNAL_STREAM": _stream_id(journal)}
        assert log.is_journal(stream, env)
        # Inherited by a process whose stderr went elsewhere (a pipe, a --daemon log file).
        assert not log.is_journal(redirected, env)
        assert not log.is_journal(stream, {})
        for bad in ("", "12", "a:b", ":", "1:2:3"):
            assert not log.is_journal(stream, {"JOURNAL_STREAM": bad}), bad
    # No file descriptor at all (pytest's capture, a StringIO).
    assert not log.is_journal(io.StringIO(), {"JOURNAL_STREAM": "1:2"})
    assert not log.is_journal(stream, env), "a closed stream is not the journal"


def test_setup_prefixes_only_on_the_journal_stream(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "stderr"
    with path.open("w", buffering=1) as stream:
        monkeypatch.setattr("sys.stderr", stream)
        monkeypatch.setenv("JOURNAL_STREAM", _stream_id(path))
        log.setup("INFO")
        log.warning("waiting", reason="elasticsearch down")
        log.event("ready", topic="t")
        log.event("ignored_debug", logging.DEBUG)
        assert log.prefix(logging.ERROR) == "<3>"
        monkeypatch.setenv("JOURNAL_STREAM", "1:1")
        log.setup("INFO")
        log.event("plain_again")
        assert log.prefix(logging.ERROR) == ""
    lines = path.read_text().splitlines()
    assert [line[:4] for line in lines] == ["<4>t", "<6>t", "ts=2"]
    assert "event=waiting" in lines[0] and 'reason="elasticsearch down"' in lines[0]
    assert "event=plain_again" in lines[2]


@pytest.mark.parametrize(("python_level", "prefix", "name"), [
    # confluent-kafka's log_cb maps librdkafka's syslog levels to Python levels before calling
    # logger.log(): LOG_ERR (a FAIL line) arrives as 40, LOG_WARNING as 30, NOTICE/INFO as 20.
    (logging.CRITICAL, "<2>", "critical"), (logging.ERROR, "<3>", "error"),
    (logging.WARNING, "<4>", "warning"), (logging.INFO, "<6>", "info"),
])
def test_librdkafka_lines_keep_their_level(python_level: int, prefix: str, name: str,
                                           tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "stderr"
    with path.open("w", buffering=1) as stream:
        monkeypatch.setattr("sys.stderr", stream)
        monkeypatch.setenv("JOURNAL_STREAM", _stream_id(path))
        log.setup("INFO")
        RdKafkaLogger().log(python_level, "%s [%s] %s", "FAIL", "rdkafka#producer-1",
                            "[thrd:127.0.0.1:1/bootstrap]: Connect to ipv4#127.0.0.1:1 failed")
    line = path.read_text()
    assert line.startswith(prefix + "ts=")
    fields = dict(p.split("=", 1) for p in shlex.split(line.removeprefix(prefix)))
    assert fields["level"] == name
    assert fields["event"] == "librdkafka"
    assert fields["facility"] == "FAIL" and fields["client"] == "rdkafka#producer-1"


def test_every_kafka_client_in_the_package_routes_librdkafka_logs() -> None:
    """Without ``logger=`` librdkafka prints its raw ``%3|...|FAIL|...`` lines on stderr, where
    journald files them at info."""
    built: list[str] = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else \
                node.func.attr if isinstance(node.func, ast.Attribute) else ""
            if name not in ("Producer", "Consumer", "AdminClient"):
                continue
            where = f"{path.name}:{node.lineno} {name}"
            built.append(where)
            loggers = [k.value for k in node.keywords if k.arg == "logger"]
            assert loggers, f"{where} has no logger="
            assert isinstance(loggers[0], ast.Call) and isinstance(loggers[0].func, ast.Name) \
                and loggers[0].func.id == "RdKafkaLogger", f"{where}: logger is not RdKafkaLogger()"
    # consumer, producer, DLQ producer, admin, status: a rename must not make this vacuous.
    assert len(built) >= 5, built


def test_throttle_lets_one_line_per_key_through_and_counts_the_rest(
        monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(log.time, "monotonic", lambda: now[0])
    throttle = log.Throttle(interval_s=10.0)
    assert throttle.held("a") == 0
    assert throttle.held("a") is None
    assert throttle.held("b") == 0  # keys are independent
    now[0] += 5
    assert throttle.held("a") is None
    now[0] += 5
    assert throttle.held("a") == 2  # two held back since the last line
    assert throttle.held("a") is None


def test_librdkafka_repeats_are_held_back(caplog: pytest.LogCaptureFixture) -> None:
    logger = RdKafkaLogger()
    caplog.set_level(logging.INFO, logger="logpipe")
    for _ in range(20):
        logger.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#consumer-1", "connect refused")
    logger.log(logging.ERROR, "%s [%s] %s", "REQTMOUT", "rdkafka#consumer-1", "timed out")
    lines = [r for r in caplog.records if r.getMessage() == "librdkafka"]
    assert [r.fields["facility"] for r in lines] == ["FAIL", "REQTMOUT"]
