"""``logpipe status`` (what is going on) and ``logpipe check`` (Nagios: is it fine?).

Lag is measured from outside the consumer group: a consumer configured with the group id that
never subscribes can read the group's committed offsets without joining it (no rebalance).
Per partition, lag = end offset - max(committed, low watermark): messages below the low
watermark were deleted by retention and can no longer be consumed; a partition with no commit
yet counts everything still retained.

The error rate is DLQ end offsets / main topic end offsets: both count every message since the
topics were created, so it is the long-run share of dead-lettered messages.

Stalled: every commit the consumer makes carries its wall-clock time (``logpipe.offsets
.commit_metadata``), and a live consumer commits again each idle partition every minute. A
partition with lag whose last commit is old has had no progress for that long: the consumer is
stuck retrying, or not running. Assumes the hosts' clocks agree to well under the thresholds.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition
from elasticsearch import ApiError, TransportError

from logpipe import refusal
from logpipe.config import CheckConfig, Config, ElasticsearchConfig, KafkaConfig
from logpipe.es import make_client
from logpipe.kafka import RdKafkaLogger, client_config
from logpipe.offsets import committed_at
from logpipe.refusal import KafkaErrorWatch, Refusal, Refused

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
STATE_NAMES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}
_TIMEOUT_S = 10.0


class StatusError(RuntimeError):
    """Something needed for the status could not be read."""


@dataclass(frozen=True)
class PartitionStatus:
    partition: int
    low: int
    end: int
    committed: int | None  # None: the group has no commit for this partition
    lag: int
    # Seconds since the group's last commit on this partition (None: no commit, or one without
    # logpipe's time metadata).
    since_commit_s: float | None = None


@dataclass(frozen=True)
class KafkaStatus:
    topic: str
    group_id: str
    partitions: list[PartitionStatus]
    dlq_topic: str
    dlq_partitions: list[PartitionStatus]  # committed/lag unused (nobody consumes the DLQ)

    @property
    def messages(self) -> int:
        return sum(p.end for p in self.partitions)

    @property
    def lag(self) -> int:
        return sum(p.lag for p in self.partitions)

    @property
    def stalled_s(self) -> float | None:
        """Age of the oldest last commit among partitions with lag (0.0 when none has lag;
        None when a partition with lag has no commit time to judge by)."""
        ages = [p.since_commit_s for p in self.partitions if p.lag > 0]
        if not ages:
            return 0.0
        known = [age for age in ages if age is not None]
        return max(known) if known else None

    @property
    def dlq_messages(self) -> int:
        return sum(p.end for p in self.dlq_partitions)

    @property
    def error_rate(self) -> float:
        return self.dlq_messages / self.messages if self.messages else 0.0


@dataclass(frozen=True)
class EsStatus:
    alias: str
    docs: int
    newest_indexed_at: str | None
    index_bytes: int  # store size of all indices behind the alias, replicas included


@dataclass
class Status:
    kafka: KafkaStatus | None = None
    elasticsearch: EsStatus | None = None
    errors: dict[str, str] = field(default_factory=dict)
    # Parts a server refused to show us (credentials, certificate, ACL): a configuration
    # problem, reported as such (exit 4 for status, CRITICAL for check).
    refusals: list[Refusal] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"errors": self.errors}
        if self.kafka is not None:
            k = self.kafka
            out["kafka"] = {
                **dataclasses.asdict(k), "messages": k.messages, "lag": k.lag,
                "dlq_messages": k.dlq_messages, "error_rate": k.error_rate,
                "stalled_s": k.stalled_s,
            }
        if self.elasticsearch is not None:
            out["elasticsearch"] = dataclasses.asdict(self.elasticsearch)
        return out


def _offsets(consumer: Consumer, topic: str, partitions: list[int],
             committed: dict[int, TopicPartition], timeout_s: float) -> list[PartitionStatus]:
    out = []
    now = time.time()
    for p in partitions:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)
        tp = committed.get(p)
        done = tp.offset if tp is not None and tp.offset >= 0 else None
        lag = high - max(done if done is not None else low, low)
        at = committed_at(tp.metadata) if done is not None and tp is not None else None
        out.append(PartitionStatus(partition=p, low=low, end=high, committed=done,
                                   lag=max(lag, 0),
                                   since_commit_s=None if at is None else max(0.0, now - at)))
    return out


def _committed(consumer: Consumer, tps: list[TopicPartition], timeout_s: float,
               ) -> list[TopicPartition]:
    # Right after a broker start the group coordinator may still be loading (NOT_COORDINATOR,
    # COORDINATOR_LOAD_IN_PROGRESS): retriable, so retry a few times before giving up.
    for attempt in range(5):
        try:
            result: list[TopicPartition] = consumer.committed(tps, timeout=timeout_s)
            return result
        except KafkaException as exc:
            if attempt == 4 or not exc.args[0].retriable():
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")  # pragma: no cover


def kafka_status(cfg: KafkaConfig, timeout_s: float = _TIMEOUT_S) -> KafkaStatus:
    watch = KafkaErrorWatch(cfg.bootstrap_servers)
    consumer = Consumer({
        **client_config(cfg, "logpipe-status"),
        "group.id": cfg.group_id,
        "enable.auto.commit": False,
        "error_cb": watch,
    }, logger=RdKafkaLogger())
    try:
        # A rejected password or certificate reaches only the error callback: report that
        # (within a second) rather than the metadata timeout it causes.
        metadata = watch.list_topics(consumer, timeout_s)
        found: dict[str, list[int]] = {}
        for name in (cfg.topic, cfg.dlq_topic):
            topic = metadata.topics.get(name)
            if topic is not None and topic.error is not None:
                denied = refusal.kafka(topic.error, cfg.bootstrap_servers)
                if denied is not None:
                    raise Refused(denied)
            if topic is None or topic.error is not None:
                raise StatusError(f"kafka topic {name} does not exist (run logpipe bootstrap)")
            found[name] = sorted(topic.partitions)
        tps = [TopicPartition(cfg.topic, p) for p in found[cfg.topic]]
        committed = {tp.partition: tp for tp in _committed(consumer, tps, timeout_s)}
        return KafkaStatus(
            topic=cfg.topic, group_id=cfg.group_id,
            partitions=_offsets(consumer, cfg.topic, found[cfg.topic], committed, timeout_s),
            dlq_topic=cfg.dlq_topic,
            dlq_partitions=_offsets(consumer, cfg.dlq_topic, found[cfg.dlq_topic], {},
                                    timeout_s),
        )
    finally:
        consumer.close()


def es_status(cfg: ElasticsearchConfig) -> EsStatus:
    es = make_client(cfg)
    docs = int(es.count(index=cfg.index)["count"])
    found = es.search(index=cfg.index, size=0,
                      aggs={"newest": {"max": {"field": "indexed_at"}}})
    newest = found["aggregations"]["newest"].get("value_as_string")
    stats = es.indices.stats(index=cfg.index, metric="store")
    size = int(stats["_all"]["total"]["store"]["size_in_bytes"])
    return EsStatus(alias=cfg.index, docs=docs, newest_indexed_at=newest, index_bytes=size)


def collect(cfg: Config) -> Status:
    """Everything ``status`` shows; a part that cannot be read is recorded in ``errors``."""
    status = Status()
    bootstrap, hosts = cfg.kafka.bootstrap_servers, cfg.elasticsearch.hosts
    try:
        status.kafka = kafka_status(cfg.kafka)
    except (Refused, KafkaException, StatusError) as exc:
        status.errors["kafka"] = str(exc)
        found = refusal.find(exc, bootstrap, hosts)
        if found is not None:
            status.refusals.append(found)
    try:
        status.elasticsearch = es_status(cfg.elasticsearch)
    except (ApiError, TransportError) as exc:
        status.errors["elasticsearch"] = str(exc)
        found = refusal.find(exc, bootstrap, hosts)
        if found is not None:
            status.refusals.append(found)
    return status


def format_status(status: Status) -> str:
    lines: list[str] = []
    k = status.kafka
    if k is not None:
        lines.append(f"topic {k.topic}  group {k.group_id}")
        lines.append(f"{'partition':>9} {'end':>12} {'committed':>12} {'lag':>10} "
                     f"{'last commit':>12}")
        for p in k.partitions:
            done = "-" if p.committed is None else str(p.committed)
            age = "-" if p.since_commit_s is None else f"{p.since_commit_s:.0f}s ago"
            lines.append(f"{p.partition:>9} {p.end:>12} {done:>12} {p.lag:>10} {age:>12}")
        lines.append(f"{'total':>9} {k.messages:>12} {'':>12} {k.lag:>10}")
        dlq = "  ".join(f"p{p.partition}={p.end}" for p in k.dlq_partitions)
        lines.append(f"dlq {k.dlq_topic}  messages={k.dlq_messages}  ({dlq})  "
                     f"error_rate={k.error_rate:.6f}")
    e = status.elasticsearch
    if e is not None:
        lines.append(f"elasticsearch alias {e.alias}  docs={e.docs}  "
                     f"newest_indexed_at={e.newest_indexed_at or '-'}  "
                     f"index_bytes={e.index_bytes}")
    lines.extend(f"error {part}: {msg}" for part, msg in status.errors.items())
    return "\n".join(lines)


def status_command(cfg: Config, as_json: bool = False) -> tuple[int, str]:
    """``(exit code, text)``: 1 if any part could not be read, ``EXIT_REFUSED`` (4) if a
    server refused us (each refusal is also logged as an ``event=fatal`` line)."""
    status = collect(cfg)
    text = json.dumps(status.as_dict(), indent=2) if as_json else format_status(status)
    for found in status.refusals:
        found.log()
    if status.refusals:
        return refusal.EXIT_REFUSED, text
    return (1 if status.errors else 0), text


# ---------------------------------------------------------------------------------------------
# Nagios check


def _level(value: float, warning: float, critical: float) -> int:
    # Nagios convention: a threshold N alerts when the value is above N.
    if value > critical:
        return CRITICAL
    if value > warning:
        return WARNING
    return OK


def _number(value: float) -> str:
    """A threshold as written in the config: 100000 not 1e+05, 0.01 not 0.010000."""
    return str(int(value)) if float(value).is_integer() else repr(value)


def evaluate(status: Status, limits: CheckConfig) -> tuple[int, str]:
    """``(exit code, the one output line)`` for ``logpipe check``."""
    if status.refusals:
        # Refused credentials, certificate or permissions: broken configuration, which a
        # monitoring system should see as CRITICAL (like a bad config file), not UNKNOWN.
        why = "; ".join(r.text() for r in status.refusals)
        return CRITICAL, f"LOGPIPE CRITICAL - {why}"
    if status.kafka is None or status.elasticsearch is None:
        why = "; ".join(f"{part}: {msg}" for part, msg in status.errors.items()) or "no data"
        return UNKNOWN, f"LOGPIPE UNKNOWN - {why}"
    lag = status.kafka.lag
    rate = status.kafka.error_rate
    size = status.elasticsearch.index_bytes
    stalled = status.kafka.stalled_s
    checks: list[tuple[str, float, float, float]] = [
        ("lag", lag, limits.lag_warning, limits.lag_critical),
        ("error_rate", rate, limits.error_rate_warning, limits.error_rate_critical),
        ("index_bytes", size, limits.index_size_warning_bytes, limits.index_size_critical_bytes),
    ]
    if stalled is not None:
        # 0 turns a stall threshold off.
        checks.append(("stalled_s", stalled, limits.stall_warning_s or float("inf"),
                       limits.stall_critical_s or float("inf")))
    code = OK
    reasons = []
    for name, value, warn, crit in checks:
        level = _level(value, warn, crit)
        if level != OK:
            limit = crit if level == CRITICAL else warn
            reasons.append(f"{name}>{_number(limit)}")
        code = max(code, level)
    stalled_text = "unknown" if stalled is None else f"{stalled:.0f}"
    text = f"lag={lag} error_rate={rate:.6f} index_bytes={size} stalled_s={stalled_text}"
    if reasons:
        text += f" ({', '.join(reasons)})"
    perf = (f"lag={lag};{limits.lag_warning};{limits.lag_critical};0 "
            f"error_rate={rate:.6f};{limits.error_rate_warning};{limits.error_rate_critical};0;1 "
            f"index_bytes={size}B;{limits.index_size_warning_bytes};"
            f"{limits.index_size_critical_bytes};0")
    if stalled is not None:
        perf += (f" stalled_s={stalled:.0f}s;{_number(limits.stall_warning_s)};"
                 f"{_number(limits.stall_critical_s)};0")
    return code, f"LOGPIPE {STATE_NAMES[code]} - {text} | {perf}"


def check_command(cfg: Config) -> tuple[int, str]:
    try:
        status = collect(cfg)
    except Exception as exc:  # a check must answer UNKNOWN, never a traceback
        return UNKNOWN, f"LOGPIPE UNKNOWN - {type(exc).__name__}: {exc}"
    return evaluate(status, cfg.check)
