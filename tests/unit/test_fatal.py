"""Fatal client states: which librdkafka errors mean "this client cannot continue", and what the
consumer and the dead-letter producer do then (stop at once, one ``event=fatal`` line, exit 1,
nothing committed past unhandled messages).

The error texts are the ones librdkafka 2.16 gave against Kafka 4.1 (tests/integration/
test_fatal_states.py reproduces the static-member case against real servers).
"""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException
from test_consumer_unit import (
    FakeDLQ,
    FakeES,
    FakeKafka,
    FakeMessage,
    letter,
    make_config,
    setup,
    sink,
)

from logpipe import fatal, log, refusal
from logpipe.config import KafkaConfig
from logpipe.dlq import DeadLetterQueue

FENCED_TEXT = "Broker: Static consumer fenced by other consumer with same group.instance.id"
# What consume() returns to the fenced consumer: the generic code, fatal() false.
FENCED_MESSAGE = KafkaError(KafkaError._FATAL,
                            f"Fatal error: {FENCED_TEXT}: Fatal consumer error: {FENCED_TEXT}")


@pytest.mark.parametrize(("err", "cause"), [
    (FENCED_MESSAGE, "FENCED_INSTANCE_ID"),
    # A commit after the client turned fatal: the cause is not in the text.
    (KafkaError(KafkaError._FATAL, "Commit failed: Local: Fatal error"), "_FATAL"),
    # The commit that found out (OffsetCommit answered FENCED_INSTANCE_ID).
    (KafkaError(KafkaError.FENCED_INSTANCE_ID, f"Commit failed: {FENCED_TEXT}"),
     "FENCED_INSTANCE_ID"),
    # KIP-848 protocol: the newer member with a taken instance id is the one refused.
    (KafkaError(KafkaError.UNRELEASED_INSTANCE_ID), "UNRELEASED_INSTANCE_ID"),
    # A producer's fatal error as confluent-kafka raises it from poll()/flush().
    (KafkaError(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, "sequence desynchronization",
                fatal=True), "OUT_OF_ORDER_SEQUENCE_NUMBER"),
    (KafkaError(KafkaError._FENCED, "Producer fenced by newer instance"), "_FENCED"),
    (KafkaError(KafkaError._GAPLESS_GUARANTEE), "_GAPLESS_GUARANTEE"),
])
def test_fatal_states(err: KafkaError, cause: str) -> None:
    assert fatal.fatal_cause(err) == cause


@pytest.mark.parametrize("err", [
    KafkaError(KafkaError._TRANSPORT, "127.0.0.1:9092/1: Connection refused"),
    KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"),
    KafkaError(KafkaError.REBALANCE_IN_PROGRESS, "Commit failed: Broker: Group rebalance"),
    KafkaError(KafkaError.UNKNOWN_MEMBER_ID),
    KafkaError(KafkaError.ILLEGAL_GENERATION),
    KafkaError(KafkaError._MSG_TIMED_OUT),
    # Not head-of-line: librdkafka retries these itself (fatal() would say otherwise).
    KafkaError(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER),
    KafkaError(KafkaError.UNKNOWN_PRODUCER_ID),
    KafkaError(KafkaError._PURGE_QUEUE),
])
def test_errors_a_client_survives(err: KafkaError) -> None:
    assert fatal.fatal_cause(err) is None


def test_a_fatal_error_caused_by_a_missing_acl_is_a_refusal() -> None:
    # KIP-848's heartbeat makes GROUP_AUTHORIZATION_FAILED fatal: still a configuration problem.
    text = "Broker: Group authorization failed"
    err = KafkaError(KafkaError._FATAL, f"Fatal error: {text}: ConsumerGroupHeartbeat fatal "
                                        f"error: {text}")
    found = refusal.kafka(err, "k1:9092")
    assert found is not None and found.reason == refusal.KAFKA_ACL


def _fatal_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "event=fatal" in line]


class FencedKafka(FakeKafka):
    """After ``fence_at`` messages were handed out, another instance takes this one's
    group.instance.id: librdkafka's consumer error arrives (after messages already fetched), and
    from then on every commit fails with _FATAL."""

    def __init__(self, *args: Any, fence_at: int) -> None:
        super().__init__(*args)
        self.fence_at = fence_at
        self.fenced = False
        self.commits_refused = 0

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        out: list[Any] = super().consume(num_messages, timeout)
        if not self.fenced and sum(self.next.values()) >= self.fence_at:
            self.fenced = True
            out.append(FakeMessage(0, -1001, None, None, FENCED_MESSAGE))
        return out

    def commit(self, offsets: list[Any], asynchronous: bool) -> list[Any]:
        if self.fenced:
            self.commits_refused += 1
            raise KafkaException(KafkaError(KafkaError._FATAL,
                                            "Commit failed: Local: Fatal error"))
        return super().commit(offsets, asynchronous)


