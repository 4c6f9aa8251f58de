"""Faults while consuming: Elasticsearch outage, SIGTERM, kill -9, a consumer joining and leaving.

The consumer runs as a real process (the CLI) so signals are real. Invariants checked after each
fault, from the servers' own state:

* no loss: every key in the topic is a document in Elasticsearch once the consumer caught up;
* no duplicates: one document per ``log_id``;
* commits never pass what is indexed: every offset below the committed position is in
  Elasticsearch, checked at the moment of the fault, before any catch-up.
"""

from __future__ import annotations

import contextlib
import random
import signal
import time

import pytest
from harness.pipeline import Pipeline, Spawned, record
from harness.servers import ElasticsearchNode

pytestmark = pytest.mark.slow


def _service(pipeline: Pipeline, batch_size: int, name: str = "consumer") -> Spawned:
    """``logpipe consume`` in service mode (no --max-batches): runs until signalled."""
    return pipeline.spawn("consume", "--batch-size", str(batch_size), log_name=name)


def _sum_field(events: list[dict[str, str]], key: str) -> int:
    return sum(int(e.get(key, "0") or 0) for e in events)


def test_elasticsearch_outage_waits_then_catches_up(pipeline: Pipeline,
                                                    elasticsearch: ElasticsearchNode) -> None:
    pipeline.write_config(consumer={"batch_size": 200})
    pipeline.bootstrap()
    pipeline.produce(1000)
    consumer = _service(pipeline, 200)
    try:
        consumer.wait_for_event("batch_committed", timeout=90)
        pipeline.wait_caught_up(1000, consumer, timeout=90)

        elasticsearch.stop()
        outage_began = time.monotonic()
        # More logs arrive while Elasticsearch is down: the consumer must hold them.
        pipeline.produce(2000)
        time.sleep(8)
        committed_during = pipeline.committed()
        time.sleep(4)
        committed_later = pipeline.committed()
        assert consumer.proc.poll() is None, f"consumer exited during the outage:\n" \
                                             f"{consumer.log()[-4000:]}"
        outage_s = time.monotonic() - outage_began
        elasticsearch.start()

        # Whatever was committed during the outage must be in Elasticsearch (nothing past
        # unindexed messages); checked before the consumer had time to catch up much.
        messages = pipeline.read_topic()
        present = set(pipeline.es_ids())
        unindexed_below = [(m.partition, m.offset) for m in messages
                           if m.offset < committed_later.get(m.partition, -1)
                           and (m.key or b"").decode() not in present]
        assert committed_during == committed_later, (
            f"commits advanced while Elasticsearch was down: {committed_during} -> "
            f"{committed_later}")
        assert not unindexed_below, (f"{len(unindexed_below)} offsets committed during the outage "
                                     f"are not in Elasticsearch: {unindexed_below[:5]}")

        pipeline.wait_caught_up(3000, consumer)
        code = consumer.terminate_and_wait(60)
    finally:
        consumer.kill()
    waited = consumer.events("bulk_retry") + consumer.events("waiting") \
        + consumer.events("bulk_request_failed")
    cmp = pipeline.compare([m.key.decode() for m in messages if m.key is not None])
    record("es_outage", outage_s=round(outage_s, 1), documents=cmp.documents, expected=3000,
           retry_events=len(waited), missing=len(cmp.missing), duplicates=len(cmp.duplicates))
    assert code == 0, f"consumer exit code {code} after SIGTERM:\n{consumer.log()[-3000:]}"
    assert waited, "the consumer never logged a retry or wait during a 12 s outage"
    assert cmp.exact, cmp.describe()
    assert cmp.documents == 3000


