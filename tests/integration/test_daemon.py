"""``logpipe consume --daemon`` (python-daemon) on real Kafka and Elasticsearch, for hosts without
systemd: the parent returns at once, the daemon detaches, writes its pidfile and its log file,
indexes what is produced, and on SIGTERM commits, removes the pidfile and exits. A pidfile left
without a pid is cleared; a second start while the daemon runs is refused.

Detachment is read from the kernel (``/proc/<pid>/stat``): another session than the test's, not a
session leader (so it can never acquire a controlling terminal again), no controlling terminal,
not the test's child. The parent runs with its stdout/stderr on pipes it must not leave open in
the daemon, or reading them would never end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness.pipeline import Pipeline, parse_events, record

pytestmark = pytest.mark.slow

BEFORE, WHILE_RUNNING = 1000, 1500


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` this test reads (proc(5))."""

    state: str
    ppid: int
    pgrp: int
    session: int
    tty_nr: int

    @classmethod
    def read(cls, pid: int) -> ProcStat | None:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return None
        # The command name is in parentheses and may itself hold spaces or parentheses.
        fields = text[text.rindex(")") + 2:].split()
        return cls(state=fields[0], ppid=int(fields[1]), pgrp=int(fields[2]),
                   session=int(fields[3]), tty_nr=int(fields[4]))


def _alive(pid: int) -> bool:
    stat = ProcStat.read(pid)
    # A zombie has exited; whoever adopted it (init or a subreaper) has not reaped it yet.
    return stat is not None and stat.state not in ("Z", "X")


def _start(argv: list[str], pipeline: Pipeline, cwd: Path
           ) -> tuple[subprocess.Popen[bytes], str, str]:
    """Run the daemon's parent to its exit; its stdout and stderr are pipes the daemon must not
    keep open, or reading them would not end."""
    parent = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, env=pipeline.env(), cwd=cwd)
    try:
        out, err = parent.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        parent.kill()
        raise AssertionError("the parent did not return (or the daemon kept its stdout/stderr "
                             "pipes open) within 60 s") from None
    return parent, out.decode(), err.decode()


def _wait(what: str, condition: object, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.2)
    tail = log.read_text()[-4000:] if log.exists() else "(no log file)"
    raise AssertionError(f"{what} not within {timeout:.0f}s; daemon log tail:\n{tail}")


def test_daemon_detaches_indexes_and_stops_cleanly(pipeline: Pipeline, tmp_path: Path) -> None:
    pipeline.bootstrap()
    pipeline.produce(BEFORE)
    rundir = tmp_path / "run"
    rundir.mkdir()
    # Relative paths on purpose: the daemon changes to / and must have resolved them first.
    argv = [sys.executable, "-m", "logpipe", "consume", "--daemon",
            "--pidfile", "consumer.pid", "--log-file", "consumer.log"]
    pidfile, logfile = rundir / "consumer.pid", rundir / "consumer.log"
    # Left behind by a crash in the middle of writing it: no pid, nobody holds it.
    pidfile.write_text("")

    began = time.monotonic()
    parent, out, err = _start(argv, pipeline, rundir)
    parent_s = time.monotonic() - began
    assert parent.returncode == 0, f"parent exited {parent.returncode}: {err[-2000:]}"
    # The parent's only line: the stale pidfile it cleared (the daemon logs to its file).
    assert out == "" and len(err.splitlines()) == 1, f"the parent printed: {out!r} {err!r}"
    stale = parse_events(err, "stale_pidfile_removed")
    assert stale and stale[0]["level"] == "warning" and stale[0]["pid"] == "none", err

    _wait("the pidfile", pidfile.exists, 60, logfile)
    _wait("a pid in the pidfile", lambda: pidfile.read_text().strip().isdigit(), 10, logfile)
    pid = int(pidfile.read_text())
    stat = ProcStat.read(pid)
    try:
        assert stat is not None and _alive(pid), f"pid {pid} from the pidfile is not running"
        assert pid != parent.pid
        # Detached: its own session, not a session leader (the second fork), no controlling
        # terminal, adopted (not the test's child, not the parent's).
        assert stat.session != os.getsid(0), stat
        assert stat.session != pid, f"the daemon leads its session: {stat}"
        assert stat.tty_nr == 0, f"controlling terminal {stat.tty_nr}"
        assert stat.ppid not in (os.getpid(), parent.pid), stat
        assert Path(f"/proc/{pid}/cwd").resolve() == Path("/")

        _wait("event=ready in the log file", lambda: bool(parse_events(logfile.read_text(),
                                                                       "ready")), 90, logfile)
        # A second start with the same pidfile refuses and leaves the running daemon alone.
        second, out, err = _start(argv, pipeline, rundir)
        assert second.returncode == 1, f"second start exited {second.returncode}: {err}"
        assert f"already running with pid {pid}" in err, err
        assert int(pidfile.read_text()) == pid and _alive(pid)
        pipeline.produce(WHILE_RUNNING)
        total = BEFORE + WHILE_RUNNING
        assert pipeline.wait_doc_count(total, timeout=120) == total, logfile.read_text()[-4000:]
        keys = pipeline.topic_keys()
        assert len(keys) == total
        cmp = pipeline.compare(keys)
        assert cmp.exact and cmp.documents == total, cmp.describe()
        _wait("offsets committed to the end while running",
              lambda: pipeline.committed() == pipeline.end_offsets(), 60, logfile)

        stopping = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        _wait("the daemon to exit after SIGTERM", lambda: not _alive(pid), 60, logfile)
        stop_s = time.monotonic() - stopping
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)

    text = logfile.read_text()
    print(f"--- daemon log ({logfile.name}):\n{text}")
    assert not pidfile.exists(), "the pidfile outlived the daemon"
    lines = text.splitlines()
    assert lines and all(line.startswith("ts=") for line in lines), \
        "not only key=value lines (a traceback? a raw librdkafka line? a journal prefix?)"
    assert not [line for line in lines if "level=error" in line], text[-4000:]
    started = parse_events(text, "daemon_started")
    assert len(started) == 1 and started[0]["pid"] == str(pid)
    assert started[0]["pidfile"] == str(pidfile), "the pidfile's resolved path, not as given"
    shutdown = parse_events(text, "shutdown")
    assert len(shutdown) == 1, text[-4000:]
    assert shutdown[0]["left_for_redelivery"] == "0"
    assert int(shutdown[0]["indexed"]) == total
    stopped = parse_events(text, "daemon_stopped")
    assert [e["code"] for e in stopped] == ["0"], text[-2000:]

    committed, ends = pipeline.committed(), pipeline.end_offsets()
    lag = sum(ends[p] - committed.get(p, 0) for p in ends)
    assert committed == ends, f"committed {committed} != end {ends}"
    record("daemon", parent_exit=parent.returncode, parent_s=round(parent_s, 2), pid=pid,
           parent_pid=parent.pid, session=stat.session, ppid=stat.ppid, tty_nr=stat.tty_nr,
           documents=cmp.documents, produced=total, lag=lag, stop_s=round(stop_s, 1))