def test_fenced_consumer_stops_at_once_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    log.setup("INFO")
    world, plain = setup(per_partition=200)
    fake = FencedKafka(world, plain.logs, fence_at=30)
    consumer = sink(make_config(max_batches=0), fake, FakeES(world), FakeDLQ(world))
    assert consumer.run() == 1
    err = capsys.readouterr().err
    fatal = _fatal_lines(err)
    assert len(fatal) == 1, err
    assert "reason=kafka_fatal client=consumer cause=FENCED_INSTANCE_ID" in fatal[0]
    assert "commit_failed" not in err and "kafka_error" not in err
    # The messages fetched with the error are not processed (the instance that took over
    # handles them), and nothing is committed any more: no loop of failing commits.
    # Batches answered before the fence are committed (one or two: the second may still be in
    # flight when the error arrives, and is then left uncommitted).
    assert consumer.batches in (1, 2)
    assert fake.commits_refused == 0
    assert sum(fake.committed_position(p) for p in fake.logs) == 10 * consumer.batches


def test_fatal_commit_is_not_retried(capsys: pytest.CaptureFixture[str]) -> None:
    log.setup("INFO")
    world, fake = setup(per_partition=50)
    calls: list[int] = []

    def commit(offsets: list[Any], asynchronous: bool) -> list[Any]:
        calls.append(len(offsets))
        raise KafkaException(KafkaError(KafkaError.FENCED_INSTANCE_ID,
                                        f"Commit failed: {FENCED_TEXT}"))
    fake.commit = commit  # type: ignore[method-assign]
    consumer = sink(make_config(max_batches=0), fake, FakeES(world), FakeDLQ(world))
    assert consumer.run() == 1
    err = capsys.readouterr().err
    assert len(_fatal_lines(err)) == 1
    assert "cause=FENCED_INSTANCE_ID" in _fatal_lines(err)[0]
    # The batch's commit only: none on the way out, no loop of failing commits.
    assert len(calls) == 1, calls
    assert consumer.batches == 1


def test_per_partition_fatal_commit_error_stops_the_loop() -> None:
    from confluent_kafka import TopicPartition

    world, fake = setup(per_partition=50)

    def commit(offsets: list[TopicPartition], asynchronous: bool) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, tp.offset) if tp.partition else
                _with_error(tp) for tp in offsets]
    fake.commit = commit  # type: ignore[method-assign]
    consumer = sink(make_config(max_batches=0), fake, FakeES(world), FakeDLQ(world))
    assert consumer.run() == 1
    assert consumer._fatal is not None and consumer._fatal.cause == "FENCED_INSTANCE_ID"


def _with_error(tp: Any) -> Any:
    class Failed:
        topic, partition, offset = tp.topic, tp.partition, tp.offset
        error = KafkaError(KafkaError.FENCED_INSTANCE_ID)
    return Failed()


class FatalDLQ(FakeDLQ):
    """A dead-letter producer that reached a fatal state: nothing acknowledged."""

    def send(self, letters: list[Any], timeout_s: float | None = None) -> list[bool]:
        self.fatal = fatal.FatalError("dlq", "OUT_OF_ORDER_SEQUENCE_NUMBER", "desynchronized")
        return [False] * len(letters)


def test_fatal_dead_letter_producer_stops_the_consumer(capsys: pytest.CaptureFixture[str],
                                                       ) -> None:
    log.setup("INFO")
    # Partition 0's 6th message is not JSON: it must go to the DLQ, which cannot take it.
    world, fake = setup(per_partition=20, extra={0: [b"not json"]})
    fake.logs[0].insert(5, fake.logs[0].pop())
    consumer = sink(make_config(max_batches=0), fake, FakeES(world), FatalDLQ(world))
    assert consumer.run() == 1
    fatal = _fatal_lines(capsys.readouterr().err)
    assert len(fatal) == 1 and "client=dlq cause=OUT_OF_ORDER_SEQUENCE_NUMBER" in fatal[0]
    # The fake asserts every commit passes only handled offsets: partition 0 stays below 5.
    assert fake.committed_position(0) <= 5
    assert consumer.retried == 0, "a fatal state is not retried"


