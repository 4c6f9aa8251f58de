"""The measurements: each returns plain figures; bench/__main__.py orders them and reports."""

from __future__ import annotations

import contextlib
import http.client
import math
import os
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from bench.core import (
    BenchPipeline,
    HwmSampler,
    Spawned,
    group_pids,
    log,
    new_name,
    parse_events,
    terminate,
)
from logpipe import admin
from logpipe.config import Config
from logpipe.generator import LogGenerator
from logpipe.producer import produce, producer_config

# ---------------------------------------------------------------------------------------------
# process accounting


def _clock_ticks() -> int:
    return int(os.sysconf("SC_CLK_TCK"))


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), 0 when gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _clock_ticks()


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds of every live process in a process group (the ES launcher + its JVM)."""
    return sum(cpu_seconds(pid) for pid in group_pids(pgid))


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def parse_ts(ts: str) -> float:
    """``2026-11-24T17:01:02.123Z`` -> epoch seconds."""
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def uuid7_ms(log_id: str) -> int:
    """The Unix milliseconds a UUIDv7 was made at (its first 48 bits)."""
    return int(log_id.replace("-", "")[:12], 16)


# ---------------------------------------------------------------------------------------------
# producer


@dataclass
class ProducerFigures:
    ceiling_msgs_per_s: float
    real_logs_per_s: float
    generate_only_logs_per_s: float
    ceiling_runs: list[float]
    real_runs: list[float]
    messages_per_run: int
    avg_message_bytes: float


def produce_prebuilt(cfg: Config, messages: Sequence[tuple[bytes, bytes]]) -> float:
    """The ceiling: pre-built (key, value) pairs through confluent-kafka with the producer's own
    settings, in the tightest loop (queue-full -> poll), flushed; delivered messages/s."""
    delivered = [0]
    failed = [0]

    def on_delivery(err: KafkaError | None, _msg: Any) -> None:
        if err is None:
            delivered[0] += 1
        else:
            failed[0] += 1

    producer = Producer(producer_config(cfg))
    topic = cfg.kafka.topic
    send = producer.produce
    poll = producer.poll
    started = time.monotonic()
    for i, (key, value) in enumerate(messages):
        while True:
            try:
                send(topic, value, key, on_delivery=on_delivery)
                break
            except BufferError:
                poll(0.05)
        if i % 1000 == 999:
            poll(0)
    remaining = producer.flush(60)
    elapsed = time.monotonic() - started
    if remaining or failed[0]:
        raise RuntimeError(f"ceiling producer: {remaining} queued, {failed[0]} failed")
    return delivered[0] / elapsed


def producer_bench(cfg: Config, count: int, rounds: int = 2) -> ProducerFigures:
    """Alternate ceiling and real producer runs of ``count`` messages; best of each."""
    gen = LogGenerator(seed=7)
    t0 = time.monotonic()
    sample = gen.messages(min(count, 50_000))
    gen_rate = len(sample) / (time.monotonic() - t0)
    avg_bytes = sum(len(v) for _, v in sample) / len(sample)
    ceiling_runs: list[float] = []
    real_runs: list[float] = []
    # Warm-up: the first idempotent producer on a new cluster waits for the coordinator to load.
    produce_prebuilt(cfg, sample[:1000])
    for r in range(rounds):
        # Fresh messages every round: log_id is the document id, re-sending ids would make
        # the consumer's backlog part duplicates.
        prebuilt = gen.messages(count)
        ceiling_runs.append(produce_prebuilt(cfg, prebuilt))
        del prebuilt
        log(f"producer ceiling round {r + 1}: {ceiling_runs[-1]:,.0f} msgs/s")
        result = produce(cfg, count, seed=r)
        if not result.ok:
            raise RuntimeError(f"real producer lost messages: {result}")
        real_runs.append(result.rate)
        log(f"producer (real) round {r + 1}: {real_runs[-1]:,.0f} logs/s")
    return ProducerFigures(max(ceiling_runs), max(real_runs), gen_rate, ceiling_runs, real_runs,
                           count, avg_bytes)


# ---------------------------------------------------------------------------------------------
# raw _bulk ceiling


def now_iso() -> str:
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def build_bodies(messages: Sequence[tuple[bytes, bytes]], index_prefix: str, batch_size: int,
                 concurrency: int) -> list[list[bytes]]:
    """The consumer's requests, pre-built: per batch, ``concurrency`` contiguous NDJSON bodies of
    ``create`` actions with ``_id`` = key into the event's daily index, ``indexed_at`` added."""
    suffix = b',"indexed_at":"' + now_iso().encode() + b'"}\n'
    prefix = index_prefix.encode()
    batches: list[list[bytes]] = []
    for start in range(0, len(messages), batch_size):
        batch = messages[start:start + batch_size]
        chunks = concurrency if len(batch) >= 2 * concurrency else 1
        size = -(-len(batch) // chunks)
        bodies = []
        for c in range(0, len(batch), size):
            parts: list[bytes] = []
            for key, value in batch[c:c + size]:
                ts = value.index(b'"timestamp":"') + 13
                day = value[ts:ts + 4] + b"." + value[ts + 5:ts + 7] + b"." + value[ts + 8:ts + 10]
                parts.append(b'{"create":{"_index":"' + prefix + b"-" + day + b'","_id":"' + key
                             + b'"}}\n' + value[:value.rindex(b"}")] + suffix)
            bodies.append(b"".join(parts))
        batches.append(bodies)
    return batches


@dataclass
class BulkFigures:
    docs: int
    seconds: float
    errors: int
    es_cpu_s: float

    @property
    def docs_per_s(self) -> float:
        return self.docs / self.seconds


class _Poster:
    """One persistent HTTP/1.1 connection posting NDJSON bodies to /_bulk."""

    def __init__(self, port: int, filter_path: str = "errors") -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.errors = 0
        self.path = f"/_bulk?filter_path={filter_path}"

    def post(self, body: bytes) -> None:
        self.conn.request("POST", self.path, body,
                          {"Content-Type": "application/x-ndjson"})
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.status != 200 or b'"errors":false' not in data:
            self.errors += 1

    def close(self) -> None:
        self.conn.close()


def bulk_ceiling(port: int, batches: list[list[bytes]], es_pgid: int | None, *,
                 filter_path: str = "errors") -> BulkFigures:
    """Post pre-built batches; within a batch its bodies go in parallel (one connection each),
    the next batch starts when all are answered (like the consumer's bulk_concurrency).
    ``filter_path`` is the answer asked for (the consumer's, to compare what an answer costs)."""
    width = max(len(b) for b in batches)
    posters = [_Poster(port, filter_path) for _ in range(width)]
    docs = sum(body.count(b"\n") for batch in batches for body in batch) // 2
    cpu0 = group_cpu_seconds(es_pgid) if es_pgid else 0.0
    started = time.monotonic()
    if width == 1:
        post = posters[0].post
        for batch in batches:
            post(batch[0])
    else:
        with ThreadPoolExecutor(width) as pool:
            for batch in batches:
                list(pool.map(lambda pb: pb[0].post(pb[1]), zip(posters, batch, strict=False)))
    elapsed = time.monotonic() - started
    cpu = (group_cpu_seconds(es_pgid) - cpu0) if es_pgid else 0.0
    for p in posters:
        p.close()
    return BulkFigures(docs, elapsed, sum(p.errors for p in posters), cpu)


def es_delete(port: int, pattern: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("DELETE", f"/{pattern}?expand_wildcards=open,closed")
        conn.getresponse().read()
    finally:
        conn.close()


@dataclass
class WarmUp:
    docs_per_s: list[float]
    docs: int
    seconds: float
    stable: bool


def warm_up(cfg: Config, port: int, messages: Sequence[tuple[bytes, bytes]], *, batch_size: int,
            concurrency: int, es_pgid: int | None, min_docs: int = 300_000,
            max_seconds: float = 150.0, label: str = "warm-up") -> WarmUp:
    """Ceiling runs over ``messages`` until Elasticsearch's rate settles: at least ``min_docs``
    indexed, then until the last three runs are within 10 % of each other (or ``max_seconds``).

    A fresh node's JIT keeps speeding it up for the first ~600,000 documents (measured
    2026-11-30: 5,200 -> 12,500 -> 20,900 -> 23,300 -> 30,200 docs/s over the first five
    runs of 100,000, flat from the sixth on). A comparison started before that compares each
    run with a faster node than the one before it. Each run's indices are deleted after it."""
    rates: list[float] = []
    docs = 0
    began = time.monotonic()
    stable = False
    while time.monotonic() - began < max_seconds:
        index = new_name("bench-warm")
        ensure_index_template(cfg, index)
        bf = bulk_ceiling(port, build_bodies(messages, index, batch_size, concurrency), es_pgid)
        es_delete(port, f"{index}-*")
        rates.append(bf.docs_per_s)
        docs += bf.docs
        last = rates[-3:]
        stable = docs >= min_docs and len(last) == 3 and max(last) <= 1.10 * min(last)
        log(f"{label} {len(rates)}: {bf.docs_per_s:,.0f} docs/s ({docs:,} docs so far)"
            + (", settled" if stable else ""))
        if stable:
            break
    return WarmUp(rates, docs, time.monotonic() - began, stable)


def bulk_ceiling_streams(port: int, bodies: Sequence[bytes], inflight: int,
                         es_pgid: int | None) -> BulkFigures:
    """Post pre-built bodies with ``inflight`` requests in flight at all times: that many
    connections, each taking the next body as soon as its previous answer is in (no barrier
    between them: the ceiling of ``inflight`` independent consumers, one request each)."""
    if inflight <= 1:
        return bulk_ceiling(port, [[b] for b in bodies], es_pgid)
    posters = [_Poster(port) for _ in range(inflight)]
    docs = sum(body.count(b"\n") for body in bodies) // 2
    todo = iter(bodies)
    lock = threading.Lock()

    def drain(poster: _Poster) -> None:
        while True:
            with lock:
                body = next(todo, None)
            if body is None:
                return
            poster.post(body)

    cpu0 = group_cpu_seconds(es_pgid) if es_pgid else 0.0
    started = time.monotonic()
    with ThreadPoolExecutor(inflight) as pool:
        list(pool.map(drain, posters))
    elapsed = time.monotonic() - started
    cpu = (group_cpu_seconds(es_pgid) - cpu0) if es_pgid else 0.0
    for p in posters:
        p.close()
    return BulkFigures(docs, elapsed, sum(p.errors for p in posters), cpu)


def consumer_ceiling(port: int, messages: Sequence[tuple[bytes, bytes]], index_prefix: str, *,
                     batch_size: int, concurrency: int, inflight: int,
                     es_pgid: int | None) -> BulkFigures:
    """The raw ceiling of a consumer's request shapes: bodies of ``batch_size / concurrency``
    documents, ``inflight`` of them in flight (what the consumer may have: bulk_concurrency x
    pipeline_depth per process), each connection posting its next as soon as it is answered."""
    bodies = [b for batch in build_bodies(messages, index_prefix, batch_size, concurrency)
              for b in batch]
    return bulk_ceiling_streams(port, bodies, inflight, es_pgid)


def ensure_index_template(cfg: Config, index_prefix: str, **settings: Any) -> None:
    """The package's own index template (mapping, shards, replicas, refresh) for a prefix."""
    from logpipe.es import make_client

    escfg = cfg.replace("elasticsearch", index=index_prefix, **settings).elasticsearch
    es = make_client(escfg)
    try:
        # What `logpipe bootstrap` does for Elasticsearch: the template, then today's index.
        admin.ensure_template(es, escfg)
        admin.ensure_today_index(es, escfg)
    finally:
        es.close()


def ensure_topic(cfg: Config, topic: str, partitions: int | None = None) -> None:
    kcfg = cfg.replace("kafka", topic=topic, dlq_topic=f"{topic}.dlq",
                       partitions=partitions or cfg.kafka.partitions).kafka
    admin.bootstrap_kafka(kcfg)


def read_messages(bootstrap: str, topic: str, limit: int | None = None,
                  ) -> list[tuple[bytes, bytes]]:
    """(key, value) of every message in ``topic`` (one pass to the end offsets)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-read-{time.time_ns()}",
                  "enable.auto.commit": False, "enable.partition.eof": True})
    try:
        md = c.list_topics(topic, timeout=10)
        parts = sorted(md.topics[topic].partitions)
        ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in parts}
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        pending = {p for p, e in ends.items() if e > 0}
        out: list[tuple[bytes, bytes]] = []
        deadline = time.monotonic() + 300
        while pending and time.monotonic() < deadline:
            for msg in c.consume(5000, 1.0):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        pending.discard(msg.partition())
                    continue
                if msg.offset() < ends[msg.partition()]:
                    out.append((msg.key(), msg.value()))
                if msg.offset() + 1 >= ends[msg.partition()]:
                    pending.discard(msg.partition())
            if limit is not None and len(out) >= limit:
                break
        return out[:limit] if limit is not None else out
    finally:
        c.close()


# ---------------------------------------------------------------------------------------------
# the real consumer


@dataclass
class ConsumerFigures:
    docs: int
    steady_docs_per_s: float  # between the first and the last batch_committed line
    wall_docs_per_s: float  # process start -> all docs committed (start-up included)
    hwm_mib: float
    rss_max_mib: float
    cpu_s: float
    es_cpu_s: float
    batches: int
    batch_seconds_p50: float
    log_path: str
    profile: dict[str, Any] = field(default_factory=dict)
    # With ``fill``: Elasticsearch's documents from the end of the fill to the last commit,
    # per second (every process joined and assigned, the producer done; see run_consumer).
    window_docs_per_s: float | None = None


def run_consumer(pipeline: BenchPipeline, *, group: str, index: str, expected: int,
                 es_pgid: int | None, timeout: float = 600.0, topic: str | None = None,
                 profile_to: Path | None = None, profile_idle: bool = True,
                 processes: int = 1, fill: Callable[[], None] | None = None,
                 partitions: int = 0, **settings: Any) -> ConsumerFigures:
    """``logpipe consume`` (service mode) as ``processes`` subprocesses in one group over a
    backlog of ``expected`` messages; stopped with SIGTERM once every one is committed. VmHWM is
    read from /proc before that (the largest of the processes).

    With ``fill``, the topic starts empty: once the group is stable with every process a member
    and all ``partitions`` assigned, ``fill()`` writes the backlog, and ``window_docs_per_s``
    is the rate from its end on (Elasticsearch's ``index_total`` of the run's indices then, up
    to the last commit): no process start-up, group join or rebalance in it, and no producer
    competing for the CPU."""
    env = pipeline.consumer_env(group=group, index=index, **settings)
    if topic:
        env["LOGPIPE_KAFKA_TOPIC"] = topic
        env["LOGPIPE_KAFKA_DLQ_TOPIC"] = f"{topic}.dlq"
    es_cpu0 = group_cpu_seconds(es_pgid) if es_pgid else 0.0
    began = time.monotonic()
    procs = [pipeline.spawn("consume", env=env, log_name=f"consume-{index}-{i}")
             for i in range(processes)]
    samplers = [HwmSampler(p.pid) for p in procs]
    spy: subprocess.Popen[bytes] | None = None
    if profile_to is not None:
        spy = start_py_spy(procs[0].pid, profile_to, idle=profile_idle)
    done = 0
    cpu = 0.0
    filled: tuple[float, int] | None = None  # (wall time, documents indexed) after the fill
    try:
        if fill is not None:
            wait_group_ready(pipeline.admin, group, topic or pipeline.topic, partitions,
                             members=processes, timeout=120, alive=procs)
            fill()
            filled = (time.time(), es_index_total(pipeline.es_node.http_port, f"{index}-*"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in procs:
                if p.proc.poll() is not None:
                    raise RuntimeError(f"consumer exited {p.proc.returncode}:\n"
                                       f"{p.log()[-3000:]}")
            done = sum(int(e.get("docs", 0)) - int(e.get("dlq", 0))
                       for p in procs for e in p.events("batch_committed"))
            if done >= expected:
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"consumer committed {done} of {expected} in {timeout:.0f}s")
        wall = time.monotonic() - began
        for sampler in samplers:
            sampler.sample()
        cpu = sum(cpu_seconds(p.pid) for p in procs)
    finally:
        if spy is not None:
            stop_py_spy(spy)
        for sampler in samplers:
            sampler.stop()
        for p in procs:
            terminate(p)
    es_cpu = (group_cpu_seconds(es_pgid) - es_cpu0) if es_pgid else 0.0
    events = sorted((e for p in procs for e in p.events("batch_committed")),
                    key=lambda e: parse_ts(e["ts"]))
    stamps = [parse_ts(e["ts"]) for e in events]
    steady_docs = sum(int(e["docs"]) for e in events[1:])
    span = stamps[-1] - stamps[0] if len(stamps) > 1 else float("nan")
    figures = ConsumerFigures(
        docs=done, steady_docs_per_s=steady_docs / span if span > 0 else float("nan"),
        wall_docs_per_s=done / wall, hwm_mib=max(s.hwm_kib for s in samplers) / 1024,
        rss_max_mib=max(s.rss_max_kib for s in samplers) / 1024, cpu_s=cpu, es_cpu_s=es_cpu,
        batches=len(events),
        batch_seconds_p50=statistics.median(float(e["seconds"]) for e in events),
        log_path=str(procs[0].log_path))
    if filled is not None and stamps:
        figures.window_docs_per_s = window_rate(expected - filled[1], filled[0], stamps[-1])
    if profile_to is not None and profile_to.exists():
        from bench.profiling import summarize

        figures.profile = summarize(profile_to)
    return figures


def start_py_spy(pid: int, out: Path, idle: bool = True) -> subprocess.Popen[bytes] | None:
    import sys

    exe = Path(sys.executable).parent / "py-spy"
    if not exe.exists():
        import shutil

        found = shutil.which("py-spy")
        if not found:
            log("py-spy not installed: no profile")
            return None
        exe = Path(found)
    # --idle: wall-clock (where the time goes, waits included); without: CPU only.
    return subprocess.Popen([str(exe), "record", "--pid", str(pid), "--rate", "200",
                             "--format", "raw", "--threads", *(["--idle"] if idle else []),
                             "--nonblocking", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_py_spy(spy: subprocess.Popen[bytes]) -> None:
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(timeout=30)
    except subprocess.TimeoutExpired:
        spy.kill()


# ---------------------------------------------------------------------------------------------
# the seed's design: a timer-driven run-once consumer


@dataclass
class SeedFigures:
    docs: int
    run_s: float
    per_minute_docs: int
    docs_per_s: float  # per-minute capacity / 60
    back_to_back_docs_per_s: float


def run_seed_design(pipeline: BenchPipeline, *, group: str, index: str, topic: str,
                    ) -> SeedFigures:
    """One ``logpipe consume --max-batches 5 --batch-size 500`` run over a backlog."""
    from bench.core import run_cli

    env = pipeline.consumer_env(group=group, index=index)
    env["LOGPIPE_KAFKA_TOPIC"] = topic
    env["LOGPIPE_KAFKA_DLQ_TOPIC"] = f"{topic}.dlq"
    proc, seconds = run_cli(pipeline, "consume", "--max-batches", "5", "--batch-size", "500",
                            env=env, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"seed-design consume exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    docs = sum(int(e.get("docs", 0)) for e in parse_events(proc.stderr, "batch_committed"))
    # A timer fires it once a minute; a run longer than that would make the next one late.
    per_minute = docs if seconds <= 60 else int(docs * 60 / seconds)
    return SeedFigures(docs, seconds, per_minute, per_minute / 60, docs / seconds)


# ---------------------------------------------------------------------------------------------
# end-to-end latency


@dataclass
class LatencyFigures:
    rate: float
    duration_s: float
    produced: int
    samples: int
    not_seen: int
    p50_s: float
    p90_s: float
    p99_s: float
    max_s: float
    indexed_p50_s: float  # produce -> the consumer's indexed_at stamp (batch start)
    indexed_p99_s: float
    poll_interval_s: float
    refresh_interval: str
    sampled_per_256: int = 8  # logs followed: those whose log_id's last byte is below this


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _indexed_at(hit: dict[str, Any]) -> float:
    """The document's ``indexed_at`` in epoch seconds (NaN if missing or not ISO 8601)."""
    try:
        return parse_ts(hit["_source"]["indexed_at"])
    except (KeyError, TypeError, ValueError):
        return float("nan")


class _VisibilityPoller:
    """Finds when sampled ids become searchable: an ``ids`` query for the pending sample every
    ``interval`` seconds; a hit's visible time is the answer's arrival (an upper bound, at most
    one interval + one round trip late)."""

    def __init__(self, port: int, index_pattern: str, interval: float) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.path = f"/{index_pattern}/_search?filter_path=hits.hits._id,hits.hits._source"
        self.interval = interval
        self.pending: dict[str, int] = {}
        self.lock = threading.Lock()
        self.seen: list[tuple[int, float, float]] = []  # produce ms, indexed_at s, visible s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def add(self, ids: Sequence[str]) -> None:
        with self.lock:
            for i in ids:
                self.pending[i] = uuid7_ms(i)

    def _run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            with self.lock:
                ids = list(self.pending)[:5000]
            if ids:
                body = orjson.dumps({"size": len(ids), "query": {"ids": {"values": ids}},
                                     "_source": ["indexed_at"]})
                self.conn.request("POST", self.path, body, {"Content-Type": "application/json"})
                data = self.conn.getresponse().read()
                visible = time.time()
                hits = orjson.loads(data).get("hits", {}).get("hits", [])
                with self.lock:
                    for h in hits:
                        produced = self.pending.pop(h["_id"], None)
                        if produced is not None:
                            self.seen.append((produced, _indexed_at(h), visible))
            self.stop.wait(max(0.0, self.interval - (time.monotonic() - t0)))


# About 31 sampled logs a second whatever the rate (1 in 32 at 1,000 logs/s): the poller's
# ``ids`` query stays a few dozen ids (see _VisibilityPoller; more starved the indexing it timed).
SAMPLES_PER_S = 31.25


def sample_share(rate: float) -> int:
    """How many of the 256 values of a log_id's last byte (random in a UUIDv7) are followed:
    about SAMPLES_PER_S a second at ``rate`` logs/s, at least 1, at most all."""
    return max(1, min(256, round(256 * SAMPLES_PER_S / rate)))


def sampled(log_id: str, share: int) -> bool:
    return int(log_id[-2:], 16) < share


def run_latency(pipeline: BenchPipeline, cfg: Config, *, topic: str, group: str, index: str,
                rate: float, duration: float, warmup: float = 5.0,
                poll_interval: float = 0.05, **settings: Any) -> LatencyFigures:
    """End-to-end latency of ``logpipe consume`` (service mode), see measure_latency."""
    env = pipeline.consumer_env(group=group, index=index, **settings)
    env["LOGPIPE_KAFKA_TOPIC"] = topic
    env["LOGPIPE_KAFKA_DLQ_TOPIC"] = f"{topic}.dlq"

    def start() -> Spawned:
        return pipeline.spawn("consume", env=env, log_name=f"consume-latency-{index}")

    def ready(consumer: Spawned) -> None:
        consumer.wait_for_event("ready", timeout=120)
        wait_assigned(consumer, cfg.kafka.partitions, timeout=60)

    return measure_latency(pipeline, cfg, topic=topic, index=index, rate=rate,
                           duration=duration, start=start, ready=ready, warmup=warmup,
                           poll_interval=poll_interval)


def measure_latency(pipeline: BenchPipeline, cfg: Config, *, topic: str, index: str,
                    rate: float, duration: float, start: Callable[[], Spawned],
                    ready: Callable[[Spawned], None], warmup: float = 5.0,
                    poll_interval: float = 0.05) -> LatencyFigures:
    """The real producer at ``rate`` logs/s (subprocess, rate mode) into an empty topic while a
    sink (``start()``, then ``ready(sink)`` returns once it is assigned the topic) runs; sampled
    ids are followed from the topic to the search. The same for every sink: logpipe, rsyslog."""
    sink = start()
    tail = Consumer({"bootstrap.servers": cfg.kafka.bootstrap_servers,
                     "group.id": f"bench-tail-{time.time_ns()}", "enable.auto.commit": False,
                     "fetch.wait.max.ms": 10})
    poller = _VisibilityPoller(pipeline.es_node.http_port, f"{index}-*", poll_interval)
    producer: subprocess.Popen[str] | None = None
    produced = 0
    share = sample_share(rate)
    try:
        ready(sink)
        parts = sorted(tail.list_topics(topic, timeout=10).topics[topic].partitions)
        tail.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        poller.thread.start()
        start_wall = time.time()
        producer = subprocess.Popen(
            pipeline.argv("produce", "--rate", str(rate), "--duration", str(duration)),
            env=pipeline.env({"LOGPIPE_KAFKA_TOPIC": topic,
                              "LOGPIPE_KAFKA_DLQ_TOPIC": f"{topic}.dlq"}),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=pipeline.workdir)
        deadline = time.monotonic() + duration + 60
        while time.monotonic() < deadline:
            msgs = tail.consume(2000, 0.05)
            keys = [k.decode() for m in msgs if m.error() is None and (k := m.key())]
            produced += len(keys)
            poller.add([k for k in keys if sampled(k, share)])
            if producer.poll() is not None and not msgs:
                break
        _out, err = producer.communicate(timeout=60)
        if producer.returncode != 0:
            raise RuntimeError(f"producer exited {producer.returncode}: {err[-2000:]}")
        # Let the last samples become visible (bounded).
        end = time.monotonic() + 20
        while poller.pending and time.monotonic() < end:
            time.sleep(0.1)
    finally:
        poller.stop.set()
        if producer is not None and producer.poll() is None:
            producer.kill()
        tail.close()
        terminate(sink)
    cutoff_ms = (start_wall + warmup) * 1000
    kept = [s for s in poller.seen if s[0] >= cutoff_ms]
    lat = [vis - p / 1000 for p, _ia, vis in kept]
    idx = [ia - p / 1000 for p, ia, _vis in kept if not math.isnan(ia)]
    return LatencyFigures(
        rate=rate, duration_s=duration, produced=produced, samples=len(lat),
        not_seen=len(poller.pending), p50_s=_pct(lat, 0.5), p90_s=_pct(lat, 0.9),
        p99_s=_pct(lat, 0.99), max_s=max(lat) if lat else float("nan"),
        indexed_p50_s=_pct(idx, 0.5), indexed_p99_s=_pct(idx, 0.99),
        poll_interval_s=poll_interval, refresh_interval=cfg.elasticsearch.refresh_interval,
        sampled_per_256=share)


def wait_assigned(spawned: Spawned, partitions: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        evs = spawned.events("assigned")
        if evs and int(evs[-1].get("owned", 0)) >= partitions:
            return
        if spawned.proc.poll() is not None:
            raise RuntimeError(f"consumer exited: {spawned.log()[-2000:]}")
        time.sleep(0.1)
    raise RuntimeError(f"consumer not assigned {partitions} partitions in {timeout:.0f}s")


def window_rate(docs: int, start: float, end: float) -> float:
    """``docs`` over ``end - start`` seconds (NaN for an empty or inverted window)."""
    return docs / (end - start) if end > start and docs > 0 else float("nan")


def group_ready(stable: bool, assignments: Iterable[Iterable[tuple[str, int]]], topic: str,
                partitions: int, members: int) -> bool:
    """A group is ready to measure: stable, ``members`` members, each owning at least one
    partition of ``topic``, and all ``partitions`` of it owned between them."""
    owned = [{p for t, p in a if t == topic} for a in assignments]
    return (stable and len(owned) == members and all(owned)
            and set().union(*owned) == set(range(partitions)))


def wait_group_ready(admin: Any, group: str, topic: str, partitions: int, *, members: int,
                     timeout: float, alive: Sequence[Spawned] = ()) -> None:
    """Wait (AdminClient.describe_consumer_groups) until ``group_ready``: the same test for
    logpipe's consumers and for rsyslog's imkafka, which logs nothing when it is assigned."""
    from confluent_kafka import ConsumerGroupState

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        desc = admin.describe_consumer_groups([group])[group].result(timeout=15)
        assignments = [[(tp.topic, tp.partition) for tp in m.assignment.topic_partitions]
                       for m in desc.members]
        if group_ready(desc.state == ConsumerGroupState.STABLE, assignments, topic,
                       partitions, members):
            return
        for p in alive:
            if p.proc.poll() is not None:
                raise RuntimeError(f"exited {p.proc.returncode} before the group was ready:\n"
                                   f"{p.log()[-3000:]}")
        time.sleep(0.2)
    raise RuntimeError(f"group {group}: not {members} member(s) owning the {partitions} "
                       f"partitions of {topic} within {timeout:.0f}s")


def es_index_total(port: int, pattern: str) -> int:
    """Documents indexed into ``pattern`` so far (``_stats/indexing`` index_total, primaries)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", f"/{pattern}/_stats/indexing"
                            "?filter_path=_all.primaries.indexing.index_total")
        body = orjson.loads(conn.getresponse().read() or b"{}")
        return int(body.get("_all", {}).get("primaries", {}).get("indexing", {})
                   .get("index_total", 0))
    finally:
        conn.close()


def es_count(port: int, pattern: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", f"/{pattern}/_refresh")
        conn.getresponse().read()
        conn.request("GET", f"/{pattern}/_count")
        return int(orjson.loads(conn.getresponse().read())["count"])
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def streaming_bulk_rate(url: str, messages: Sequence[tuple[bytes, bytes]], index_prefix: str,
                        batch_size: int, orjson_serializer: bool) -> float:
    """The library way, for reference: parse each message, ``create`` actions as dicts through
    ``helpers.streaming_bulk`` (the client serializes); docs/s including the parse."""
    from elastic_transport import OrjsonSerializer
    from elasticsearch import Elasticsearch, helpers

    kwargs: dict[str, Any] = {}
    if orjson_serializer:
        kwargs["serializers"] = {"application/json": OrjsonSerializer()}
    es = Elasticsearch(url, request_timeout=120, **kwargs)
    indexed_at = now_iso()

    def actions() -> Any:
        for key, value in messages:
            doc = orjson.loads(value)
            doc["indexed_at"] = indexed_at
            ts = doc["timestamp"]
            yield {"_op_type": "create", "_index": f"{index_prefix}-{ts[0:4]}.{ts[5:7]}.{ts[8:10]}",
                   "_id": key.decode(), "_source": doc}

    started = time.monotonic()
    ok = 0
    for success, _item in helpers.streaming_bulk(es, actions(), chunk_size=batch_size,
                                                 max_chunk_bytes=32 * 1024 * 1024,
                                                 raise_on_error=False):
        ok += bool(success)
    elapsed = time.monotonic() - started
    es.close()
    return ok / elapsed
