"""Prometheus metrics: the consumer's ``/metrics`` endpoint and the producer's textfile.

The consumer is a long-running service, so it serves its metrics over HTTP (``metrics.port``,
loopback by default). The producer is a oneshot fired by a timer: nothing would be there to
scrape, so after each run it writes its last run's figures to ``metrics.textfile`` for
node_exporter's textfile collector (atomically: write a temporary file, then rename).

Each process has its own registry (no global state): tests may run several consumers in one
process, and the names are the ones listed in docs/DESIGN.md ("Metrics").
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
    write_to_textfile,
)

from logpipe.offsets import PartitionKey

# A batch of 500 takes ~50 ms on a healthy cluster and minutes while Elasticsearch retries.
_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class ConsumerMetrics:
    """What a consumer process exposes; the consumer calls the small methods below."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # CPU, RSS, open files, start time of this process (Linux /proc).
        ProcessCollector(registry=self.registry)
        reg = self.registry
        self.documents = Counter(
            "logpipe_consumer_documents", "Messages handled, by outcome: indexed (201), "
            "already_present (409, a replay) or dead_lettered (acknowledged by the DLQ topic).",
            ["outcome"], registry=reg)
        self.dead_lettered = Counter(
            "logpipe_consumer_dead_lettered", "Messages acknowledged by the dead-letter topic, "
            "by logpipe.reason.", ["reason"], registry=reg)
        self.retried = Counter(
            "logpipe_consumer_retried_documents", "Documents sent again after a retriable "
            "failure, by reason (an Elasticsearch error type, http_<status>, dlq_delivery).",
            ["reason"], registry=reg)
        self.batch_seconds = Histogram(
            "logpipe_consumer_batch_duration_seconds", "From fetching a batch to committing it, "
            "retries included.", buckets=_DURATION_BUCKETS, registry=reg)
        self.bulk_seconds = Histogram(
            "logpipe_consumer_bulk_request_duration_seconds", "One _bulk request, answered or "
            "failed.", buckets=_DURATION_BUCKETS, registry=reg)
        self.lag = Gauge(
            "logpipe_consumer_lag", "Messages not yet handled on an owned partition (cached "
            "high watermark - commit position), updated every 10 s.",
            ["topic", "partition"], registry=reg)
        self.last_commit = Gauge(
            "logpipe_consumer_last_commit_timestamp_seconds", "Unix time of the last successful "
            "offset commit.", registry=reg)
        self.stalled = Gauge(
            "logpipe_consumer_stalled_seconds", "Seconds with lag and nothing handled, once past "
            "consumer.stall_after_s (0 otherwise).", registry=reg)
        self.assigned = Gauge(
            "logpipe_consumer_assigned_partitions", "Partitions this consumer owns.",
            registry=reg)
        self.bulk_cap = Gauge(
            "logpipe_consumer_bulk_cap_bytes", "Current bulk request size cap: "
            "consumer.max_bulk_bytes, lowered after a 413 until restart.", registry=reg)
        self.ready = Gauge(
            "logpipe_consumer_ready", "1 once Kafka and Elasticsearch answered and the consumer "
            "subscribed.", registry=reg)
        self._lag_labels: set[tuple[str, str]] = set()

    def serve(self, address: str, port: int) -> Any:
        """Serve ``/metrics`` from a daemon thread; raises OSError if the port is taken."""
        server, _thread = start_http_server(port, addr=address, registry=self.registry)
        return server

    def handled(self, outcome: str, count: int) -> None:
        if count:
            self.documents.labels(outcome).inc(count)

    def dead_letter(self, reason: str) -> None:
        self.documents.labels("dead_lettered").inc()
        self.dead_lettered.labels(reason).inc()

    def retry(self, reason: str, count: int) -> None:
        self.retried.labels(reason).inc(count)

    def committed(self) -> None:
        self.last_commit.set(time.time())

    def set_lag(self, lag: Mapping[PartitionKey, int]) -> None:
        """Replace the per-partition lag (partitions no longer owned disappear)."""
        current = {(topic, str(partition)) for topic, partition in lag}
        for gone in self._lag_labels - current:
            self.lag.remove(*gone)
        for (topic, partition), value in lag.items():
            self.lag.labels(topic, str(partition)).set(value)
        self._lag_labels = current


def write_producer_textfile(path: str, *, delivered: int, failed: int, produced: int,
                            seconds: float, ok: bool) -> None:
    """The last producer run, for node_exporter's textfile collector (atomic replace)."""
    reg = CollectorRegistry()
    for name, doc, value in (
        ("logpipe_producer_last_run_timestamp_seconds", "Unix time the last run ended.",
         time.time()),
        ("logpipe_producer_last_run_duration_seconds", "How long the last run took.", seconds),
        ("logpipe_producer_last_run_produced", "Messages the last run handed to the client.",
         produced),
        ("logpipe_producer_last_run_delivered", "Messages the brokers acknowledged.", delivered),
        ("logpipe_producer_last_run_failed", "Messages whose delivery failed.", failed),
        ("logpipe_producer_last_run_success", "1 if every message was delivered.",
         1 if ok else 0),
    ):
        Gauge(name, doc, registry=reg).set(value)
    write_to_textfile(path, reg)