def test_sigterm_mid_stream_exits_in_time_and_commits_only_indexed(pipeline: Pipeline) -> None:
    shutdown_timeout_s = 10.0
    pipeline.write_config(consumer={"batch_size": 50, "shutdown_timeout_s": shutdown_timeout_s})
    pipeline.bootstrap()
    pipeline.produce(5000)
    keys = pipeline.topic_keys()
    consumer = _service(pipeline, 50)
    try:
        consumer.wait_for_event("batch_committed", timeout=90, count=3)
        sent = time.monotonic()
        consumer.signal(signal.SIGTERM)
        code = consumer.wait(shutdown_timeout_s + 20)
        exit_s = time.monotonic() - sent
    finally:
        consumer.kill()
    assert code is not None, f"consumer still running {shutdown_timeout_s + 20:.0f}s after SIGTERM"
    committed = pipeline.assert_committed_only_indexed()
    at_stop = pipeline.doc_count()
    ends = pipeline.end_offsets()
    mid_stream = sum(max(0, c) for c in committed.values()) < sum(ends.values())

    pipeline.consume_all(batch_size=500)
    cmp = pipeline.compare(keys)
    record("sigterm", exit_code=code, exit_s=round(exit_s, 2), docs_at_stop=at_stop,
           committed_at_stop=sum(max(0, c) for c in committed.values()),
           documents=cmp.documents, missing=len(cmp.missing), duplicates=len(cmp.duplicates))
    assert code == 0, f"exit code {code} after SIGTERM:\n{consumer.log()[-3000:]}"
    assert exit_s <= shutdown_timeout_s + 5, f"took {exit_s:.1f}s to exit after SIGTERM"
    assert consumer.events("shutdown"), "no shutdown event logged"
    assert mid_stream, ("the consumer had already consumed everything when SIGTERM arrived; "
                        "the test did not stop it mid-stream")
    assert cmp.exact, cmp.describe()


def test_kill_9_mid_batch_then_restart_loses_and_duplicates_nothing(pipeline: Pipeline) -> None:
    pipeline.write_config(consumer={"batch_size": 100, "bulk_concurrency": 2})
    pipeline.bootstrap()
    pipeline.produce(6000)
    keys = pipeline.topic_keys()
    rng = random.Random(9)
    kills = []
    for round_ in range(3):
        consumer = _service(pipeline, 100, name=f"killed{round_}")
        try:
            consumer.wait_for_event("batch_committed", timeout=90, count=2)
            time.sleep(rng.uniform(0.0, 0.4))
        finally:
            consumer.kill()  # SIGKILL to the process group: no shutdown code runs
        committed = pipeline.assert_committed_only_indexed()
        kills.append({"docs": pipeline.doc_count(),
                      "committed": sum(max(0, c) for c in committed.values())})
    assert kills[-1]["committed"] < 6000, "all consumed before the last kill: not mid-stream"

    pipeline.consume_all(batch_size=500)
    cmp = pipeline.compare(keys)
    dups = pipeline.duplicate_log_ids()
    record("kill_9", kills=kills, documents=cmp.documents, missing=len(cmp.missing),
           duplicates=len(cmp.duplicates), duplicate_log_ids_agg=len(dups))
    assert cmp.exact, cmp.describe()
    assert not dups, f"log_ids indexed more than once: {list(dups.items())[:5]}"
    assert pipeline.committed() == pipeline.end_offsets()


def test_second_consumer_joins_and_leaves_without_loss(pipeline: Pipeline) -> None:
    pipeline.partitions = 6
    pipeline.write_config(consumer={"batch_size": 100})
    pipeline.bootstrap()
    pipeline.produce(4000)
    first = _service(pipeline, 100, name="first")
    second: Spawned | None = None
    try:
        first.wait_for_event("batch_committed", timeout=90)
        second = _service(pipeline, 100, name="second")
        pipeline.produce(2000)
        second.wait_for_event("assigned", timeout=60)
        # Let the second one work a little, then it leaves (SIGTERM) mid-stream.
        # It may have been assigned only drained partitions; leaving still counts.
        with contextlib.suppress(AssertionError):
            second.wait_for_event("batch_committed", timeout=20)
        pipeline.produce(2000)
        assert second.terminate_and_wait(40) == 0, f"second consumer:\n{second.log()[-3000:]}"
        pipeline.wait_caught_up(8000, first)
        assert first.terminate_and_wait(40) == 0, f"first consumer:\n{first.log()[-3000:]}"
    finally:
        first.kill()
        if second is not None:
            second.kill()
    keys = pipeline.topic_keys()
    cmp = pipeline.compare(keys)
    by_second = _sum_field(second.events("batch_committed"), "created")
    by_first = _sum_field(first.events("batch_committed"), "created")
    record("join_leave", documents=cmp.documents, expected=8000, by_first=by_first,
           by_second=by_second, missing=len(cmp.missing), duplicates=len(cmp.duplicates),
           revocations=len(first.events("revoked")))
    assert len(keys) == 8000
    assert cmp.exact, cmp.describe()
    assert second.events("assigned"), "the second consumer never got partitions"
    assert first.events("assigned"), "the first consumer logged no assignment"
