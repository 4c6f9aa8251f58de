"""Building blocks of the chaos run: a paced producer that keeps every acknowledged id, poison
messages, a consumer fleet whose members are killed at known phases, and the final accounting.

Everything runs against the harness's real servers on loopback. Nothing here depends on timing
for correctness: waits are bounded and only decide when to move on.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, Message, Producer
from harness.pipeline import Pipeline, Spawned
from harness.servers import QUIET_RDKAFKA

POISON_PREFIX = "poison-"


def say(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- scales ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    name: str
    logs: int  # valid logs produced
    rate: float  # logs/s of the paced producer (spreads the load over the fault schedule)
    kills: int  # SIGKILLs of the main consumer
    es_outage_s: float  # Elasticsearch stays down at least this long
    poison_rounds: int  # each round injects every poison kind once
    extra_consumers: int  # consumers added (then removed) to force rebalances
    drain_timeout_s: float


SCALES = {
    # Rates spread the logs over the fault schedule as measured on 2 loaded cores; whatever is
    # left when the schedule ends is sent at full speed.
    "full": Scale("full", 200_000, 500.0, 20, 60.0, 4, 2, 900.0),
    "ci": Scale("ci", 30_000, 130.0, 5, 20.0, 2, 1, 420.0),
}


# -- poison ---------------------------------------------------------------------------------------

MAX_MESSAGE_BYTES = 20_000


def poison_round(template: dict[str, Any], round_: int) -> list[tuple[str, bytes | None]]:
    """(key, value) of every kind of bad message, keys ``poison-<kind>-<round>``."""

    def variant(kind: str, **changes: Any) -> tuple[str, bytes]:
        key = f"{POISON_PREFIX}{kind}-{round_}"
        doc = {**template, "log_id": key, **changes}
        return key, json.dumps(doc).encode()

    k = f"-{round_}"
    return [
        (f"{POISON_PREFIX}not-json{k}", b"this is not json {"),
        (f"{POISON_PREFIX}tombstone{k}", None),
        (f"{POISON_PREFIX}not-object{k}", b"[1, 2, 3]"),
        # wrong types for the mapping
        variant("status-abc", status="abc"),
        variant("bytes-lots", bytes="lots"),
        # mapping conflicts: not an IP, an object where a float is mapped, an unknown field
        variant("bad-ip", client_ip="not-an-ip"),
        variant("object-for-float", response_time_ms={"ms": 3.2}),
        variant("unknown-field", surprise_field="strict mapping says no"),
        variant("bad-timestamp", timestamp="24/11/2026 10:00:00"),
        variant("oversized", endpoint="/" + "x" * (MAX_MESSAGE_BYTES + 1000)),
    ]


# -- producer -------------------------------------------------------------------------------------


class PacedProducer(threading.Thread):
    """``total`` logs from the package's generator at ``rate``/s with the package's producer
    settings (idempotent, acks=all), poison messages spliced in at spread-out points. Keeps the
    key of every message the brokers acknowledged."""

    def __init__(self, cfg: Any, total: int, rate: float, poison: list[tuple[str, bytes | None]],
                 seed: int) -> None:
        super().__init__(name="chaos-producer", daemon=True)
        from logpipe.producer import producer_config

        self.conf = {**producer_config(cfg), "logger": QUIET_RDKAFKA}
        self.topic = cfg.kafka.topic
        self.total = total
        self.rate = rate
        self.seed = seed
        rng = random.Random(seed)
        at = sorted(rng.randrange(total // 10, total * 9 // 10) for _ in poison)
        self.poison_at = list(zip(at, poison, strict=True))
        self.acked: set[str] = set()
        self.acked_count = 0
        self.failed: list[str] = []
        self.sent = 0
        self.stop = threading.Event()
        # Set when the fault schedule is over: the rest goes out as fast as the broker takes it.
        self.hurry = threading.Event()
        self.error: BaseException | None = None

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        key = (msg.key() or b"").decode("utf-8", "replace")
        if err is None:
            self.acked.add(key)
            self.acked_count += 1
        else:
            self.failed.append(f"{key}: {err}")

    def _send(self, producer: Any, key: str, value: bytes | None) -> None:
        while True:
            try:
                producer.produce(self.topic, value=value, key=key.encode(),
                                 on_delivery=self._on_delivery)
                return
            except BufferError:
                producer.poll(0.05)

    def run(self) -> None:
        try:
            from logpipe.generator import LogGenerator

            gen = LogGenerator(self.seed)
            producer = Producer(self.conf)
            chunk = max(1, int(self.rate / 20))
            started = time.monotonic()
            pending = list(self.poison_at)
            while self.sent < self.total and not self.stop.is_set():
                due = int((time.monotonic() - started) * self.rate) + 1
                if self.hurry.is_set():
                    due = self.total
                if self.sent >= due:
                    producer.poll(0.02)
                    continue
                n = min(chunk, due - self.sent, self.total - self.sent)
                for raw_key, value in gen.messages(n):
                    self._send(producer, raw_key.decode(), value)
                self.sent += n
                while pending and pending[0][0] <= self.sent:
                    _, (key, bad) = pending.pop(0)
                    self._send(producer, key, bad)
                producer.poll(0)
            for _, (key, bad) in pending:  # stopped early: still inject every poison message
                self._send(producer, key, bad)
            left = producer.flush(300)
            if left:
                self.failed.append(f"{left} message(s) still queued after flush")
        except BaseException as exc:  # reported by the test
            self.error = exc


# -- consumers and kills --------------------------------------------------------------------------

# Innermost frame of ours on the main thread -> phase (first match wins, innermost first).
_PHASE_FRAMES: tuple[tuple[str, str], ...] = (
    ("_commit", "commit (bulk done, commit in flight)"),
    ("_dead_letter", "dead-lettering"),
    # With the pipeline full: every batch in hand has its request in flight (two, by default).
    ("_await_answer", "mid-bulk"),
    ("make_doc", "building documents"),
    # The pipeline: batch N's request is in flight (and, right after a batch was handled, its
    # asynchronous commit too) while the next batch is fetched and built, to be sent beside it.
    ("_build_ahead", "bulk N in flight, batch N+1 being built"),  # see BUILD_AHEAD
    ("_start", "between fetch and bulk"),
    ("_finish", "between bulk and commit"),
    ("_accept", "mid-fetch"),
    ("_fetch", "mid-fetch"),
    ("_on_assign", "rebalance callback"),
    ("_on_revoke", "rebalance callback"),
    ("_wait_ready", "waiting for Kafka/Elasticsearch"),
    ("_close", "shutting down"),
    ("_tick", "status tick"),
    ("_loop", "main loop"),
)
BUILD_AHEAD = "bulk N in flight, batch N+1 being built"
_AHEAD_OF = frozenset({"mid-fetch", "building documents", "between fetch and bulk"})
# Kill targets, in rotation; "any" takes the first sample.
TARGETS = ("mid-bulk", "bulk N in flight, batch N+1 being built",
           "commit (bulk done, commit in flight)", "mid-fetch", "between bulk and commit", "any")


def _py_spy() -> str | None:
    exe = Path(sys.executable).parent / "py-spy"
    return str(exe) if exe.exists() else shutil.which("py-spy")


def phase_of(pid: int, spy: str | None) -> str:
    """Where the (stopped) consumer's main thread is, from a py-spy stack dump."""
    if spy is None:
        return "unknown (py-spy not installed)"
    try:
        out = subprocess.run([spy, "dump", "--pid", str(pid), "--nonblocking"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (py-spy failed)"
    frames: list[str] = []
    in_main = False
    for line in out.splitlines():
        if line.startswith("Thread "):
            in_main = '"MainThread"' in line
            continue
        if in_main and line.startswith("    "):
            frames.append(line.strip().split(" ", 1)[0].rsplit(".", 1)[-1])
    if not frames:
        return "starting up"
    for frame in frames:  # innermost first
        for name, phase in _PHASE_FRAMES:
            if frame == name:
                # Fetching and building under _build_ahead is the pipeline's own phase.
                if "_build_ahead" in frames and phase in _AHEAD_OF:
                    return BUILD_AHEAD
                return phase
    return "starting up"


@dataclass
class Kill:
    n: int
    target: str
    phase: str
    attempts: int
    at_s: float
    consumer_log: str


@dataclass
class Fleet:
    """The main consumer (killed and restarted) and extra members that come and go."""

    pipeline: Pipeline
    rng: random.Random
    started: float
    main: Spawned | None = None
    extras: list[Spawned] = field(default_factory=list)
    all: list[Spawned] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)
    spy: str | None = field(default_factory=_py_spy)

    def spawn(self, name: str) -> Spawned:
        s = self.pipeline.spawn("consume", log_name=name)
        self.all.append(s)
        return s

    def start_main(self) -> Spawned:
        self.main = self.spawn(f"main{len(self.kills)}")
        return self.main

    def check_main(self) -> None:
        """A consumer that exited on its own is a finding: record it and start another."""
        if self.main is not None and self.main.proc.poll() is not None:
            self.crashes.append(f"{self.main.log_path.name} exited {self.main.proc.returncode}")
            say(f"main consumer exited on its own ({self.main.proc.returncode}); restarting")
            self.start_main()

    def wait_working(self, timeout: float) -> None:
        """Until the current main consumer committed a batch (bounded; returns either way)."""
        assert self.main is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.main.proc.poll() is not None:
                self.check_main()
                return
            if "event=batch_committed" in self.main.log():
                return
            time.sleep(0.1)

    def kill_main(self, target: str, max_attempts: int = 60) -> Kill:
        """SIGSTOP, look where it is, SIGCONT and retry until it is in ``target`` (bounded),
        then SIGKILL while stopped: the kill lands exactly in the phase recorded."""
        assert self.main is not None
        victim = self.main
        pid = victim.pid
        phase = "unknown"
        attempts = 0
        for attempts in range(1, max_attempts + 1):
            if victim.proc.poll() is not None:
                phase = "already exited"
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
            phase = phase_of(pid, self.spy)
            if target == "any" or phase == target or attempts == max_attempts \
                    or phase.startswith("unknown"):
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            time.sleep(self.rng.uniform(0.0, 0.04))
        victim.kill()  # SIGKILL to the process group (works on a stopped process)
        kill = Kill(len(self.kills) + 1, target, phase, attempts,
                    round(time.monotonic() - self.started, 1), victim.log_path.name)
        self.kills.append(kill)
        say(f"kill -9 #{kill.n}: {phase} (target {target}, {attempts} look(s))")
        self.start_main()
        return kill

    def add_extra(self) -> Spawned:
        s = self.spawn(f"extra{len(self.extras)}")
        self.extras.append(s)
        return s

    def stop_all(self) -> dict[str, int | None]:
        codes: dict[str, int | None] = {}
        for s in [*self.extras, *([self.main] if self.main else [])]:
            if s.proc.poll() is None:
                codes[s.log_path.name] = s.terminate_and_wait(40)
        return codes

    def kill_all(self) -> None:
        for s in self.all:
            with contextlib.suppress(Exception):
                s.kill()

    def event_totals(self) -> Counter[str]:
        totals: Counter[str] = Counter()
        for s in self.all:
            for e in s.events():
                name = e.get("event", "")
                totals[f"events:{name}"] += 1
                if name == "batch_committed":
                    for key in ("created", "already_present", "dlq", "retried"):
                        totals[key] += int(e.get(key, 0))
        return totals


# -- accounting -----------------------------------------------------------------------------------


@dataclass
class EsDocs:
    ids: Counter[str]
    versions_over_1: list[str]
    log_id_mismatch: list[str]


def es_documents(pipeline: Pipeline) -> EsDocs:
    """Every document under the test's index prefix: _id counts, _version > 1, log_id != _id."""
    es = pipeline.es
    pipeline.refresh()
    ids: Counter[str] = Counter()
    over: list[str] = []
    mismatch: list[str] = []
    resp = es.search(index=f"{pipeline.index}-*", scroll="2m", size=5000, sort=["_doc"],
                     version=True, source_includes=["log_id"], allow_no_indices=True,
                     ignore_unavailable=True)
    scroll_id = resp.get("_scroll_id")
    try:
        while resp["hits"]["hits"]:
            for h in resp["hits"]["hits"]:
                ids[h["_id"]] += 1
                if h.get("_version", 1) > 1:
                    over.append(h["_id"])
                if h.get("_source", {}).get("log_id") != h["_id"]:
                    mismatch.append(h["_id"])
            resp = es.scroll(scroll_id=scroll_id, scroll="2m")
            scroll_id = resp.get("_scroll_id")
    finally:
        if scroll_id:
            es.clear_scroll(scroll_id=scroll_id)
    return EsDocs(ids, over, mismatch)


def duplicate_log_ids(pipeline: Pipeline) -> dict[str, int]:
    """``log_id`` values on more than one document across the alias (terms aggregation)."""
    pipeline.refresh()
    r = pipeline.es.search(index=pipeline.index, size=0,
                           aggs={"dups": {"terms": {"field": "log_id", "min_doc_count": 2,
                                                    "size": 10_000}}})
    return {b["key"]: b["doc_count"] for b in r["aggregations"]["dups"]["buckets"]}
