"""Per-item 429s: an Elasticsearch with a one-thread, one-slot write pool, flooded by a parallel
client while the consumer sends parallel bulk requests. Rejected items are retried (never
dead-lettered) and nothing is lost. The test insists that rejections really happened, both on
the server (thread pool stats) and in the consumer (retry log lines); otherwise it proves nothing.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from harness.pipeline import Pipeline, record
from harness.servers import ElasticsearchNode, KafkaCluster

pytestmark = pytest.mark.slow

TINY_WRITE_POOL = {"thread_pool.write.size": "1", "thread_pool.write.queue_size": "1"}


@pytest.fixture(scope="module")
def tiny_es() -> Iterator[ElasticsearchNode]:
    node = ElasticsearchNode(settings=TINY_WRITE_POOL)
    try:
        yield node
    finally:
        node.close()


def _write_rejections(es: Any) -> int:
    stats = es.nodes.stats(metric="thread_pool")
    return sum(int(n["thread_pool"]["write"]["rejected"]) for n in stats["nodes"].values())


class Flood:
    """Threads sending small bulk requests to another index, paced so the consumer still gets a
    share of the one write thread (an unpaced flood starves it: that is a different test)."""

    def __init__(self, node: ElasticsearchNode, threads: int = 2, pause_s: float = 0.05) -> None:
        self.node = node
        self.pause_s = pause_s
        self.stop = threading.Event()
        self.sent = 0
        self.rejected_items = 0
        self.index = f"flood-{uuid.uuid4().hex[:8]}"
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        es = self.node.client()
        body: list[dict[str, Any]] = []
        for i in range(50):
            body += [{"index": {"_index": self.index, "_id": str(i)}}, {"n": i}]
        while not self.stop.is_set():
            try:
                r = es.bulk(operations=body)
                self.sent += 1
                self.rejected_items += sum(1 for it in r["items"]
                                           if it["index"].get("status") == 429)
            except Exception:
                pass  # a whole-request 429 or a hiccup: keep flooding
            self.stop.wait(self.pause_s)
        es.close()

    def __enter__(self) -> Flood:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=30)


def test_per_item_429s_are_retried_not_lost(kafka: KafkaCluster, tiny_es: ElasticsearchNode,
                                            make_pipeline: Callable[..., Pipeline]) -> None:
    p = make_pipeline(kafka, tiny_es, name="backpressure")
    p.write_config(elasticsearch={"shards": 3},
                   consumer={"batch_size": 1000, "bulk_concurrency": 4,
                             "retry_initial_backoff_s": 0.1, "retry_max_backoff_s": 1.0})
    p.bootstrap()
    p.produce(6000)
    keys = p.topic_keys()
    es = tiny_es.client()
    before = _write_rejections(es)
    consumer = p.spawn("consume", "--max-batches", "1000", "--batch-size", "1000",
                       log_name="consume-429")
    try:
        # Flood until the consumer itself has been pushed back a few times, at most 60 s.
        with Flood(tiny_es) as flood, contextlib.suppress(AssertionError):
            consumer.wait_for_event("bulk_retry", timeout=60, count=3)
        code = consumer.wait(300)
    finally:
        consumer.kill()
    rejected = _write_rejections(es) - before
    es.indices.delete(index=flood.index, ignore_unavailable=True)
    es.close()
    assert code == 0, f"consumer exit code {code}:\n{consumer.log()[-4000:]}"

    retries = consumer.events("bulk_retry")
    retried_items = sum(int(e.get("items", "0") or 0) for e in retries)
    reasons = sorted({e.get("reason", "") for e in retries})
    committed = consumer.events("batch_committed")
    dlq = p.read_topic(p.dlq_topic)
    cmp = p.compare(keys)
    record("per_item_429", documents=cmp.documents, expected=len(keys),
           server_write_rejections=rejected, consumer_retry_events=len(retries),
           consumer_retried_items=retried_items, retry_reasons=reasons, dlq=len(dlq),
           flood_requests=flood.sent, flood_rejected_items=flood.rejected_items,
           batches=len(committed), missing=len(cmp.missing), duplicates=len(cmp.duplicates))
    assert rejected > 0, "Elasticsearch rejected nothing: the test did not create back-pressure"
    assert retries, ("Elasticsearch rejected writes but the consumer logged no bulk_retry: "
                     "were its own requests ever rejected?\n" + consumer.log()[-3000:])
    assert any("rejected" in r or "429" in r for r in reasons), (
        f"retries happened but not for rejections (reasons {reasons})")
    assert not dlq, f"{len(dlq)} rejected-then-retriable messages were dead-lettered"
    assert cmp.exact, cmp.describe()
    assert p.committed() == p.end_offsets()
