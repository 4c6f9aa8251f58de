"""Fatal client states against real servers: the client can never work again, so the command stops
at once with one ``event=fatal reason=kafka_fatal`` line and exit code 1 (systemd restarts it).

* A static group member (``group.instance.id`` through ``kafka.client_overrides``) fenced by a
  second consumer started with the same id. librdkafka tells the fenced consumer only through a
  message error with the generic code ``_FATAL`` (``fatal()`` false) and then fails every
  commit; before the fix the consumer logged ``kafka_error`` and ``commit_failed`` forever while
  feeding the watchdog.
* The idempotent producers' fatal state, made reproducible with librdkafka's
  ``enable.gapless.guarantee`` (a permanent produce error, here a record over the topic's
  ``max.message.bytes``, is then fatal ``_GAPLESS_GUARANTEE``): the dead-letter producer inside
  the consumer, and ``logpipe produce``.

Times to exit are measured and recorded (``FIGURES``), never asserted beyond a generous bound.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType
from harness.pipeline import Pipeline, Spawned, record
from harness.servers import QUIET_RDKAFKA

pytestmark = pytest.mark.slow

# A generous bound for "promptly": the fenced member hears of it at its next heartbeat (3 s) or
# commit; systemd's watchdog (30 s) would only catch a consumer that stopped looping altogether.
EXIT_BOUND_S = 60.0


def _service(pipeline: Pipeline, name: str, batch_size: int = 200) -> Spawned:
    return pipeline.spawn("consume", "--batch-size", str(batch_size), log_name=name)


def _set_topic_config(pipeline: Pipeline, topic: str, **values: str) -> None:
    entries = [ConfigEntry(name.replace("_", "."), value,
                           incremental_operation=AlterConfigOpType.SET)
               for name, value in values.items()]
    resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=entries)
    for future in pipeline.admin.incremental_alter_configs([resource]).values():
        future.result(timeout=30)


def _gapless(pipeline: Pipeline) -> None:
    """librdkafka's gap-less guarantee for the idempotent producers, after bootstrap (the admin
    client refuses the property: it is not idempotent)."""
    pipeline.write_config(kafka={"client_overrides": {"enable.gapless.guarantee": "true"}})


def _exit_after(process: Spawned, since: float) -> tuple[int | None, float]:
    code = process.wait(EXIT_BOUND_S)
    return code, round(time.monotonic() - since, 2)


@pytest.mark.parametrize("phase", ["mid_stream", "idle"])
def test_fenced_static_member_exits_1_with_one_line_and_nothing_is_lost(
        pipeline: Pipeline, phase: str) -> None:
    """``mid_stream``: the first consumer learns it is fenced from its next commit
    (FENCED_INSTANCE_ID); ``idle`` (caught up, nothing to commit): from its next heartbeat,
    which reaches it as consume()'s message error ``_FATAL`` with ``fatal()`` false."""
    instance = f"logpipe-{uuid.uuid4().hex[:8]}"
    pipeline.write_config(kafka={"client_overrides": {"group.instance.id": instance}})
    pipeline.bootstrap()
    pipeline.produce(4000 if phase == "mid_stream" else 1000)
    first = _service(pipeline, "first")
    second: Spawned | None = None
    try:
        first.wait_for_event("batch_committed", timeout=90)
        if phase == "idle":
            pipeline.wait_caught_up(1000, first)
        # The same service started again elsewhere: same config, same group.instance.id.
        second = _service(pipeline, "second")
        second_started = time.monotonic()
        second.wait_for_event("assigned", timeout=60)
        second_joined = time.monotonic()
        code, after_join_s = _exit_after(first, second_joined)
        after_start_s = round(time.monotonic() - second_started, 2)
        assert code == 1, f"first consumer: exit {code}\n{first.log()[-4000:]}"
        # Whatever the first one committed (before it was fenced) is in Elasticsearch.
        pipeline.assert_committed_only_indexed()

        pipeline.produce(1000)
        total = 5000 if phase == "mid_stream" else 2000
        pipeline.wait_caught_up(total, second)
        assert second.terminate_and_wait(40) == 0, f"second consumer:\n{second.log()[-3000:]}"
    finally:
        first.kill()
        if second is not None:
            second.kill()

    fatal = first.events("fatal")
    assert len(fatal) == 1, first.log()[-4000:]
    line = fatal[0]
    assert (line["level"], line["reason"], line["client"]) == ("error", "kafka_fatal", "consumer")
    assert line["cause"] == "FENCED_INSTANCE_ID", line
    assert "fenced" in line["detail"], line
    # Stopped instead of spinning on commits that can never succeed.
    assert not first.events("commit_failed"), first.events("commit_failed")[:3]
    assert not second.events("fatal"), second.log()[-3000:]

    keys = pipeline.topic_keys()
    cmp = pipeline.compare(keys)
    dups = pipeline.duplicate_log_ids()
    record(f"fenced_static_member_{phase}", exit_code=code, exit_after_join_s=after_join_s,
           exit_after_second_start_s=after_start_s, cause=line["cause"],
           detail=line["detail"][:140], documents=cmp.documents, expected=len(keys),
           missing=len(cmp.missing), duplicates=len(cmp.duplicates),
           by_first=sum(int(e["created"]) for e in first.events("batch_committed")),
           by_second=sum(int(e["created"]) for e in second.events("batch_committed")),
           librdkafka_fatal_lines=[e.get("message", "")[:100] for e in first.events("librdkafka")
                                   if e.get("facility") == "FATAL"])
    assert len(keys) == total
    assert cmp.exact, cmp.describe()
    assert not dups, f"log_ids indexed more than once: {list(dups.items())[:5]}"
    assert pipeline.committed() == pipeline.end_offsets()


