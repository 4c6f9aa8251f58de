"""sd_notify over a real AF_UNIX datagram socket."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from logpipe import sdnotify


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    # Short directory: AF_UNIX paths are limited to ~108 bytes.
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        path = str(Path(tmp) / "notify.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(2.0)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        try:
            yield sock
        finally:
            sock.close()


def test_ready_reaches_the_socket(receiver: socket.socket) -> None:
    assert sdnotify.notify("READY=1") is True
    assert receiver.recv(4096) == b"READY=1"


def test_status_text_is_sent_verbatim(receiver: socket.socket) -> None:
    assert sdnotify.notify("STATUS=docs/s=12 lag=3 indexed=40 dlq=0")
    assert receiver.recv(4096) == b"STATUS=docs/s=12 lag=3 indexed=40 dlq=0"


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"logpipe-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2.0)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("STOPPING=1")
        assert sock.recv(4096) == b"STOPPING=1"


def test_unset_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False


def test_unreachable_socket_returns_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/tmp/logpipe-no-such-dir/notify.sock")
    assert sdnotify.notify("READY=1") is False


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval_s() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval_s() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval_s() == 30.0
    monkeypatch.delenv("WATCHDOG_USEC")
    assert sdnotify.watchdog_interval_s() is None


def test_watchdog_pings_are_rate_limited(receiver: socket.socket,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    dog = sdnotify.Watchdog(max_period_s=60.0)
    dog.ping()
    dog.ping()
    dog.ping()
    assert receiver.recv(4096) == b"WATCHDOG=1"
    receiver.settimeout(0.2)
    with pytest.raises(TimeoutError):
        receiver.recv(4096)
