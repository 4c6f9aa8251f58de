"""Poison messages go to the dead-letter topic with their reason; everything else flows."""

from __future__ import annotations

import json
import uuid
from typing import Any

from confluent_kafka import KafkaError, Message, Producer
from harness.pipeline import Pipeline, record
from harness.servers import QUIET_RDKAFKA

MAX_MESSAGE_BYTES = 20_000


def _poison(template: dict[str, Any]) -> list[tuple[str, bytes, bytes | None]]:
    """(expected logpipe.reason, key, value) for every kind of bad message."""

    def variant(**changes: Any) -> tuple[bytes, bytes]:
        doc = dict(template)
        doc["log_id"] = str(uuid.uuid4())
        doc.update(changes)
        return doc["log_id"].encode(), json.dumps(doc).encode()

    def key() -> bytes:
        return str(uuid.uuid4()).encode()

    status_abc = variant(status="abc")
    bytes_lots = variant(bytes="lots")
    bad_ip = variant(client_ip="not-an-ip")
    unknown_field = variant(surprise_field="strict mapping says no")
    bad_ts = variant(timestamp="24/11/2026 10:00:00")
    no_such_day = variant(timestamp="2026-02-30T10:00:00.000Z")
    oversized = variant(endpoint="/" + "x" * (MAX_MESSAGE_BYTES + 1000))
    return [
        ("not_json", key(), b"this is not json {"),
        ("not_json", key(), None),  # a tombstone: no value at all
        ("not_object", key(), b"[1, 2, 3]"),
        ("not_object", key(), b'"just a string"'),
        ("mapping_error", *status_abc),
        ("mapping_error", *bytes_lots),
        ("mapping_error", *bad_ip),
        ("mapping_error", *unknown_field),
        ("bad_timestamp", *bad_ts),
        ("bad_timestamp", *no_such_day),
        ("oversized", *oversized),
        ("bad_key", b"\xff\xfe not utf-8", variant()[1]),
    ]


def test_poison_messages_are_dead_lettered_and_the_rest_flows(pipeline: Pipeline) -> None:
    pipeline.write_config(consumer={"max_message_bytes": MAX_MESSAGE_BYTES, "batch_size": 200})
    pipeline.bootstrap()
    pipeline.produce(300)
    template = json.loads(pipeline.read_topic()[0].value or b"{}")
    assert "log_id" in template and "timestamp" in template, f"unexpected log shape: {template}"

    poison = _poison(template)
    delivered: dict[tuple[int, int], str] = {}
    errors: list[str] = []

    def on_delivery(reason: str) -> Any:
        def cb(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                errors.append(str(err))
            else:
                delivered[(msg.partition(), msg.offset())] = reason
        return cb

    producer = Producer({"bootstrap.servers": pipeline.kafka.bootstrap_servers, "acks": "all",
                         "message.max.bytes": 1_000_000, "logger": QUIET_RDKAFKA})
    for reason, key, value in poison:
        producer.produce(pipeline.topic, key=key, value=value, on_delivery=on_delivery(reason))
    assert producer.flush(30) == 0 and not errors, f"poison not delivered: {errors}"
    pipeline.produce(300)

    messages = pipeline.read_topic()
    poison_at = set(delivered)
    good_keys = [m.key.decode() for m in messages
                 if (m.partition, m.offset) not in poison_at and m.key is not None]
    assert len(good_keys) == 600

    run = pipeline.consume_all(batch_size=200)

    dlq = pipeline.read_topic(pipeline.dlq_topic)
    by_source: dict[tuple[int, int], str] = {}
    for m in dlq:
        h = m.headers
        assert h.get("logpipe.reason"), f"DLQ message without logpipe.reason: {h}"
        assert (h.get("logpipe.source.topic") or b"").decode() == pipeline.topic, h
        src = (int(h["logpipe.source.partition"] or b"-1"),
               int(h["logpipe.source.offset"] or b"-1"))
        assert src not in by_source, f"source {src} dead-lettered twice"
        by_source[src] = (h["logpipe.reason"] or b"").decode()
    cmp = pipeline.compare(good_keys)
    record("poison", poison_sent=len(poison), dlq=len(dlq), documents=cmp.documents,
           good=len(good_keys), reasons=sorted(set(by_source.values())),
           duplicates=len(cmp.duplicates))

    assert len(dlq) == len(poison), (
        f"DLQ holds {len(dlq)} messages for {len(poison)} poison messages; consumer log:\n"
        f"{run.stderr[-3000:]}")
    assert by_source == delivered, (
        "dead letters do not match the poison messages (source -> reason):\n"
        f"expected {sorted(delivered.items())}\ngot      {sorted(by_source.items())}")
    assert cmp.exact, cmp.describe()
    assert pipeline.committed() == pipeline.end_offsets()
    # The oversized copy is truncated or whole, but its error says why.
    oversized = [m for m in dlq if m.headers.get("logpipe.reason") == b"oversized"]
    assert oversized and oversized[0].headers.get("logpipe.error"), "oversized without an error"
