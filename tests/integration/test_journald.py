"""journald priorities, as systemd would see them: ``python -m logpipe`` with ``JOURNAL_STREAM``
naming its stderr (a file standing in for the journal socket: the variable is only a device and
inode number, the process cannot tell the difference).

Each line must start with its sd-daemon priority (``<3>`` error, ``<4>`` warning, ``<6>`` info),
librdkafka's own lines included (as ``event=librdkafka`` key=value lines, never its raw
``%3|...|FAIL|...`` format), and lines must stay plain when the variable names another stream.
The journal itself is checked by molecule/logpipe (``journalctl -p warning`` during an outage).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from harness.pipeline import Pipeline
from harness.servers import REPO, free_port

# What a journald line must look like: priority, then the key=value line.
LINE = re.compile(r"<(?P<prio>[0-7])>(?P<rest>ts=\S+ level=(?P<level>\w+) event=\S+.*)\Z")
PRIORITY = {"critical": "2", "error": "3", "warning": "4", "info": "6", "debug": "7"}
# librdkafka's own format, as it prints without a logger: %<level>|<ts>|<facility>|<client>|...
RAW_RDKAFKA = re.compile(r"%\d\|")


def _stream_id(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def _env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    env = dict(base) if base is not None else {
        k: v for k, v in os.environ.items() if not k.startswith("LOGPIPE_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _logpipe(args: list[str], stderr_path: Path, env: dict[str, str], journal: bool = True,
             timeout: float = 120.0) -> tuple[int, list[str]]:
    """Run ``python -m logpipe <args>`` with stderr appended to ``stderr_path``; with ``journal``
    JOURNAL_STREAM names that file. Returns the exit code and this run's stderr lines."""
    stderr_path.touch()
    before = stderr_path.stat().st_size
    env = dict(env)
    env.pop("JOURNAL_STREAM", None)
    if journal:
        env["JOURNAL_STREAM"] = _stream_id(stderr_path)
    with stderr_path.open("a") as fh:
        proc = subprocess.run([sys.executable, "-m", "logpipe", *args], stdout=subprocess.DEVNULL,
                              stderr=fh, stdin=subprocess.DEVNULL, env=env, cwd=stderr_path.parent,
                              timeout=timeout, check=False)
    with stderr_path.open() as fh:
        fh.seek(before)
        return proc.returncode, fh.read().splitlines()


def _fields(line: str) -> dict[str, str]:
    m = LINE.match(line)
    assert m, f"not a journald key=value line: {line!r}"
    return dict(p.split("=", 1) for p in shlex.split(m["rest"]))


def _check_journal_lines(lines: list[str]) -> list[dict[str, str]]:
    """Every line is ``<prio>ts=... level=... event=...`` with the priority its level demands."""
    assert lines, "no output at all"
    assert not [line for line in lines if RAW_RDKAFKA.search(line)], \
        "raw librdkafka lines on stderr:\n" + "\n".join(lines[:10])
    out = []
    for line in lines:
        m = LINE.match(line)
        assert m, f"not a journald key=value line: {line!r}\n(all lines:\n" + \
            "\n".join(lines[:20]) + ")"
        assert m["prio"] == PRIORITY[m["level"]], f"priority {m['prio']} for {m['level']}: {line}"
        out.append(_fields(line))
    return out


