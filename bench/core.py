"""Servers (the test harness's), the per-run pipeline, and small process helpers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
_TESTS = REPO / "tests"
if str(_TESTS) not in sys.path:
    # The harness is imported as the top-level package ``harness``, exactly like tests/conftest.py
    # sees it, so the chaos suite and the benchmarks share one copy of it.
    sys.path.insert(0, str(_TESTS))

from harness.pipeline import Pipeline, Spawned, parse_events  # noqa: E402
from harness.servers import (  # noqa: E402
    ADMIN_USER,
    PRODUCER_USER,
    SCRAM,
    ElasticsearchNode,
    KafkaCluster,
    java_home,
    kafka_home,
)
from harness.servers import start_servers as servers  # noqa: E402

__all__ = ["ADMIN_USER", "PRODUCER_USER", "SCRAM", "BenchPipeline", "ElasticsearchNode",
           "KafkaCluster", "Pipeline", "ServerGroups", "Spawned", "java_home", "kafka_home",
           "parse_events", "servers", "vm_status_kib"]

def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class BenchPipeline(Pipeline):  # type: ignore[misc]
    """The harness pipeline (the CLI as a subprocess, names, config) plus per-run overrides."""

    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env: dict[str, str] = super().env({**self.extra_env, **(extra or {})})
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def consumer_env(self, group: str | None = None, index: str | None = None,
                     **consumer: Any) -> dict[str, str]:
        """Environment overrides for one consumer run: its own group id / index prefix and
        consumer settings (``LOGPIPE_CONSUMER_BATCH_SIZE`` ...)."""
        env: dict[str, str] = {}
        if group:
            env["LOGPIPE_KAFKA_GROUP_ID"] = group
        if index:
            env["LOGPIPE_ELASTICSEARCH_INDEX"] = index
        for key, value in consumer.items():
            env[f"LOGPIPE_CONSUMER_{key.upper()}"] = str(value)
        return env


def group_pids(pgid: int) -> list[int]:
    """Live processes of a process group (a server's launcher and its JVM)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            pids.append(int(entry.name))
    return pids


@dataclass(frozen=True)
class ServerGroups:
    """Process groups of the harness servers (each is started in a session of its own)."""

    es: list[int]
    kafka: list[int]

    @property
    def all(self) -> list[int]:
        return self.es + self.kafka


def server_pgids(kafka: KafkaCluster, es: ElasticsearchNode) -> ServerGroups:
    return ServerGroups(
        [es._proc.pid] if es._proc is not None and es._proc.pid else [],
        [n.proc.pid for n in kafka._nodes if n.proc is not None and n.proc.pid])


def new_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def vm_status_kib(pid: int) -> dict[str, int]:
    """``VmHWM``, ``VmRSS`` ... from /proc/<pid>/status, in KiB ({} once the process is gone)."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        if line.startswith("Vm") and line.endswith("kB"):
            name, _, rest = line.partition(":")
            with contextlib.suppress(ValueError):
                out[name] = int(rest.split()[0])
    return out


class HwmSampler:
    """Polls a process's VmHWM/VmRSS in a thread (the figures vanish with the process)."""

    def __init__(self, pid: int, interval_s: float = 0.2) -> None:
        self.pid = pid
        self.hwm_kib = 0
        self.rss_max_kib = 0
        self._stop = threading.Event()
        self._interval = interval_s
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval)

    def sample(self) -> None:
        st = vm_status_kib(self.pid)
        self.hwm_kib = max(self.hwm_kib, st.get("VmHWM", 0))
        self.rss_max_kib = max(self.rss_max_kib, st.get("VmRSS", 0))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def terminate(spawned: Spawned, timeout: float = 30.0) -> int | None:
    """SIGTERM the process (graceful: finish batch, commit, leave group); SIGKILL if it hangs."""
    if spawned.proc.poll() is not None:
        return int(spawned.proc.returncode)
    spawned.signal(signal.SIGTERM)
    code: int | None = spawned.wait(timeout)
    if code is None:
        spawned.kill()
    return code


def run_cli(pipeline: BenchPipeline, *args: str, env: Mapping[str, str] | None = None,
            timeout: float = 600.0) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run one CLI command to completion; (result, wall seconds)."""
    began = time.monotonic()
    proc = subprocess.run(pipeline.argv(*args), capture_output=True, text=True, timeout=timeout,
                          env=pipeline.env(env), cwd=pipeline.workdir, check=False)
    return proc, time.monotonic() - began
