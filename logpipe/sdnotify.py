"""systemd notification protocol (sd_notify) without a dependency: one datagram per state."""

from __future__ import annotations

import os
import socket
import time


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to ``$NOTIFY_SOCKET``; False when unset or unreachable.

    A socket name starting with ``@`` is in the Linux abstract namespace (leading NUL byte).
    Failures are swallowed: a missing supervisor must never stop the pipeline.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError:
        return False
    return True


def watchdog_interval_s() -> float | None:
    """The watchdog period systemd expects pings within, or None when the watchdog is off."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None


class Watchdog:
    """Rate-limited ``WATCHDOG=1`` pings: call :meth:`ping` as often as you like."""

    def __init__(self, max_period_s: float = 1.0) -> None:
        interval = watchdog_interval_s()
        # Ping at least twice per watchdog period, and never more than once per max_period_s.
        self._period = min(max_period_s, interval / 2) if interval else max_period_s
        self._enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._last = 0.0

    def ping(self) -> None:
        if not self._enabled:
            return
        now = time.monotonic()
        if now - self._last >= self._period:
            self._last = now
            notify("WATCHDOG=1")
