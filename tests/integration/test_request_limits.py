"""Request-size limits below the consumer's own cap (consumer.max_bulk_bytes, 32 MiB).

Two real limits refuse bulk requests with 413: Elasticsearch itself with a lowered
``http.max_content_length``, and a reverse proxy with a body limit in front of a real
Elasticsearch. Either way the consumer must split what is refused, dead-letter a document that
is refused on its own (reason ``too_large``), index everything else exactly once, commit to the
end and finish, instead of retrying the same request forever.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka import KafkaError, Message, Producer
from harness.pipeline import Completed, Pipeline, record
from harness.proxy import BodyLimitProxy
from harness.servers import QUIET_RDKAFKA, ElasticsearchNode, KafkaCluster

from logpipe.config import ConsumerConfig

pytestmark = pytest.mark.slow

LIMIT_BYTES = 64 * 1024
# Each too large for any request on its own, yet well under consumer.max_message_bytes (1 MiB)
# and Kafka's message size limit, and a valid document otherwise (user_agent is a text field).
BIG_DOC_BYTES = 100_000
BIG_DOCS = 3
NORMAL_DOCS = 3000
BATCH = 500


@pytest.fixture(scope="module")
def limited_es() -> Iterator[ElasticsearchNode]:
    node = ElasticsearchNode(settings={"http.max_content_length": f"{LIMIT_BYTES // 1024}kb"})
    try:
        yield node
    finally:
        node.close()


def _produce_big(pipeline: Pipeline) -> dict[tuple[int, int], str]:
    """Documents too large for any request, between two runs of normal ones: (partition,
    offset) -> log_id."""
    template = json.loads(pipeline.read_topic()[0].value or b"{}")
    delivered: dict[tuple[int, int], str] = {}
    errors: list[str] = []

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            errors.append(str(err))
        else:
            delivered[(msg.partition() or 0, msg.offset() or 0)] = (msg.key() or b"").decode()

    producer = Producer({"bootstrap.servers": pipeline.kafka.bootstrap_servers, "acks": "all",
                         "message.max.bytes": 1_000_000, "logger": QUIET_RDKAFKA})
    for _ in range(BIG_DOCS):
        doc = dict(template, log_id=str(uuid.uuid4()),
                   user_agent="Mozilla/5.0 " + "x" * BIG_DOC_BYTES)
        producer.produce(pipeline.topic, key=doc["log_id"].encode(),
                         value=json.dumps(doc).encode(), on_delivery=on_delivery)
    assert producer.flush(30) == 0 and not errors, f"big documents not delivered: {errors}"
    return delivered


def _run(pipeline: Pipeline, test: str,
         figures: Callable[[], dict[str, Any]] = dict) -> Completed:
    """Produce, consume run-once to the end, and check the outcome against the servers."""
    pipeline.produce(NORMAL_DOCS // 2)
    big = _produce_big(pipeline)
    pipeline.produce(NORMAL_DOCS // 2)
    normal_keys = [m.key.decode() for m in pipeline.read_topic()
                   if m.key is not None and (m.partition, m.offset) not in big]
    assert len(normal_keys) == NORMAL_DOCS

    # The CLI's timeout is the "it finishes" check: before the fix this run never ended.
    run = pipeline.consume_all(batch_size=BATCH, timeout=600)

    dlq = pipeline.read_topic(pipeline.dlq_topic)
    dead: dict[tuple[int, int], str] = {}
    for m in dlq:
        h = m.headers
        source = (int(h["logpipe.source.partition"] or b"-1"),
                  int(h["logpipe.source.offset"] or b"-1"))
        assert source not in dead, f"{source} dead-lettered twice"
        dead[source] = (h.get("logpipe.reason") or b"").decode()
    cmp = pipeline.compare(normal_keys)
    warnings = run.events("bulk_too_large")
    retried_413 = [e for e in run.events("bulk_retry") if "413" in e.get("reason", "")]
    record(test, indexed=cmp.documents, normal=NORMAL_DOCS, dlq=len(dlq),
           dlq_reasons=sorted(set(dead.values())), missing=len(cmp.missing),
           duplicates=len(cmp.duplicates), seconds=round(run.seconds, 1),
           batches=len(run.events("batch_committed")), bulk_too_large_warnings=len(warnings),
           new_cap_bytes=[int(w.get("new_cap_bytes", "0")) for w in warnings],
           limit_bytes=LIMIT_BYTES, **figures())

    assert dead == dict.fromkeys(big, "too_large"), (
        f"dead letters {dead} are not the {len(big)} big documents {sorted(big)} with reason "
        f"too_large:\n{run.stderr[-3000:]}")
    assert cmp.exact, cmp.describe()
    assert pipeline.committed() == pipeline.end_offsets(), "lag is not 0"
    assert warnings, "no bulk_too_large warning: was any request refused at all?"
    # One warning per lowering of the cap, not one per refused request: the first batch's
    # halving lowers it once, and a big document refused alone may lower it again.
    assert len(warnings) <= 1 + BIG_DOCS, warnings
    assert int(warnings[-1]["new_cap_bytes"]) < LIMIT_BYTES, warnings
    assert not retried_413, f"413s were retried with backoff: {retried_413}"
    return run


def test_elasticsearch_max_content_length_413s_split_and_dead_letter(
        kafka: KafkaCluster, limited_es: ElasticsearchNode,
        make_pipeline: Callable[..., Pipeline]) -> None:
    p = make_pipeline(kafka, limited_es, name="es-413")
    p.bootstrap()
    _run(p, "request_limit_elasticsearch")


def test_reverse_proxy_413s_split_and_dead_letter(pipeline: Pipeline) -> None:
    with BodyLimitProxy(pipeline.es_node.url, max_body_bytes=LIMIT_BYTES) as proxy:
        # Every request of the pipeline goes through the proxy, bootstrap's too.
        pipeline.write_config(elasticsearch={"hosts": [proxy.url]})
        pipeline.bootstrap()
        _run(pipeline, "request_limit_proxy",
             lambda: {"proxy_forwarded": proxy.forwarded, "proxy_refused": proxy.refused,
                      "proxy_bulks": len(proxy.bulks)})
    bulks = proxy.bulks
    # Each big document was refused once, alone, and never resent.
    assert sum(1 for status, docs in bulks if status == 413 and docs == 1) == BIG_DOCS, bulks
    # Requests of several documents were refused only while the batches sent before the first
    # 413 was answered (one per batch in hand: pipeline_depth) were being halved: the learned
    # cap cut every later batch below the limit up front (without it, each of the 6 batches
    # would meet the limit again, the last after ~2,500 documents were indexed).
    several = [i for i, (status, docs) in enumerate(bulks) if status == 413 and docs > 1]
    assert several, bulks
    indexed_before_last = sum(docs for status, docs in bulks[:several[-1]] if status == 200)
    assert indexed_before_last < ConsumerConfig.pipeline_depth * BATCH, bulks
