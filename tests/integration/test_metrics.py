"""Prometheus metrics from real processes: a running consumer's ``/metrics`` scraped over HTTP
while it moves logs between the real servers, and the producer's node_exporter textfile.
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest
from confluent_kafka import Producer
from harness.pipeline import Pipeline, record
from harness.servers import free_port
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.status == 200
        text = answer.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(port: int, predicate: object, timeout: float) -> Samples:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    samples: Samples = {}
    while time.monotonic() < deadline:
        try:
            samples = scrape(port)
        except OSError:
            samples = {}
        if samples and predicate(samples):
            return samples
        time.sleep(0.5)
    raise AssertionError(f"metrics never matched within {timeout:.0f}s: "
                         f"{ {k: v for k, v in samples.items() if k[0].startswith('logpipe')} }")


def test_consumer_metrics_move_with_the_pipeline(pipeline: Pipeline) -> None:
    port = free_port()
    pipeline.write_config(metrics={"port": port})
    pipeline.bootstrap()
    pipeline.produce(400)
    consumer = pipeline.spawn("consume")
    try:
        first = wait_for(port, lambda s: value(s, "logpipe_consumer_documents_total",
                                               outcome="indexed") == 400, timeout=120)
        assert value(first, "logpipe_consumer_ready") == 1
        assert value(first, "logpipe_consumer_batch_duration_seconds_count") >= 1
        assert value(first, "logpipe_consumer_bulk_request_duration_seconds_count") >= 1
        assert value(first, "process_resident_memory_bytes") > 0
        commit_age = time.time() - value(first, "logpipe_consumer_last_commit_timestamp_seconds")
        assert 0 <= commit_age < 60, commit_age

        # More logs and one message that is not JSON: the counters move, by outcome and reason.
        pipeline.produce(100)
        raw = Producer({"bootstrap.servers": pipeline.kafka.bootstrap_servers})
        raw.produce(pipeline.topic, key=b"not-json-1", value=b"{not json")
        assert raw.flush(30) == 0
        second = wait_for(port, lambda s: value(s, "logpipe_consumer_documents_total",
                                                outcome="indexed") == 500
                          and value(s, "logpipe_consumer_dead_lettered_total",
                                    reason="not_json") == 1, timeout=120)
        assert value(second, "logpipe_consumer_documents_total", outcome="dead_lettered") == 1
        # Per-partition lag, refreshed every 10 s: all partitions owned, all caught up.
        settled = wait_for(port, lambda s: value(s, "logpipe_consumer_assigned_partitions")
                           == pipeline.partitions and all(
                               value(s, "logpipe_consumer_lag", topic=pipeline.topic,
                                     partition=str(p)) == 0
                               and (("logpipe_consumer_lag", (("partition", str(p)),
                                                              ("topic", pipeline.topic))) in s)
                               for p in range(pipeline.partitions)), timeout=60)
        assert value(settled, "logpipe_consumer_stalled_seconds") == 0
    finally:
        consumer.terminate_and_wait()
    comparison = pipeline.compare([k for k in pipeline.topic_keys() if k != "not-json-1"])
    assert comparison.exact, comparison.describe()
    record("metrics_scrape", port=port,
           indexed=value(second, "logpipe_consumer_documents_total", outcome="indexed"),
           dead_lettered_not_json=value(second, "logpipe_consumer_dead_lettered_total",
                                        reason="not_json"),
           batches=value(second, "logpipe_consumer_batch_duration_seconds_count"),
           bulk_requests=value(second, "logpipe_consumer_bulk_request_duration_seconds_count"),
           rss_mib=round(value(second, "process_resident_memory_bytes") / 2**20, 1))


def test_taken_metrics_port_fails_the_consumer_clearly(pipeline: Pipeline) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        pipeline.write_config(metrics={"port": port})
        done = pipeline.cli("consume", "--max-batches", "1", check=False, timeout=60)
    assert done.returncode == 1, done.describe()
    assert f"metrics endpoint 127.0.0.1:{port}" in done.stderr, done.stderr


def test_producer_writes_its_last_run_for_node_exporter(pipeline: Pipeline,
                                                        tmp_path: Path) -> None:
    textfile = tmp_path / "textfile" / "logpipe-producer.prom"
    textfile.parent.mkdir()
    pipeline.write_config(metrics={"textfile": str(textfile)})
    pipeline.bootstrap()
    before = time.time()
    pipeline.produce(250)
    families = {f.name: f.samples[0].value
                for f in text_string_to_metric_families(textfile.read_text())}
    assert families["logpipe_producer_last_run_delivered"] == 250
    assert families["logpipe_producer_last_run_failed"] == 0
    assert families["logpipe_producer_last_run_success"] == 1
    assert before <= families["logpipe_producer_last_run_timestamp_seconds"] <= time.time()
    # Nothing but the file itself is left behind (written to a temporary name, then renamed).
    assert [p.name for p in textfile.parent.iterdir()] == [textfile.name]