class FatalProducer:
    """confluent-kafka's Producer once librdkafka raised a fatal error: flush() raises it once
    (fatal() true), queued messages were purged."""

    def __init__(self) -> None:
        self.produced = 0
        self.callbacks: list[Any] = []
        self.raised = False
        self.purged = False

    def produce(self, topic: str, value: bytes | None, key: bytes | None,
                headers: list[tuple[str, bytes]], on_delivery: Any) -> None:
        self.produced += 1
        self.callbacks.append(on_delivery)

    def flush(self, timeout: float) -> int:
        if not self.raised:
            self.raised = True
            raise KafkaException(KafkaError(KafkaError.UNKNOWN_PRODUCER_ID,
                                            "unknown producer id", fatal=True))
        for callback in self.callbacks:
            callback(KafkaError(KafkaError._PURGE_QUEUE), None)
        self.callbacks.clear()
        return 0

    def purge(self) -> None:
        self.purged = True

    def __len__(self) -> int:
        return len(self.callbacks)


def test_dead_letter_queue_notes_a_fatal_flush(capsys: pytest.CaptureFixture[str]) -> None:
    log.setup("INFO")
    producer = FatalProducer()
    dlq = DeadLetterQueue(KafkaConfig(), producer=producer, flush_timeout_s=5.0)
    assert dlq.send([letter(1), letter(2)]) == [False, False]
    assert dlq.fatal is not None
    assert (dlq.fatal.client, dlq.fatal.cause) == ("dlq", "UNKNOWN_PRODUCER_ID")
    assert dlq.refusal is None
    # Nothing more is produced by a dead client, and closing does not wait for it.
    assert dlq.send([letter(3)]) == [False]
    assert producer.produced == 2
    dlq.close()
    assert producer.purged


GAPLESS_LOG = ("[thrd:127.0.0.1:53613/1]: Fatal error: Local: Gap-less ordering would not be "
               "guaranteed if proceeding: ProduceRequest for web-logs-topic.dlq [0] with 1 "
               "message(s) failed: Broker: Message size too large (broker 1 PID{Id:2,Epoch:0}, "
               "base seq 0): unable to satisfy gap-less guarantee")


def test_librdkafka_log_line_names_the_fatal_cause() -> None:
    found = fatal.fatal_logged("FATAL", GAPLESS_LOG, "dlq")
    assert found is not None
    assert (found.client, found.cause) == ("dlq", "_GAPLESS_GUARANTEE")
    assert found.detail.startswith("Fatal error: Local: Gap-less")
    assert fatal.fatal_logged("FAIL", "[thrd:main]: 127.0.0.1:9092/1: Connect failed", "dlq") \
        is None


def _raised_during(cause: BaseException | None) -> SystemError:
    """A SystemError the way confluent-kafka raises it when a callback ran after its fatal
    error (``raise ... from`` sets ``__cause__`` like the C code's chaining)."""
    try:
        raise SystemError("<method 'flush' of 'cimpl.Producer' objects> returned a result "
                          "with an exception set") from cause
    except SystemError as exc:
        return exc


def test_watch_understands_what_a_producer_raises_for_a_fatal_error() -> None:
    fatal = KafkaException(KafkaError(KafkaError._GAPLESS_GUARANTEE, "gap", fatal=True))
    watch = refusal.KafkaErrorWatch("k1:9092", client="producer")
    assert watch.caught(fatal)
    assert watch.fatal is not None and watch.fatal.cause == "_GAPLESS_GUARANTEE"

    chained = refusal.KafkaErrorWatch("k1:9092", client="producer")
    assert chained.caught(_raised_during(fatal))
    assert chained.fatal is not None and chained.fatal.cause == "_GAPLESS_GUARANTEE"

    # The exception lost on the way: the client is unusable, the cause comes from the log.
    lost = refusal.KafkaErrorWatch("k1:9092", client="dlq")
    assert lost.caught(_raised_during(None))
    assert lost.fatal is not None and lost.fatal.cause == "_FATAL" and lost.stopped
    lost.logged("FATAL", GAPLESS_LOG)
    assert lost.fatal.cause == "_GAPLESS_GUARANTEE"
    lost.caught(KafkaException(KafkaError(KafkaError._FATAL, "Local: Fatal error")))
    assert lost.fatal.cause == "_GAPLESS_GUARANTEE", "a generic report never hides the cause"

    other = refusal.KafkaErrorWatch("k1:9092")
    assert not other.caught(ValueError("not kafka"))
    assert not other.caught(KafkaException(KafkaError(KafkaError._MSG_TIMED_OUT)))
    assert not other.stopped


def test_a_refusal_raised_as_a_fatal_error_stays_a_refusal() -> None:
    # A producer without IdempotentWrite: InitProducerId fails fatally with an ACL code.
    watch = refusal.KafkaErrorWatch("k1:9092", client="dlq")
    assert watch.caught(KafkaException(KafkaError(
        KafkaError.CLUSTER_AUTHORIZATION_FAILED, "Broker: Cluster authorization failed",
        fatal=True)))
    assert watch.refusal is not None and watch.refusal.reason == refusal.KAFKA_ACL
    assert watch.fatal is None
