"""A consumer stuck retrying says so: in ``STATUS=`` (what ``systemctl status`` shows), in a warning
line, and in ``logpipe check`` from outside — and says so no more once it moves again.

Real servers: the stall is a write block on the test's indices (``index.blocks.write``), which
Elasticsearch answers per item with ``cluster_block_exception``, a retriable error the consumer
retries for as long as it lasts. Elasticsearch keeps answering, so ``logpipe check`` can read
everything it needs and must tell "stuck" from "busy" by the age of the group's last commit.
The consumer's ``NOTIFY_SOCKET`` is a datagram socket this test owns, as systemd's would be.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.pipeline import Pipeline, record

pytestmark = pytest.mark.slow

STALL_AFTER_S = 5.0
CHECK_WARNING_S = 12.0


@contextlib.contextmanager
def notify_socket(path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.5)
    try:
        yield sock
    finally:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def wait_status(sock: socket.socket, predicate: object, timeout: float) -> list[str]:
    """Collect ``STATUS=`` values until one satisfies ``predicate``; all seen so far."""
    assert callable(predicate)
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536).decode()
        except TimeoutError:
            continue
        for line in data.splitlines():
            if line.startswith("STATUS="):
                seen.append(line[len("STATUS="):])
                if predicate(seen[-1]):
                    return seen
    raise AssertionError(f"no matching STATUS= within {timeout:.0f}s; saw {seen[-5:]}")


def set_write_block(pipeline: Pipeline, blocked: bool) -> None:
    pipeline.es.indices.put_settings(index=f"{pipeline.index}-*",
                                       settings={"index.blocks.write": blocked})


def check(pipeline: Pipeline) -> tuple[int, str]:
    done = pipeline.cli("check", "--lag-warning", "1000000", "--lag-critical", "2000000",
                        "--stall-warning", str(CHECK_WARNING_S), "--stall-critical", "3600",
                        check=False, timeout=60)
    return done.returncode, done.stdout.strip()


def test_stuck_consumer_reports_stalled_then_recovers(pipeline: Pipeline, tmp_path: Path) -> None:
    pipeline.write_config(consumer={"batch_size": 100, "stall_after_s": STALL_AFTER_S,
                                    "retry_max_backoff_s": 1.0})
    pipeline.bootstrap()
    pipeline.produce(300)
    # Short socket path: AF_UNIX paths are limited to 108 bytes.
    sock_path = Path(f"/tmp/lp-notify-{os.getpid()}-{time.monotonic_ns() % 10**6}")
    with notify_socket(sock_path) as sock:
        consumer = pipeline.spawn("consume", env={"NOTIFY_SOCKET": str(sock_path)})
        try:
            wait_status(sock, lambda s: "lag=0" in s and "indexed=300" in s, timeout=120)
            code, line = check(pipeline)
            assert code == 0, line
            assert "stalled_s=0" in line, line

            set_write_block(pipeline, True)
            blocked_at = time.monotonic()
            pipeline.produce(200)
            stalled = wait_status(sock, lambda s: s.startswith("STALLED"), timeout=90)
            stalled_after = time.monotonic() - blocked_at
            assert "lag=0" not in stalled[-1], stalled
            assert "cluster_block_exception" in stalled[-1], stalled
            warning = consumer.wait_for_event("stalled", timeout=10)[0]
            assert warning["level"] == "warning" and warning["reason"] == "cluster_block_exception"
            assert consumer.proc.poll() is None, "a stalled consumer must keep running"

            # From outside: the group's last commit ages while the lag stays.
            deadline = time.monotonic() + 60
            code, line = check(pipeline)
            while code == 0 and time.monotonic() < deadline:
                time.sleep(2)
                code, line = check(pipeline)
            assert code == 1, line
            assert f"stalled_s>{CHECK_WARNING_S:g}" in line and "LOGPIPE WARNING" in line, line
            warning_line = line

            set_write_block(pipeline, False)
            recovered = wait_status(sock, lambda s: "lag=0" in s and "indexed=500" in s,
                                    timeout=90)
            assert not recovered[-1].startswith("STALLED"), recovered
            cleared = consumer.wait_for_event("stall_cleared", timeout=10)[0]
            code, line = check(pipeline)
            assert code == 0, line
            assert consumer.proc.poll() is None
        finally:
            with contextlib.suppress(Exception):
                set_write_block(pipeline, False)
            consumer.terminate_and_wait()
    comparison = pipeline.compare(pipeline.topic_keys())
    assert comparison.exact, comparison.describe()
    record("stall", stalled_status_after_s=round(stalled_after, 1), status=stalled[-1],
           check_while_stalled=warning_line, check_after=line, cleared=cleared.get("lag"))