def _produce_raw(pipeline: Pipeline, partition: int, key: bytes, value: bytes) -> None:
    producer = Producer({"bootstrap.servers": pipeline.kafka.bootstrap_servers,
                         "logger": QUIET_RDKAFKA})
    errors: list[Any] = []
    producer.produce(pipeline.topic, key=key, value=value, partition=partition,
                     on_delivery=lambda err, _msg: errors.append(err))
    producer.flush(30)
    assert errors == [None], errors


def test_fatal_dead_letter_producer_stops_the_consumer_without_committing_past_it(
        pipeline: Pipeline) -> None:
    # With the gap-less guarantee a permanent produce error is fatal for the idempotent
    # producer; the dead-letter topic's record limit below the poison message makes one.
    pipeline.bootstrap()
    _gapless(pipeline)
    _set_topic_config(pipeline, pipeline.dlq_topic, max_message_bytes="1000")
    pipeline.produce(600)
    poison_key = b"poison-" + uuid.uuid4().hex.encode()
    _produce_raw(pipeline, 0, poison_key, b"not json " * 600)
    poison_offset = pipeline.end_offsets()[0] - 1
    pipeline.produce(600)

    consumer = _service(pipeline, "dlq-fatal")
    started = time.monotonic()
    try:
        code, exit_s = _exit_after(consumer, started)
    finally:
        consumer.kill()
    assert code == 1, f"exit {code}\n{consumer.log()[-4000:]}"
    fatal = consumer.events("fatal")
    assert len(fatal) == 1, consumer.log()[-4000:]
    assert (fatal[0]["reason"], fatal[0]["client"], fatal[0]["cause"]) == (
        "kafka_fatal", "dlq", "_GAPLESS_GUARANTEE"), fatal[0]
    committed = pipeline.assert_committed_only_indexed()
    assert committed[0] <= poison_offset, (committed, poison_offset)
    assert not consumer.events("bulk_retry"), "a fatal state is not retried"

    # The limit fixed, the same configuration (still gap-less) finishes the topic.
    _set_topic_config(pipeline, pipeline.dlq_topic, max_message_bytes="1048588")
    pipeline.consume_all()
    keys = [k for k in pipeline.topic_keys() if k != poison_key.decode()]
    cmp = pipeline.compare(keys)
    dead = pipeline.read_topic(pipeline.dlq_topic)
    record("fatal_dlq_producer", exit_code=code, exit_s=exit_s, cause=fatal[0]["cause"],
           detail=fatal[0]["detail"][:140], committed_p0=committed[0],
           poison_offset=poison_offset, documents=cmp.documents, expected=len(keys),
           dead_lettered=len(dead))
    assert cmp.exact, cmp.describe()
    assert [m.key for m in dead] == [poison_key]
    assert pipeline.committed() == pipeline.end_offsets()


def test_fatal_producer_exits_1_with_one_line(pipeline: Pipeline) -> None:
    pipeline.bootstrap()
    _gapless(pipeline)
    # Smaller than any record batch the producer sends: a permanent MESSAGE_TOO_LARGE.
    _set_topic_config(pipeline, pipeline.topic, max_message_bytes="200")
    done = pipeline.cli("produce", "--count", "2000", check=False)
    fatal = done.events("fatal")
    record("fatal_producer", exit_code=done.returncode, seconds=round(done.seconds, 2),
           cause=fatal[0]["cause"] if fatal else None,
           detail=fatal[0]["detail"][:140] if fatal else None,
           produce_done=done.events("produce_done"))
    assert done.returncode == 1, done.describe()
    assert len(fatal) == 1, done.describe()
    assert (fatal[0]["reason"], fatal[0]["client"], fatal[0]["cause"]) == (
        "kafka_fatal", "producer", "_GAPLESS_GUARANTEE"), fatal[0]
    assert "Traceback" not in done.stderr, done.describe()
    assert sum(pipeline.end_offsets().values()) == 0
    (summary,) = done.events("produce_done")
    assert int(summary["delivered"]) == 0, summary