def test_closed_kafka_port_logs_librdkafka_errors_at_priority_3(tmp_path: Path) -> None:
    """Producer, status consumer and admin client against a port nobody listens on: librdkafka
    reports each refused connection (its LOG_ERR ``FAIL``), which must reach the journal at
    priority 3 as key=value, never as the raw line journald would file at info."""
    config = tmp_path / "logpipe.toml"
    config.write_text("")
    env = _env(LOGPIPE_CONFIG=str(config),
               LOGPIPE_KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}",
               LOGPIPE_ELASTICSEARCH_HOSTS=f"http://127.0.0.1:{free_port()}",
               LOGPIPE_PRODUCER_FLUSH_TIMEOUT_S="3")
    runs = {
        "produce": (["produce", "--count", "5"], "logpipe-producer"),
        "status": (["status"], "logpipe-status"),
        "bootstrap": (["bootstrap", "--only", "kafka", "--wait", "3"], "logpipe-admin"),
    }
    for name, (args, client) in runs.items():
        code, lines = _logpipe(args, tmp_path / f"{name}.stderr", env)
        print(f"--- logpipe {' '.join(args)}: exit {code}, {len(lines)} lines, e.g.\n"
              + "\n".join(lines[:3]))
        assert code == 1, f"{name} exited {code}:\n" + "\n".join(lines[-20:])
        events = _check_journal_lines(lines)
        rdkafka = [e for e in events if e["event"] == "librdkafka"]
        assert rdkafka, f"{name}: no librdkafka line:\n" + "\n".join(lines[:20])
        fail = [e for e in rdkafka if e["facility"] == "FAIL"]
        assert fail, f"{name}: no librdkafka FAIL line:\n" + "\n".join(lines[:20])
        assert all(e["level"] == "error" for e in fail), fail[:3]
        assert all(e["client"].startswith(client + "#") for e in rdkafka), rdkafka[:3]
        assert all("Connection refused" in e["message"] for e in fail), fail[:3]
        failed = [line for line in lines if line.startswith("<3>")
                  and "event=librdkafka" in line]
        assert failed, f"{name}: no librdkafka line at priority 3"
    # The producer's own summary: info, then the error that explains the exit code.
    produce = _check_journal_lines(_logpipe(runs["produce"][0], tmp_path / "again.stderr", env)[1])
    assert [e["event"] for e in produce if e["event"] != "librdkafka"] == \
        ["produce_start", "produce_done", "produce_incomplete"]


def test_config_error_is_an_error_line(tmp_path: Path) -> None:
    config = tmp_path / "logpipe.toml"
    config.write_text("[consumer]\nbatch_size = 'many'\n")
    code, lines = _logpipe(["consume"], tmp_path / "stderr", _env(LOGPIPE_CONFIG=str(config)))
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("<3>logpipe: config error: consumer.batch_size")


def test_real_servers_info_and_warning_priorities(pipeline: Pipeline, tmp_path: Path) -> None:
    """Bootstrap, produce and a run-once consume on real servers: info lines at ``<6>``; the
    same commands with JOURNAL_STREAM naming another stream (inherited by a redirected child)
    print plain lines; a consumer whose Elasticsearch is unreachable warns at ``<4>``."""
    env = pipeline.env()
    stderr = tmp_path / "journal.stderr"
    code, lines = _logpipe(["bootstrap"], stderr, env)
    assert code == 0, "\n".join(lines[-20:])
    code, produced = _logpipe(["produce", "--count", "300"], stderr, env)
    assert code == 0, "\n".join(produced[-20:])
    code, consumed = _logpipe(["consume", "--max-batches", "100"], stderr, env)
    assert code == 0, "\n".join(consumed[-20:])
    events = _check_journal_lines(lines + produced + consumed)
    seen = {e["event"] for e in events}
    assert {"produce_start", "produce_done", "consumer_started", "ready", "batch_committed",
            "shutdown"} <= seen, seen
    done = [e for e in events if e["event"] == "produce_done"]
    assert done and done[0]["delivered"] == "300"
    assert pipeline.wait_doc_count(300, timeout=60) == 300

    # JOURNAL_STREAM inherited, stderr elsewhere: plain lines.
    other = tmp_path / "other.stderr"
    other.touch()
    code, plain = _logpipe(["produce", "--count", "10"], tmp_path / "plain.stderr",
                           {**env, "JOURNAL_STREAM": _stream_id(other)}, journal=False)
    assert code == 0
    assert plain and all(line.startswith("ts=") for line in plain), plain[:3]

    # Elasticsearch unreachable: the service-mode consumer warns while it waits.
    outage = tmp_path / "outage.stderr"
    outage.touch()
    service_env = {**env, "LOGPIPE_ELASTICSEARCH_HOSTS": f"http://127.0.0.1:{free_port()}",
                   "JOURNAL_STREAM": _stream_id(outage)}
    with outage.open("a") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "logpipe", "consume"], stderr=fh,
                                stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                env=service_env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "<4>" not in outage.read_text():
            assert proc.poll() is None, outage.read_text()[-3000:]
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    lines = outage.read_text().splitlines()
    print("--- consumer with Elasticsearch unreachable:\n" + "\n".join(lines[:6]))
    events = _check_journal_lines(lines)
    waiting = [line for line in lines if line.startswith("<4>") and "event=waiting" in line]
    assert waiting, "\n".join(lines)
    assert "elasticsearch" in _fields(waiting[0])["reason"]
    assert code == 0 and events[-1]["event"] == "shutdown", lines[-5:]
