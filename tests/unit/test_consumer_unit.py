"""SinkConsumer driven by in-memory Kafka, Elasticsearch and dead-letter fakes.

The fakes check the central invariant on every commit: no committed position passes a message
that was neither indexed (201/409) nor acknowledged by the dead-letter topic.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from confluent_kafka import KafkaError, TopicPartition
from elastic_transport import ApiResponseMeta, HttpHeaders, NodeConfig
from elasticsearch import ApiError

from logpipe.config import Config, ConsumerConfig, ElasticsearchConfig, KafkaConfig
from logpipe.consumer import SinkConsumer, consumer_config, make_es_client
from logpipe.dlq import DeadLetter

TOPIC = "web-logs-topic"


def event(n: int) -> bytes:
    return orjson.dumps({"log_id": f"id-{n}", "timestamp": "2026-11-24T10:00:00.123Z",
                         "status": 200, "bytes": n})


class FakeMessage:
    def __init__(self, partition: int, offset: int, key: bytes | None, value: bytes | None,
                 error: KafkaError | None = None) -> None:
        self._p, self._o, self._k, self._v, self._e = partition, offset, key, value, error

    def error(self) -> KafkaError | None:
        return self._e

    def topic(self) -> str:
        return TOPIC

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def key(self) -> bytes | None:
        return self._k

    def value(self) -> bytes | None:
        return self._v


class World:
    """Shared truth: what is durably in Elasticsearch / the DLQ, keyed by (partition, offset)."""

    def __init__(self) -> None:
        self.indexed: dict[str, tuple[int, int]] = {}
        self.offset_of_id: dict[str, tuple[int, int]] = {}
        self.dead: set[tuple[int, int]] = set()
        self.commits: list[dict[int, int]] = []
        self.commit_metadata: list[str | None] = []

    def done(self, partition: int, offset: int) -> bool:
        return (partition, offset) in self.dead or (partition, offset) in self.indexed.values()


class FakeKafka:
    def __init__(self, world: World, partitions: dict[int, list[tuple[bytes | None, bytes]]],
                 ) -> None:
        self.world = world
        self.logs = partitions
        self.next = dict.fromkeys(partitions, 0)
        self.paused: set[int] = set()
        self.pause_calls = 0
        self.resume_calls = 0
        self.callbacks: dict[str, Callable[..., None]] = {}
        self.assigned = False
        self.closed = False
        self.eof_sent: set[int] = set()
        # Hook run at the start of every consume() (e.g. to trigger a revoke).
        self.on_consume: Callable[[FakeKafka], None] | None = None
        # The consumer's on_commit callback, served from consume() like librdkafka does.
        self.on_commit: Callable[[KafkaError | None, list[TopicPartition]], None] | None = None
        self.commit_results: list[list[TopicPartition]] = []
        self.async_commits = 0

    def list_topics(self, topic: str, timeout: float) -> Any:
        from types import SimpleNamespace

        info = SimpleNamespace(error=None, partitions=dict.fromkeys(self.logs))
        return SimpleNamespace(topics={TOPIC: info})

    def poll(self, timeout: float = 0) -> None:
        return None

    def subscribe(self, topics: list[str], **callbacks: Callable[..., None]) -> None:
        assert topics == [TOPIC]
        self.callbacks = callbacks

    def consume(self, num_messages: int, timeout: float) -> list[FakeMessage]:
        if not self.assigned:
            self.assigned = True
            self.callbacks["on_assign"](self, [TopicPartition(TOPIC, p) for p in self.logs])
        if self.on_consume is not None:
            self.on_consume(self)
        results, self.commit_results = self.commit_results, []
        for result in results:
            if self.on_commit is not None:
                self.on_commit(None, result)
        out: list[FakeMessage] = []
        for p, log in self.logs.items():
            if p in self.paused:
                continue
            while self.next[p] < len(log) and len(out) < num_messages:
                key, value = log[self.next[p]]
                out.append(FakeMessage(p, self.next[p], key, value))
                self.next[p] += 1
                self.eof_sent.discard(p)
            if self.next[p] == len(log) and p not in self.eof_sent and len(out) < num_messages:
                self.eof_sent.add(p)
                out.append(FakeMessage(p, len(log), None, None,
                                       KafkaError(KafkaError._PARTITION_EOF)))
        if not out:
            time.sleep(min(timeout, 0.002))
        return out

    def pause(self, tps: list[TopicPartition]) -> None:
        self.pause_calls += 1
        self.paused |= {tp.partition for tp in tps}

    def resume(self, tps: list[TopicPartition]) -> None:
        self.resume_calls += 1
        self.paused -= {tp.partition for tp in tps}

    def commit(self, offsets: list[TopicPartition], asynchronous: bool,
               ) -> list[TopicPartition] | None:
        for tp in offsets:
            for offset in range(tp.offset):
                assert self.world.done(tp.partition, offset), (
                    f"commit {tp.partition}@{tp.offset} passes unhandled offset {offset}")
        self.world.commits.append({tp.partition: tp.offset for tp in offsets})
        self.world.commit_metadata.extend(tp.metadata for tp in offsets)
        if asynchronous:
            self.async_commits += 1
            self.commit_results.append(offsets)
            return None
        return offsets

    def get_watermark_offsets(self, tp: TopicPartition, cached: bool) -> tuple[int, int]:
        return 0, len(self.logs[tp.partition])

    def close(self) -> None:
        self.closed = True
        self.callbacks["on_revoke"](self, [TopicPartition(TOPIC, p) for p in self.logs])

    def committed_position(self, partition: int) -> int:
        return max((c[partition] for c in self.world.commits if partition in c), default=0)


class FakeResponse:
    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body


class FakeES:
    """Indexes `create`s into World; `verdict(doc_id, attempt)` can force an item status."""

    def __init__(self, world: World,
                 verdict: Callable[[str, int], int | None] = lambda _i, _n: None,
                 fail_requests: int = 0, max_body_bytes: int | None = None) -> None:
        self.world = world
        self.verdict = verdict
        self.fail_requests = fail_requests
        # Like http.max_content_length: 413 for a larger body; documents per refused request.
        self.max_body_bytes = max_body_bytes
        self.refused: list[int] = []
        self.attempts: dict[str, int] = {}
        self.requests = 0
        self.lock = threading.Lock()

        class Cluster:
            def health(self) -> dict[str, str]:
                return {"status": "green"}
        self.cluster = Cluster()

    def bulk(self, body: bytes, filter_path: str) -> FakeResponse:
        from elasticsearch import ConnectionError as EsConnectionError

        with self.lock:
            self.requests += 1
            if self.fail_requests > 0:
                self.fail_requests -= 1
                raise EsConnectionError("connection refused")
            lines = body.split(b"\n")[:-1]
            if self.max_body_bytes is not None and len(body) > self.max_body_bytes:
                self.refused.append(len(lines) // 2)
                raise ApiError("Request Entity Too Large", meta=ApiResponseMeta(
                    status=413, http_version="1.1", headers=HttpHeaders(), duration=0.0,
                    node=NodeConfig("http", "localhost", 9200)), body=None)
            items = []
            for action_line, source_line in zip(lines[::2], lines[1::2], strict=True):
                action = orjson.loads(action_line)["create"]
                source = orjson.loads(source_line)
                doc_id = action["_id"]
                assert "indexed_at" in source
                n = self.attempts[doc_id] = self.attempts.get(doc_id, 0) + 1
                forced = self.verdict(doc_id, n)
                result: dict[str, Any] = {"_index": action["_index"], "_id": doc_id}
                if forced == 429:
                    result.update(status=429, error={"type": "es_rejected_execution_exception",
                                                     "reason": "queue full"})
                elif forced == 403:
                    result.update(status=403, error={
                        "type": "security_exception",
                        "reason": "action [indices:admin/auto_create] is unauthorized"})
                elif forced == 400:
                    result.update(status=400, error={"type": "document_parsing_exception",
                                                     "reason": "failed to parse field [status]"})
                elif doc_id in self.world.indexed:
                    result.update(status=409, error={"type": "version_conflict_engine_exception",
                                                     "reason": "document already exists"})
                else:
                    self.world.indexed[doc_id] = self.world.offset_of_id[doc_id]
                    result.update(status=201, result="created")
                items.append({"create": result})
            # Answer in reverse order: the consumer must match by id, not position.
            items.reverse()
            errors = any(i["create"]["status"] >= 300 for i in items)
            return FakeResponse({"errors": errors, "items": items})


class FakeDLQ:
    def __init__(self, world: World, fail_first: int = 0) -> None:
        self.world = world
        self.fail_first = fail_first
        self.sent: list[DeadLetter] = []
        self.refusal: Any = None
        self.fatal: Any = None

    def send(self, letters: list[DeadLetter], timeout_s: float | None = None) -> list[bool]:
        acks = []
        for letter in letters:
            if self.fail_first > 0:
                self.fail_first -= 1
                acks.append(False)
                continue
            self.sent.append(letter)
            self.world.dead.add((letter.partition, letter.offset))
            acks.append(True)
        return acks

    def close(self, timeout_s: float = 10.0) -> int:
        return 0


def make_config(**consumer: Any) -> Config:
    values = {"batch_size": 10, "max_batches": 1000, "poll_timeout_s": 0.01,
              "retry_initial_backoff_s": 0.01, "retry_max_backoff_s": 0.02,
              "shutdown_timeout_s": 1.0, **consumer}
    return Config(kafka=KafkaConfig(topic=TOPIC), elasticsearch=ElasticsearchConfig(),
                  consumer=ConsumerConfig(**values))


def setup(per_partition: int = 15, partitions: int = 2, extra: dict[int, list[bytes]] | None = None,
          ) -> tuple[World, FakeKafka]:
    world = World()
    logs: dict[int, list[tuple[bytes | None, bytes]]] = {}
    n = 0
    for p in range(partitions):
        logs[p] = []
        for _ in range(per_partition):
            logs[p].append((f"id-{n}".encode(), event(n)))
            world.offset_of_id[f"id-{n}"] = (p, len(logs[p]) - 1)
            n += 1
        for value in (extra or {}).get(p, []):
            logs[p].append((b"poison-%d" % len(logs[p]), value))
    return world, FakeKafka(world, logs)


def sink(cfg: Config, kafka: FakeKafka, es: FakeES, dlq: FakeDLQ) -> SinkConsumer:
    consumer = SinkConsumer(cfg, consumer=kafka, es=es, dlq=dlq,  # type: ignore[arg-type]
                            rng=lambda: 0.5)
    kafka.on_commit = consumer._on_commit
    return consumer


def test_run_once_indexes_everything_and_commits_to_the_end() -> None:
    world, kafka = setup()
    consumer = sink(make_config(), kafka, FakeES(world), FakeDLQ(world))
    assert consumer.run() == 0
    assert consumer.indexed == 30
    assert consumer.already_present == 0
    assert consumer.dead_lettered == 0
    assert len(world.indexed) == 30
    assert kafka.committed_position(0) == 15
    assert kafka.committed_position(1) == 15
    assert kafka.closed


def test_max_batches_stops_early() -> None:
    world, kafka = setup()
    consumer = sink(make_config(max_batches=1), kafka, FakeES(world), FakeDLQ(world))
    assert consumer.run() == 0
    assert consumer.batches == 1
    assert consumer.indexed == 10


def test_replay_counts_already_present() -> None:
    world, kafka = setup()
    sink(make_config(), kafka, FakeES(world), FakeDLQ(world)).run()
    _, kafka2 = setup()
    kafka2.world = world
    again = sink(make_config(), kafka2, FakeES(world), FakeDLQ(world))
    assert again.run() == 0
    assert again.indexed == 0
    assert again.already_present == 30


def test_retriable_items_are_retried_while_paused() -> None:
    world, kafka = setup()
    # id-3 is rejected twice with 429, then accepted.
    es = FakeES(world, verdict=lambda i, n: 429 if i == "id-3" and n <= 2 else None)
    consumer = sink(make_config(), kafka, es, FakeDLQ(world))
    assert consumer.run() == 0
    assert consumer.indexed == 30
    assert consumer.retried == 2
    assert es.attempts["id-3"] == 3
    # Only the failed item is resent, not its batch.
    assert es.attempts["id-2"] == 1
    # Its partition was held (paused) while it waited, and released after.
    assert kafka.pause_calls >= 1 and kafka.resume_calls >= 1


def test_whole_request_failure_is_retried() -> None:
    world, kafka = setup()
    es = FakeES(world, fail_requests=3)
    consumer = sink(make_config(), kafka, es, FakeDLQ(world))
    assert consumer.run() == 0
    assert consumer.indexed == 30
    # Every document waited at least once; how many rounds each took depends on which requests
    # were in flight together.
    assert consumer.retried >= 30 - 10
    assert es.requests >= 4


def test_mapping_errors_and_poison_go_to_the_dlq() -> None:
    world, kafka = setup(extra={0: [b"not json", orjson.dumps({"timestamp": "yesterday"})]})
    es = FakeES(world, verdict=lambda i, n: 400 if i == "id-7" else None)
    dlq = FakeDLQ(world)
    consumer = sink(make_config(), kafka, es, dlq)
    assert consumer.run() == 0
    reasons = {(d.partition, d.offset): d.reason for d in dlq.sent}
    assert reasons == {(0, 7): "mapping_error", (0, 15): "not_json", (0, 16): "bad_timestamp"}
    assert consumer.dead_lettered == 3
    assert consumer.indexed == 29
    assert kafka.committed_position(0) == 17
    letter = next(d for d in dlq.sent if d.offset == 15)
    assert letter.value == b"not json"
    assert letter.key == b"poison-15"


def test_failed_dlq_delivery_blocks_the_commit_until_acknowledged() -> None:
    world, kafka = setup(per_partition=3, partitions=1, extra={0: [b"not json"]})
    dlq = FakeDLQ(world, fail_first=2)
    consumer = sink(make_config(), kafka, FakeES(world), dlq)
    assert consumer.run() == 0
    assert consumer.dead_lettered == 1
    assert consumer.retried == 2
    # The fake's commit() asserts that no position passed the unacknowledged offset 3.
    assert kafka.committed_position(0) == 4


def test_stop_during_endless_retry_commits_only_handled_and_exits_zero() -> None:
    world, kafka = setup(per_partition=10, partitions=1)
    es = FakeES(world, verdict=lambda i, n: 429 if i == "id-4" else None)
    consumer = sink(make_config(max_batches=0, shutdown_timeout_s=0.3), kafka, es,
                    FakeDLQ(world))
    thread = threading.Thread(target=consumer.run)
    thread.start()
    deadline = time.monotonic() + 5
    while consumer.retried < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    consumer.stop()
    thread.join(5)
    assert not thread.is_alive()
    assert time.monotonic() - started < 2.0
    # Offsets 5..9 were indexed, but the position stops at the unhandled offset 4.
    assert kafka.committed_position(0) == 4
    assert consumer.left_for_redelivery == 1


def test_revoke_during_retry_commits_handled_and_drops_the_rest() -> None:
    world, kafka = setup(per_partition=5, partitions=2)
    # id-1 (partition 0) keeps failing until partition 0 is revoked.
    es = FakeES(world, verdict=lambda i, n: 429 if i == "id-1" else None)
    consumer = sink(make_config(max_batches=0), kafka, es, FakeDLQ(world))
    revoked = threading.Event()

    def revoke_partition_0(k: FakeKafka) -> None:
        if consumer.retried >= 2 and not revoked.is_set():
            revoked.set()
            k.callbacks["on_revoke"](k, [TopicPartition(TOPIC, 0)])
            del k.logs[0]

    kafka.on_consume = revoke_partition_0
    thread = threading.Thread(target=consumer.run)
    thread.start()
    deadline = time.monotonic() + 5
    while not (revoked.is_set() and consumer.batches >= 1) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    consumer.stop()
    thread.join(5)
    assert revoked.is_set()
    # Partition 0: offset 0 was indexed, offset 1 never was -> committed position 1, no further.
    assert kafka.committed_position(0) == 1
    assert kafka.committed_position(1) == 5
    assert "id-1" not in world.indexed


def test_lost_partitions_are_dropped_without_commit() -> None:
    world, kafka = setup(per_partition=5, partitions=2)
    es = FakeES(world, verdict=lambda i, n: 429 if i == "id-6" else None)
    consumer = sink(make_config(max_batches=0), kafka, es, FakeDLQ(world))
    lost = threading.Event()
    commits_before_loss = 0

    def lose_partition_1(k: FakeKafka) -> None:
        nonlocal commits_before_loss
        if consumer.retried >= 1 and not lost.is_set():
            lost.set()
            commits_before_loss = len(world.commits)
            k.callbacks["on_lost"](k, [TopicPartition(TOPIC, 1)])
            del k.logs[1]

    kafka.on_consume = lose_partition_1
    thread = threading.Thread(target=consumer.run)
    thread.start()
    deadline = time.monotonic() + 5
    while not lost.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    consumer.stop()
    thread.join(5)
    assert lost.is_set()
    # Before the loss partition 1 may commit up to the document being retried (offset 1: the
    # fake refuses any commit past it); from the loss on, nothing.
    assert all(c.get(1, 0) <= 1 for c in world.commits)
    assert all(1 not in c for c in world.commits[commits_before_loss:])
    assert kafka.committed_position(0) == 5


def test_bulk_concurrency_splits_the_batch() -> None:
    world, kafka = setup(per_partition=20, partitions=1)
    es = FakeES(world, verdict=lambda i, n: 429 if i == "id-15" and n == 1 else None)
    consumer = sink(make_config(batch_size=20, bulk_concurrency=4), kafka, es, FakeDLQ(world))
    assert consumer.run() == 0
    assert consumer.indexed == 20
    # 4 chunks for the batch + 1 retry of the single failed item.
    assert es.requests == 5


def test_request_too_large_is_halved_the_cap_learned_and_a_lone_refusal_dead_lettered(
        capsys: pytest.CaptureFixture[str]) -> None:
    from logpipe import log

    log.setup("INFO")
    big = orjson.dumps({"log_id": "big", "timestamp": "2026-11-24T10:00:00.123Z",
                        "user_agent": "x" * 5000})
    world, kafka = setup(per_partition=15, extra={0: [big]})
    # Four of these documents fit in one request, five do not; the big one never fits.
    es = FakeES(world, max_body_bytes=4 * 200)
    dlq = FakeDLQ(world)
    consumer = sink(make_config(), kafka, es, dlq)
    assert consumer.run() == 0
    assert consumer.indexed == 30
    assert [(d.offset, d.reason) for d in dlq.sent] == [(15, "too_large")]
    assert "HTTP 413" in dlq.sent[0].error
    assert kafka.committed_position(0) == 16 and kafka.committed_position(1) == 15
    # The first batch of 10 was refused, then both its halves; later requests were cut under
    # the learned cap up front, and the big document was refused once, alone, and not retried.
    assert es.refused == [10, 5, 5, 1]
    assert consumer.retried == 0
    warnings = [line for line in capsys.readouterr().err.splitlines()
                if "event=bulk_too_large" in line]
    assert len(warnings) == 1, warnings
    assert "new_cap_bytes=" in warnings[0] and "previous_cap_bytes=33554432" in warnings[0]


def test_consumer_config_semantics_cannot_be_overridden() -> None:
    cfg = Config(kafka=KafkaConfig(client_overrides={"enable.auto.commit": "true",
                                                     "fetch.min.bytes": "1"}),
                 consumer=ConsumerConfig(session_timeout_ms=10000))
    conf = consumer_config(cfg)
    assert conf["enable.auto.commit"] is False
    assert conf["enable.auto.offset.store"] is False
    assert conf["partition.assignment.strategy"] == "cooperative-sticky"
    assert conf["auto.offset.reset"] == "earliest"
    assert conf["group.id"] == "elasticsearch-consumer-group"
    assert conf["session.timeout.ms"] == 10000
    assert conf["fetch.min.bytes"] == "1"
    assert conf["enable.partition.eof"] is False


@pytest.mark.parametrize("max_batches", [0, 3])
def test_partition_eof_only_in_run_once_mode(max_batches: int) -> None:
    cfg = Config(consumer=ConsumerConfig(max_batches=max_batches))
    assert consumer_config(cfg)["enable.partition.eof"] is (max_batches > 0)


# -- dead-letter producer ----------------------------------------------------------------------


class FakeProducer:
    """Calls delivery callbacks on flush(); `fail` lists source offsets whose delivery fails."""

    def __init__(self, fail: set[int] | None = None, full_once: bool = False) -> None:
        self.fail = fail or set()
        self.full_once = full_once
        self.pending: list[tuple[Callable[..., None], dict[str, Any]]] = []
        self.produced: list[dict[str, Any]] = []

    def produce(self, topic: str, value: bytes | None, key: bytes | None,
                headers: list[tuple[str, bytes]], on_delivery: Callable[..., None]) -> None:
        if self.full_once:
            self.full_once = False
            raise BufferError("Local: Queue full")
        record = {"topic": topic, "value": value, "key": key, "headers": dict(headers)}
        self.pending.append((on_delivery, record))

    def flush(self, timeout: float) -> int:
        for callback, record in self.pending:
            offset = int(record["headers"]["logpipe.source.offset"])
            err = KafkaError(KafkaError._MSG_TIMED_OUT) if offset in self.fail else None
            callback(err, None)
            if err is None:
                self.produced.append(record)
        self.pending.clear()
        return 0


def letter(offset: int, value: bytes | None = b"not json") -> DeadLetter:
    return DeadLetter(TOPIC, 2, offset, b"k-%d" % offset, value, "not_json", "bad " * 500)


def test_dlq_copy_keeps_key_value_and_source_headers() -> None:
    from logpipe.dlq import DeadLetterQueue

    producer = FakeProducer()
    ticks: list[int] = []
    dlq = DeadLetterQueue(KafkaConfig(dlq_topic="dead"), producer=producer,
                          tick=lambda: ticks.append(1))
    assert dlq.send([letter(41)]) == [True]
    (record,) = producer.produced
    assert record["topic"] == "dead"
    assert record["key"] == b"k-41"
    assert record["value"] == b"not json"
    headers = record["headers"]
    assert headers["logpipe.reason"] == b"not_json"
    assert headers["logpipe.source.topic"] == TOPIC.encode()
    assert headers["logpipe.source.partition"] == b"2"
    assert headers["logpipe.source.offset"] == b"41"
    assert len(headers["logpipe.error"]) <= 1000
    assert ticks


def test_dlq_failed_delivery_is_not_acknowledged() -> None:
    from logpipe.dlq import DeadLetterQueue

    dlq = DeadLetterQueue(KafkaConfig(), producer=FakeProducer(fail={2}))
    assert dlq.send([letter(1), letter(2), letter(3)]) == [True, False, True]


def test_dlq_full_local_queue_is_retried_once() -> None:
    from logpipe.dlq import DeadLetterQueue

    producer = FakeProducer(full_once=True)
    dlq = DeadLetterQueue(KafkaConfig(), producer=producer)
    assert dlq.send([letter(7)]) == [True]
    assert len(producer.produced) == 1


def test_oversized_dlq_copy_is_truncated_with_a_note() -> None:
    from logpipe.dlq import DeadLetterQueue, fit_value

    assert fit_value(b"abc", limit=3) == (b"abc", [])
    assert fit_value(None, limit=3) == (None, [])
    assert fit_value(b"abcdef", limit=4) == (b"abcd", [("logpipe.truncated_from", b"6")])
    producer = FakeProducer()
    dlq = DeadLetterQueue(KafkaConfig(), producer=producer)
    assert dlq.send([letter(9, value=b"x" * 2_000_000)]) == [True]
    (record,) = producer.produced
    assert len(record["value"]) == 900_000
    assert record["headers"]["logpipe.truncated_from"] == b"2000000"
    assert record["headers"]["logpipe.source.offset"] == b"9"


def test_bad_librdkafka_property_is_a_configuration_error() -> None:
    cfg = Config(kafka=KafkaConfig(client_overrides={"no.such.property": "1"}))
    assert SinkConsumer(cfg).run() == 2


class HangingES(FakeES):
    """Every bulk request blocks until released (an Elasticsearch that stopped answering)."""

    def __init__(self, world: World) -> None:
        super().__init__(world)
        self.release = threading.Event()

    def bulk(self, body: bytes, filter_path: str) -> FakeResponse:
        self.release.wait(10)
        return super().bulk(body, filter_path)


def test_shutdown_deadline_abandons_a_hanging_bulk_request() -> None:
    world, kafka = setup(per_partition=5, partitions=1)
    es = HangingES(world)
    consumer = sink(make_config(max_batches=0, shutdown_timeout_s=0.2), kafka, es,
                    FakeDLQ(world))
    thread = threading.Thread(target=consumer.run)
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while kafka.next[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        started = time.monotonic()
        consumer.stop()
        thread.join(5)
        assert not thread.is_alive()
        assert time.monotonic() - started < 2.0
        assert consumer.left_for_redelivery == 5
        assert all(c.get(0, 0) == 0 for c in world.commits)
    finally:
        es.release.set()


def test_missing_privilege_stops_without_committing_past_unindexed() -> None:
    world, kafka = setup()
    # The writer role does not cover id-12's index: Elasticsearch answers 403 for that item.
    es = FakeES(world, verdict=lambda i, _n: 403 if i == "id-12" else None)
    consumer = sink(make_config(), kafka, es, FakeDLQ(world))
    assert consumer.run() == 4
    # No retries of a refusal, and the fake asserts every commit passes only handled offsets.
    assert es.attempts["id-12"] == 1
    assert kafka.committed_position(0) <= 12
    assert "id-12" not in world.indexed
    assert consumer.dead_lettered == 0, "a refusal is not a reason to dead-letter"


def test_refusal_from_the_error_callback_stops_the_loop(capsys: pytest.CaptureFixture[str],
                                                        ) -> None:
    from logpipe import log

    log.setup("INFO")
    world, kafka = setup(per_partition=200)
    consumer = sink(make_config(), kafka, FakeES(world), FakeDLQ(world))

    def refuse(_k: FakeKafka) -> None:
        consumer._on_error(KafkaError(
            KafkaError._AUTHENTICATION,
            "sasl_ssl://10.0.0.5:9093/bootstrap: SASL authentication error: Authentication "
            "failed during authentication due to invalid credentials"))
    kafka.on_consume = refuse
    assert consumer.run() == 4
    err = capsys.readouterr().err
    fatal = [line for line in err.splitlines() if "event=fatal" in line]
    assert len(fatal) == 1
    assert "reason=kafka_auth_failed broker=10.0.0.5:9093 detail=" in fatal[0]
    # Stopped at the first batch: no busy loop through the remaining 390 messages.
    assert consumer.batches <= 1


def test_commits_carry_their_time_and_idle_partitions_are_committed_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import logpipe.consumer as consumer_module
    from logpipe.offsets import committed_at

    monkeypatch.setattr(consumer_module, "COMMIT_REFRESH_S", 0.0)
    world, kafka = setup(per_partition=5)
    before = time.time()
    s = sink(make_config(max_batches=0), kafka, FakeES(world), FakeDLQ(world))
    thread = threading.Thread(target=s.run)
    thread.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sum(1 for c in world.commits if c.get(0) == 5) < 3:
        time.sleep(0.01)
    s.stop()
    thread.join(10)
    # The caught-up position is committed again (fresh time), never moved.
    assert sum(1 for c in world.commits if c.get(0) == 5) >= 3
    assert all(c.get(0, 5) <= 5 for c in world.commits)
    times = [committed_at(m) for m in world.commit_metadata]
    assert times and all(t is not None and before - 1 <= t <= time.time() + 1 for t in times)


def test_stalled_after_no_progress_with_lag(monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    import logpipe.consumer as consumer_module

    monkeypatch.setattr(consumer_module, "STATUS_INTERVAL_S", 0.05)
    statuses: list[str] = []
    monkeypatch.setattr(consumer_module.sdnotify, "notify",
                        lambda state: statuses.append(state) or True)
    world, kafka = setup(per_partition=5)
    blocked = threading.Event()
    blocked.set()
    es = FakeES(world, verdict=lambda _i, _n: 429 if blocked.is_set() else None)
    s = sink(make_config(max_batches=0, stall_after_s=0.3), kafka, es, FakeDLQ(world))
    thread = threading.Thread(target=s.run)
    thread.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(x.startswith("STATUS=STALLED") for x in statuses):
        time.sleep(0.01)
    assert s.stalled_s >= 0.3
    blocked.clear()
    while time.monotonic() < deadline and s.indexed < 10:
        time.sleep(0.01)
    time.sleep(0.3)
    s.stop()
    thread.join(10)
    stalled = [x for x in statuses if x.startswith("STATUS=STALLED")]
    assert stalled and "es_rejected_execution_exception" in stalled[0], statuses[-3:]
    assert not statuses[-1].startswith("STATUS=STALLED") or statuses[-1] == "STOPPING=1"
    events = [r.getMessage() for r in caplog.records]
    assert events.count("stalled") == 1 and "stall_cleared" in events


def test_a_document_that_keeps_failing_holds_only_its_own_partition() -> None:
    world, kafka = setup(per_partition=60, partitions=2)
    # id-3 (partition 0, offset 3) is refused with 429 until it has been tried 8 times.
    es = FakeES(world, verdict=lambda i, n: 429 if i == "id-3" and n <= 8 else None)
    cfg = make_config(max_batches=0, retry_initial_backoff_s=0.05, retry_max_backoff_s=0.05)
    consumer = sink(cfg, kafka, es, FakeDLQ(world))
    thread = threading.Thread(target=consumer.run)
    thread.start()
    deadline = time.monotonic() + 10
    while kafka.committed_position(1) < 60 and time.monotonic() < deadline:
        time.sleep(0.005)
    # Partition 1 went all the way while partition 0's commit waited at the stuck document.
    assert kafka.committed_position(1) == 60
    assert es.attempts["id-3"] <= 8
    assert kafka.committed_position(0) <= 3
    while kafka.committed_position(0) < 60 and time.monotonic() < deadline:
        time.sleep(0.005)
    consumer.stop()
    thread.join(5)
    assert kafka.committed_position(0) == 60
    assert consumer.indexed == 120 and es.attempts["id-3"] == 9


class SlowES(FakeES):
    """Holds every bulk request until released; records how many ran at once."""

    def __init__(self, world: World) -> None:
        super().__init__(world)
        self.release = threading.Event()
        self.running = 0
        self.most_at_once = 0
        self.count_lock = threading.Lock()

    def bulk(self, body: bytes, filter_path: str) -> FakeResponse:
        with self.count_lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            self.release.wait(5)
            return super().bulk(body, filter_path)
        finally:
            with self.count_lock:
                self.running -= 1


def test_the_next_batch_is_built_while_one_is_indexed_and_commits_are_asynchronous() -> None:
    world, kafka = setup(per_partition=40, partitions=1)
    es = SlowES(world)
    consumer = sink(make_config(max_batches=0), kafka, es, FakeDLQ(world))
    thread = threading.Thread(target=consumer.run)
    thread.start()
    deadline = time.monotonic() + 5
    # The first request hangs; the consumer has fetched the second batch meanwhile and sent it
    # too, and no more (pipeline_depth 2: both batches in hand in flight, bulk_concurrency 1).
    while kafka.next[0] < 20 and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.1)
    assert kafka.next[0] == 20 and es.requests == 0 and not world.commits
    es.release.set()
    while kafka.committed_position(0) < 40 and time.monotonic() < deadline:
        time.sleep(0.005)
    consumer.stop()
    thread.join(5)
    assert consumer.indexed == 40 and es.most_at_once == 2
    # Batches were committed without waiting for the broker; shutdown committed synchronously.
    assert kafka.async_commits >= 1
    assert kafka.committed_position(0) == 40


def test_the_client_keeps_a_connection_for_every_request_in_flight() -> None:
    # 8 parts per batch x 2 batches in hand = 16 requests at once; the transport's default of 10
    # connections per node would open and discard the rest on every batch.
    es = make_es_client(make_config(bulk_concurrency=8, pipeline_depth=2))
    try:
        assert es.transport.node_pool.all()[0].config.connections_per_node == 16
    finally:
        es.close()


def test_a_batch_closes_at_max_batch_bytes() -> None:
    world, kafka = setup(per_partition=30, partitions=1)
    size = len(kafka.logs[0][0][1])
    # Messages are handed out one per consume() call; three messages' worth closes a batch
    # long before batch_size or the poll timeout would.
    es = FakeES(world)
    consumer = sink(make_config(batch_size=30, max_batch_bytes=3 * size, poll_timeout_s=5.0),
                    kafka, es, FakeDLQ(world))
    kafka_consume = kafka.consume

    def one_at_a_time(num_messages: int, timeout: float) -> list[FakeMessage]:
        return kafka_consume(1, timeout)

    kafka.consume = one_at_a_time  # type: ignore[method-assign]
    assert consumer.run() == 0
    assert consumer.indexed == 30
    assert es.requests == 10
