"""`logpipe consume`: Kafka -> Elasticsearch sink, effectively exactly once in Elasticsearch.

At-least-once from Kafka (manual commits of handled offsets only), idempotent in Elasticsearch
(op type ``create``, ``_id`` = message key, index from the event timestamp). A pipeline: while
one batch is indexed the next is fetched, built and queued (``sender.BulkSender``); answers are
handled oldest first -> dead-letter what Elasticsearch rejects -> hold what can be retried (only
its partitions paused, ``retries.RetryQueue``) -> commit what is handled, asynchronously. See
docs/DESIGN.md.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from elastic_transport import OrjsonSerializer
from elasticsearch import ApiError, Elasticsearch

from logpipe import log, refusal, sdnotify
from logpipe.bulk import Doc, Rejected, backoff_s, make_doc
from logpipe.bulk import now_iso as _now_iso
from logpipe.config import Config, ConfigError
from logpipe.dlq import DeadLetter, DeadLetterQueue
from logpipe.es import make_client
from logpipe.fatal import FatalError, fatal_error, fatal_in
from logpipe.kafka import RdKafkaLogger, client_config
from logpipe.metrics import ConsumerMetrics
from logpipe.offsets import OffsetTracker, PartitionKey, commit_metadata
from logpipe.ownership import Ownership
from logpipe.refusal import Refusal
from logpipe.retries import RetryQueue
from logpipe.sender import BulkSender, PendingBulk

STATUS_INTERVAL_S = 10.0
# An idle partition's commit is made again (same offset, fresh time) this often, so `logpipe
# check` sees a recent commit on every partition a live consumer keeps up with.
COMMIT_REFRESH_S = 60.0
# While retrying, poll this often so rebalance callbacks run and the group keeps us.
PAUSED_POLL_S = 0.2
READY_MAX_BACKOFF_S = 10.0
# How long one readiness check waits for Kafka metadata.
READY_METADATA_TIMEOUT_S = 5.0
# Slice of the poll timeout spent in one consume() call while collecting a batch.
FETCH_SLICE_S = 0.1
# How often the main thread wakes up (watchdog, shutdown deadline) while a bulk request runs.
WAIT_SLICE_S = 1.0
# A run-once invocation (timer) gives up if Kafka/Elasticsearch do not answer within this.
RUN_ONCE_READY_TIMEOUT_S = 60.0


@dataclass(slots=True)
class _InHand:
    """One fetched message while its batch is being processed."""

    key: PartitionKey
    offset: int
    generation: int
    msg_key: bytes | None
    value: bytes | None
    doc: Doc | None = None
    rejected: Rejected | None = None


@dataclass(slots=True)
class _Batch:
    """Messages sent together: fresh ones, or the held messages of partitions due for a retry."""

    messages: list[_InHand]
    retry: bool
    started: float
    to_index: list[_InHand]
    pending: PendingBulk | None

    def done(self) -> bool:
        return self.pending is None or self.pending.done()


class SinkConsumer:
    """The consume loop. ``run()`` blocks until stopped (or run-once is done); ``stop()`` may be
    called from any thread or a signal handler.

    Counters (cumulative): ``indexed`` (201), ``already_present`` (409), ``dead_lettered``
    (acknowledged by the dead-letter topic), ``retried`` (item retries), ``batches``,
    ``left_for_redelivery`` (unhandled at shutdown).
    """

    def __init__(self, cfg: Config, *, consumer: Any = None, es: Elasticsearch | None = None,
                 dlq: DeadLetterQueue | None = None,
                 rng: Callable[[], float] = random.random) -> None:
        self.cfg = cfg
        self.indexed = 0
        self.already_present = 0
        self.dead_lettered = 0
        self.retried = 0
        self.batches = 0
        self.left_for_redelivery = 0
        self.ready = threading.Event()
        self.metrics = ConsumerMetrics()
        self._error_throttle = log.Throttle()
        self._stop = threading.Event()
        self._stop_at: float | None = None
        self._consumer = consumer
        self._es = es
        self._dlq = dlq
        self._rng = rng
        self._tracker = OffsetTracker()
        self._partitions = Ownership()
        # Partitions held for a retry, with their messages (see retries.py).
        self._retries: RetryQueue[_InHand] = RetryQueue()
        # Batches in hand, oldest first: at most consumer.pipeline_depth.
        self._in_flight: deque[_Batch] = deque()
        # Fresh (not retry) batches started, for run-once's consumer.max_batches.
        self._fresh_batches = 0
        self._watchdog = sdnotify.Watchdog()
        self._sender: BulkSender | None = None
        # The first fatal client state (fenced static member, dead DLQ producer): stops the loop.
        self._fatal: FatalError | None = None
        # The first refusal (credentials, certificate, ACL/privilege): stops the loop.
        self._refusal: Refusal | None = None
        self._last_status = time.monotonic()
        self._status_done = 0
        # Progress: the last time a message was handled or nothing was waiting (lag 0).
        self._progress_at = time.monotonic()
        self._stalled = False
        # Why the batch in hand is being retried ("" when it is not).
        self._retry_reason = ""

    # -- control ---------------------------------------------------------------------------

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop_at = time.monotonic()
            self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def _halted(self) -> bool:
        """Refused or in a fatal state: nothing more can be handled by this process."""
        return self._refusal is not None or self._fatal is not None

    def _past_shutdown_deadline(self) -> bool:
        return (self._stop_at is not None
                and time.monotonic() >= self._stop_at + self.cfg.consumer.shutdown_timeout_s)

    # -- lifecycle ---------------------------------------------------------------------------

    def run(self) -> int:
        """Consume until stopped; the process exit code."""
        kcfg, ccfg = self.cfg.kafka, self.cfg.consumer
        try:
            self._open()
        except (ConfigError, KafkaException, ValueError) as exc:
            # A missing secret file or a property librdkafka rejects (client_overrides).
            log.error("consumer_failed", error=str(exc))
            self._close()
            return 2
        mcfg = self.cfg.metrics
        if mcfg.port:
            try:
                self.metrics.serve(mcfg.address, mcfg.port)
            except OSError as exc:
                # Taken by another instance or process: a restart with backoff may find it free.
                log.error("consumer_failed", error=f"metrics endpoint {mcfg.address}:"
                                                   f"{mcfg.port}: {exc}")
                self._close()
                return 1
            log.event("metrics_serving", address=mcfg.address, port=mcfg.port)
        log.event("consumer_started", topic=kcfg.topic, group=kcfg.group_id,
                  dlq_topic=kcfg.dlq_topic, batch_size=ccfg.batch_size,
                  bulk_concurrency=ccfg.bulk_concurrency,
                  mode="run_once" if ccfg.max_batches else "service")
        code = 0
        try:
            if not self._wait_ready():
                code = 0 if self.stopping and self._fatal is None else 1
                if self._refusal is not None:
                    code = refusal.EXIT_REFUSED
                return code
            self._consumer.subscribe([kcfg.topic], on_assign=self._on_assign,
                                     on_revoke=self._on_revoke, on_lost=self._on_lost)
            sdnotify.notify("READY=1")
            self.ready.set()
            self.metrics.ready.set(1)
            log.event("ready", topic=kcfg.topic)
            self._loop()
            if self._refusal is not None:
                code = refusal.EXIT_REFUSED
            elif self._fatal is not None:
                code = 1
        except KafkaException as exc:
            # e.g. subscribe() once librdkafka has recorded a fatal error on the client.
            if (found := self._refused_by(exc)) is not None:
                self._refuse(found)
                code = refusal.EXIT_REFUSED
            elif (fatal := fatal_in(exc, "consumer")) is not None:
                self._fail(fatal)
                code = 1
            else:
                log.error("consumer_failed", error=str(exc))
                code = 1
        except Exception as exc:
            log.error("consumer_failed", error=f"{type(exc).__name__}: {exc}", exc_info=True)
            code = 1
        finally:
            self._close()
            # Last, after the shutdown summary: the line an operator reads first. A refusal
            # (exit 4) is a configuration problem systemd leaves failed; a fatal client state
            # (exit 1) is cured by a new client, so systemd restarts the unit.
            if self._refusal is not None:
                self._refusal.log()
            elif self._fatal is not None:
                self._fatal.log()
        return code

    def _refused_by(self, exc: BaseException) -> Refusal | None:
        return refusal.find(exc, self.cfg.kafka.bootstrap_servers, self.cfg.elasticsearch.hosts)

    def _refuse(self, found: Refusal) -> None:
        if self._refusal is None:
            self._refusal = found

    def _fail(self, found: FatalError) -> None:
        if found.replaces(self._fatal):
            self._fatal = found

    def _open(self) -> None:
        kcfg, ccfg = self.cfg.kafka, self.cfg.consumer
        if self._consumer is None:
            self._consumer = Consumer(consumer_config(self.cfg, error_cb=self._on_error,
                                                      on_commit=self._on_commit),
                                      logger=RdKafkaLogger())
        if self._es is None:
            self._es = make_es_client(self.cfg)
        if self._dlq is None:
            self._dlq = DeadLetterQueue(kcfg, tick=self._watchdog.ping)
        self._sender = BulkSender(self._es, hosts=self.cfg.elasticsearch.hosts,
                                  concurrency=ccfg.bulk_concurrency,
                                  in_flight=ccfg.requests_in_flight,
                                  max_bulk_bytes=ccfg.max_bulk_bytes, metrics=self.metrics)

    def _close(self) -> None:
        sdnotify.notify("STOPPING=1")
        left = self._tracker.unhandled_count()
        self.left_for_redelivery += left
        if self._consumer is not None:
            try:
                # Only handled positions: a refusal never moves a commit past unindexed data.
                self._commit()
            except Exception as exc:
                log.warning("commit_failed", error=str(exc))
            try:
                # Leaves the group; with cooperative-sticky this revokes (and commits) first.
                self._consumer.close()
            except Exception as exc:
                log.warning("consumer_close_failed", error=str(exc))
        undelivered = self._dlq.close() if self._dlq is not None else 0
        if self._sender is not None:
            self._sender.close()
        log.event("shutdown", left_for_redelivery=self.left_for_redelivery,
                  indexed=self.indexed, already_present=self.already_present,
                  dlq=self.dead_lettered, batches=self.batches,
                  dlq_undelivered=undelivered)

    def _wait_ready(self) -> bool:
        """Wait (with backoff) until the topic's metadata and Elasticsearch both answer."""
        topic = self.cfg.kafka.topic
        delay = 0.5
        give_up = (time.monotonic() + RUN_ONCE_READY_TIMEOUT_S
                   if self.cfg.consumer.max_batches else None)
        while not self.stopping:
            self._watchdog.ping()
            problems = []
            try:
                meta = self._metadata(topic, READY_METADATA_TIMEOUT_S)
                info = meta.topics.get(topic)
                if info is not None and info.error is not None:
                    found = refusal.kafka(info.error, self.cfg.kafka.bootstrap_servers)
                    if found is not None:
                        self._refuse(found)
                if info is None or info.error is not None or not info.partitions:
                    problems.append(f"kafka topic {topic}: "
                                    f"{info.error if info is not None else 'missing'}")
            except KafkaException as exc:
                problems.append(f"kafka: {exc}")
            if self._halted:
                return False
            try:
                assert self._es is not None
                # Not info()/ping(): `GET /` lives in a module minimal distributions leave out.
                self._es.cluster.health()
            except ApiError as exc:
                # 403: the cluster answers but our (index-only) role may not read its health;
                # the first bulk request says whether it may write. 401 is a refusal.
                if exc.meta.status == 401:
                    self._refuse(self._refused_by(exc) or refusal.Refusal(
                        refusal.ES_AUTH, "host", ",".join(self.cfg.elasticsearch.hosts),
                        exc.message))
                elif exc.meta.status != 403:
                    problems.append(f"elasticsearch: HTTP {exc.meta.status}: {exc.message}")
            except Exception as exc:
                found = self._refused_by(exc)
                if found is not None:
                    self._refuse(found)
                problems.append(f"elasticsearch: {type(exc).__name__}: {exc}")
            if self._refusal is not None:
                return False
            if not problems:
                self._check_dlq_topic()
                return self._refusal is None
            if give_up is not None and time.monotonic() >= give_up:
                log.error("not_ready", reason="; ".join(problems))
                return False
            log.warning("waiting", reason="; ".join(problems), retry_in_s=delay)
            end = time.monotonic() + delay
            while not self.stopping and time.monotonic() < end:
                self._watchdog.ping()
                time.sleep(min(0.2, max(0.0, end - time.monotonic())))
            delay = min(delay * 2, READY_MAX_BACKOFF_S)
        return False

    def _metadata(self, topic: str, timeout_s: float) -> Any:
        """``list_topics(topic)`` in short slices with the error callback served between them.

        A rejected password or certificate reaches only the error callback, which runs from
        poll(): a refusal then ends the wait within a slice instead of at the timeout. Not
        subscribed yet, poll() returns only errors, such as the group coordinator lookup's
        GROUP_AUTHORIZATION_FAILED (reported once): those are never dropped.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                meta = self._consumer.list_topics(topic, timeout=max(0.1, min(1.0, left)))
            except KafkaException:
                self._serve_errors()
                if left <= 1.0 or self._refusal is not None:
                    raise
                continue
            self._serve_errors()
            return meta

    def _serve_errors(self) -> None:
        event = self._consumer.poll(0)
        if event is not None and event.error() is not None:
            self._accept([event])

    def _check_dlq_topic(self) -> None:
        """Warn early when the dead-letter topic is missing (dead-lettering would stall)."""
        dlq_topic = self.cfg.kafka.dlq_topic
        try:
            info = self._consumer.list_topics(dlq_topic, timeout=5.0).topics.get(dlq_topic)
        except KafkaException as exc:
            log.warning("dlq_topic_unknown", topic=dlq_topic, error=str(exc))
            return
        if info is not None and info.error is not None:
            found = refusal.kafka(info.error, self.cfg.kafka.bootstrap_servers)
            if found is not None:
                # Without WRITE on the DLQ topic no rejected document could ever be handled.
                self._refuse(found)
                return
        if info is None or info.error is not None:
            log.warning("dlq_topic_missing", topic=dlq_topic,
                        error=str(info.error) if info is not None else "missing")

    # -- main loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        """Keep up to ``consumer.pipeline_depth`` batches in hand: while the oldest is indexed,
        the next is fetched, built and queued behind it. Answers are handled oldest first."""
        ccfg = self.cfg.consumer
        run_once = ccfg.max_batches > 0
        unassigned_since = time.monotonic()
        unassigned_limit = ccfg.session_timeout_ms / 1000 + 10.0
        in_flight = self._in_flight
        while not self._halted:
            self._tick()
            self._refresh_commits()
            while in_flight and in_flight[0].done() and not self._halted:
                self._finish(in_flight.popleft())
            if self._halted or (self.stopping and self._past_shutdown_deadline()):
                break  # what is not handled stays uncommitted for the next owner
            fresh = not self.stopping and not (
                run_once and (self._fresh_batches >= ccfg.max_batches or self._read_to_end()))
            if len(in_flight) < ccfg.pipeline_depth:
                batch = self._build_ahead(fresh) if in_flight else self._next_batch(fresh)
                if batch is not None:
                    in_flight.append(batch)
                    continue
            if in_flight:
                self._await_answer(in_flight[0])
                continue
            if self._retries or self._halted:
                continue  # _next_batch waited for the next retry to fall due
            if not fresh:
                break  # stopping, or run-once done: nothing in hand, nothing to retry
            # Idle: retry a commit that failed earlier (e.g. during a rebalance), if any.
            self._commit()
            if run_once:
                if self._partitions:
                    unassigned_since = time.monotonic()
                elif time.monotonic() - unassigned_since > unassigned_limit:
                    log.warning("no_assignment", waited_s=unassigned_limit)
                    break

    def _await_answer(self, batch: _Batch) -> None:
        """Wait a slice for the oldest batch's requests (the loop feeds the watchdog and checks
        the shutdown deadline between slices)."""
        if batch.pending is not None:
            batch.pending.wait(WAIT_SLICE_S)

    def _read_to_end(self) -> bool:
        """Run-once: every owned partition has been read to its end."""
        return self._partitions.read_to_end()

    def _build_ahead(self, fresh: bool) -> _Batch | None:
        """The next batch while the one before it is being indexed (its own name so that a stack
        dump, such as the chaos suite's, tells this phase apart)."""
        return self._next_batch(fresh)

    def _next_batch(self, fresh: bool) -> _Batch | None:
        """Held partitions whose retry is due, else fresh messages (if ``fresh``); started."""
        now = time.monotonic()
        due = self._retries.take_due(now)
        if due:
            live = [m for m in due if self._owned(m)]
            self._retries.settle(m for m in due if not self._owned(m))
            if live:
                return self._start(live, retry=True)
        self._sync_pauses(everything=not fresh)
        timeout = self.cfg.consumer.poll_timeout_s
        next_due = self._retries.next_due()
        if next_due is not None:
            timeout = min(timeout, max(0.0, next_due - now))
        if not fresh:
            # Serve callbacks (rebalances, commit results) while nothing new is taken: every
            # partition is paused, and anything still delivered stays unhandled (uncommitted).
            self._accept(self._consumer.consume(self.cfg.consumer.batch_size,
                                                min(timeout, PAUSED_POLL_S)))
            return None
        messages = self._fetch(timeout)
        if not messages or self._halted:
            return None
        self._fresh_batches += 1
        return self._start(messages, retry=False)

    def _fetch(self, timeout_s: float) -> list[_InHand]:
        """Up to a batch of messages within ``timeout_s``.

        consume() returns only when it has a full batch or its timeout expired; collect in short
        slices so a run-once invocation notices the partitions' ends, and a batch being built
        ahead notices that the one before it was answered, without sitting out the whole
        timeout for a partial batch.
        """
        size, max_bytes = self.cfg.consumer.batch_size, self.cfg.consumer.max_batch_bytes
        run_once = self.cfg.consumer.max_batches > 0
        deadline = time.monotonic() + timeout_s
        batch: list[_InHand] = []
        held_bytes = 0
        while len(batch) < size:
            left = deadline - time.monotonic()
            got = self._accept(self._consumer.consume(
                size - len(batch), max(0.0, min(FETCH_SLICE_S, left))))
            batch.extend(got)
            # Bounds what is in hand (pipeline_depth batches) when messages are large; one
            # consume() may overshoot, by at most what librdkafka has queued.
            held_bytes += sum(len(m.value or b"") for m in got)
            if left <= FETCH_SLICE_S or held_bytes >= max_bytes or self._halted or self.stopping \
                    or (run_once and self._read_to_end()) \
                    or (self._in_flight and self._in_flight[0].done()):
                break
            self._watchdog.ping()
        return batch

    def _accept(self, messages: Sequence[Message]) -> list[_InHand]:
        out: list[_InHand] = []
        now = time.monotonic()
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    eof_topic, eof_partition = msg.topic(), msg.partition()
                    if eof_topic is not None and eof_partition is not None:
                        self._partitions.reached_end((eof_topic, eof_partition))
                elif (found := refusal.kafka(err, self.cfg.kafka.bootstrap_servers)) is not None:
                    self._refuse(found)
                elif (fatal := fatal_error(err, "consumer")) is not None:
                    # How a consumer hears of its fatal state: code _FATAL, fatal() false.
                    self._fail(fatal)
                else:
                    self._kafka_error(err)
                continue
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            # librdkafka sets all three on every message that carries no error.
            assert topic is not None and partition is not None and offset is not None
            key = (topic, partition)
            self._partitions.reached_end(key, False)
            self._tracker.fetched(key, offset)
            m = _InHand(key, offset, self._partitions.generation(key), msg.key(), msg.value())
            # Fetched before its partition's pause took effect: it waits for that partition's
            # retry, in order, instead of overtaking the message being retried.
            if not self._retries.hold(m, now):
                out.append(m)
        return out

    def _owned(self, m: _InHand) -> bool:
        return self._partitions.owns(m.key, m.generation)

    def _start(self, messages: list[_InHand], *, retry: bool) -> _Batch:
        """Build the documents not built yet and queue their bulk request."""
        ccfg, es_prefix = self.cfg.consumer, self.cfg.elasticsearch.index
        indexed_at = _now_iso()
        for m in messages:
            if m.doc is None and m.rejected is None:
                result = make_doc(m.value, m.msg_key, index_prefix=es_prefix,
                                  indexed_at=indexed_at, max_bytes=ccfg.max_message_bytes)
                if isinstance(result, Doc):
                    m.doc = result
                else:
                    m.rejected = result
        to_index = [m for m in messages if m.rejected is None]
        assert self._sender is not None
        pending = self._sender.submit([m.doc for m in to_index if m.doc is not None]) \
            if to_index else None
        return _Batch(messages, retry, time.monotonic(), to_index, pending)

    def _finish(self, batch: _Batch) -> None:
        """Handle a batch's answer: count what is indexed, dead-letter what was rejected, hold
        what must be retried, then commit (asynchronously) what is handled."""
        if batch.retry:
            self._retries.settle(batch.messages)
        created = present = dead = 0
        retry: list[_InHand] = []
        reason = ""
        if batch.pending is not None:
            assert self._sender is not None
            outcome = self._sender.outcome(batch.pending)
            to_index = batch.to_index
            for pos in outcome.created:
                self._tracker.handled(to_index[pos].key, to_index[pos].offset)
            for pos in outcome.already_present:
                self._tracker.handled(to_index[pos].key, to_index[pos].offset)
            for pos, rejected in outcome.rejected.items():
                to_index[pos].rejected = rejected
            retry.extend(to_index[pos] for pos in outcome.retry)
            if outcome.refusal is not None:
                self._refuse(outcome.refusal.at(",".join(self.cfg.elasticsearch.hosts)))
            created, present = len(outcome.created), len(outcome.already_present)
            self.metrics.handled("indexed", created)
            self.metrics.handled("already_present", present)
            self.indexed += created
            self.already_present += present
            reason = outcome.retry_reason
        to_dlq = [m for m in batch.messages if m.rejected is not None and self._owned(m)]
        if to_dlq and self._refusal is None:
            acked = self._dead_letter(to_dlq)
            for m, ok in zip(to_dlq, acked, strict=True):
                if ok:
                    self._tracker.handled(m.key, m.offset)
                    dead += 1
                    self.dead_lettered += 1
                    self.metrics.dead_letter(m.rejected.reason if m.rejected else "unknown")
                else:
                    retry.append(m)
                    reason = reason or "dlq_delivery"
            if self._dlq is not None and self._dlq.refusal is not None:
                self._refuse(self._dlq.refusal)
            if self._dlq is not None and self._dlq.fatal is not None:
                self._fail(self._dlq.fatal)
        else:
            retry.extend(to_dlq)
        retry = [m for m in retry if self._owned(m)]
        if retry and not self._halted:
            self._hold_for_retry(retry, reason or "unknown")
        self._release_retries()
        self.batches += 1
        # Asynchronous: the broker round trip overlaps the next bulk request. Only handled
        # positions are ever sent; a commit that fails is sent again by the next one, and
        # revokes, idle time and shutdown commit synchronously.
        committed = self._commit(asynchronous=True)
        seconds = time.monotonic() - batch.started
        self.metrics.batch_seconds.observe(seconds)
        log.event("batch_committed", docs=len(batch.messages), created=created,
                  already_present=present, dlq=dead, retried=len(retry),
                  seconds=round(seconds, 3), partitions=len(committed))

    def _hold_for_retry(self, retry: list[_InHand], reason: str) -> None:
        """Hold the partitions of ``retry`` (paused) until their backoff has passed."""
        ccfg = self.cfg.consumer
        keys = {m.key for m in retry}
        attempt = self._retries.attempt(keys)
        wait = backoff_s(attempt, ccfg.retry_initial_backoff_s, ccfg.retry_max_backoff_s,
                         self._rng())
        now = time.monotonic()
        if self._stop_at is not None:
            wait = min(wait, max(0.0, self._stop_at + ccfg.shutdown_timeout_s - now))
        self._retries.add(retry, now + wait)
        self.retried += len(retry)
        self._retry_reason = reason
        self.metrics.retry(reason, len(retry))
        log.event("bulk_retry", items=len(retry), attempt=attempt + 1,
                  backoff_s=round(wait, 3), reason=reason, partitions=_fmt(keys))
        self._sync_pauses(everything=False)

    def _release_retries(self) -> None:
        if self._retries.release():
            self._sync_pauses(everything=self.stopping)
        if not self._retries:
            self._retry_reason = ""

    # -- dead-letter topic -------------------------------------------------------------------

    def _dead_letter(self, messages: list[_InHand]) -> list[bool]:
        assert self._dlq is not None
        letters = []
        for m in messages:
            assert m.rejected is not None
            letters.append(DeadLetter(m.key[0], m.key[1], m.offset, m.msg_key, m.value,
                                      m.rejected.reason, m.rejected.error))
        acked = self._dlq.send(letters)
        for letter, ok in zip(letters, acked, strict=True):
            if ok:
                log.event("dlq_sent", reason=letter.reason, partition=letter.partition,
                          offset=letter.offset, error=letter.error[:200])
        return acked

    # -- pausing held partitions -----------------------------------------------------------

    def _sync_pauses(self, *, everything: bool) -> None:
        """Pause the partitions held for a retry (or ``everything`` owned, when no more fresh
        messages are wanted) and resume the rest. Paused partitions are still polled, so the
        group keeps them and rebalance callbacks run."""
        pause, resume = self._partitions.repause(
            set(self._partitions.owned) if everything else self._retries.partitions())
        if pause:
            self._consumer.pause([TopicPartition(t, p) for t, p in pause])
        if resume:
            self._consumer.resume([TopicPartition(t, p) for t, p in resume])

    # -- commits and rebalances --------------------------------------------------------------

    def _commit(self, keys: set[PartitionKey] | None = None, *, asynchronous: bool = False,
                ) -> dict[PartitionKey, int]:
        """Commit handled positions that advanced (only partitions we own): synchronously, or
        sent without waiting (``asynchronous``; the broker's answer reaches ``_on_commit``)."""
        selected = self._partitions.owned if keys is None else keys
        return self._send_commit(self._tracker.to_commit(selected, unsent=asynchronous),
                                 asynchronous=asynchronous)

    def _refresh_commits(self) -> None:
        """Commit idle partitions' positions again with a fresh time (see COMMIT_REFRESH_S):
        without it a partition that had nothing to do for an hour and then gets a message looks
        stalled to `logpipe check` until that message is committed."""
        now = time.monotonic()
        positions = {}
        for key in self._partitions.not_committed_for(COMMIT_REFRESH_S, now):
            position = self._tracker.caught_up(key)
            if position is not None:
                positions[key] = position
        if positions:
            self._send_commit(positions)
            # Attempted counts: a refresh that failed (a rebalance) waits for the next round
            # instead of being retried, and logged, on every loop.
            self._partitions.committed(positions, now)

    def _send_commit(self, positions: dict[PartitionKey, int], *, asynchronous: bool = False,
                     ) -> dict[PartitionKey, int]:
        if not positions or (self._fatal is not None and self._fatal.client == "consumer"):
            # A consumer in a fatal state can commit nothing any more (librdkafka refuses).
            return {}
        metadata = commit_metadata(time.time())
        offsets = [TopicPartition(t, p, pos, metadata=metadata)
                   for (t, p), pos in positions.items()]
        try:
            if asynchronous:
                self._consumer.commit(offsets=offsets, asynchronous=True)
                self._tracker.mark_sent(positions)
                self._partitions.committed(positions, time.monotonic())
                return positions
            result = self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            found = self._refused_by(exc)
            if found is not None:
                self._refuse(found)
            elif (fatal := fatal_in(exc, "consumer")) is not None:
                # No commit can ever succeed on this client (fenced, or dead): stop instead of
                # retrying; the fatal line says why.
                self._fail(fatal)
                return {}
            # Typically a rebalance in progress: the positions stay pending and are retried
            # with the next commit (or by the revoke callback).
            log.warning("commit_failed", error=str(exc), partitions=len(offsets))
            return {}
        done = self._committed(result or offsets)
        self._partitions.committed(done, time.monotonic())
        return done

    def _committed(self, partitions: list[TopicPartition]) -> dict[PartitionKey, int]:
        """Record what the broker confirmed; report what it refused (sent again next time)."""
        done, failed = {}, set()
        for tp in partitions:
            key = (tp.topic, tp.partition)
            if tp.error is None:
                done[key] = tp.offset
                continue
            failed.add(key)
            found = refusal.kafka(tp.error, self.cfg.kafka.bootstrap_servers)
            if found is not None:
                self._refuse(found)
            elif (fatal := fatal_error(tp.error, "consumer")) is not None:
                self._fail(fatal)
                continue
            log.warning("commit_failed", partition=tp.partition, error=str(tp.error))
        self._tracker.unsend(failed)
        self._tracker.mark_committed(done)
        if done:
            self.metrics.committed()
        return done

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """The broker's answer to a commit (served from consume()); for synchronous commits it
        repeats what commit() returned, which is harmless."""
        owned = [tp for tp in partitions if (tp.topic, tp.partition) in self._partitions]
        if err is None:
            self._committed([tp for tp in owned if tp.offset >= 0 or tp.error is not None])
            return
        if err.code() == KafkaError._NO_OFFSET:
            return  # nothing to commit
        self._tracker.unsend((tp.topic, tp.partition) for tp in owned)
        if (found := refusal.kafka(err, self.cfg.kafka.bootstrap_servers)) is not None:
            self._refuse(found)
        elif (fatal := fatal_error(err, "consumer")) is not None:
            self._fail(fatal)
        else:
            # Typically a rebalance in progress: the next commit sends the positions again.
            log.warning("commit_failed", error=str(err), partitions=len(owned))

    def _on_assign(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        # confluent-kafka performs the incremental assign itself after this callback returns
        # (cooperative protocol), since we do not call incremental_assign here.
        keys = {(tp.topic, tp.partition) for tp in partitions}
        if not keys:
            return  # an incremental rebalance that gave us nothing new
        self._tracker.forget(keys)
        self._partitions.assign(keys)
        log.event("assigned", partitions=_fmt(keys), owned=len(self._partitions))

    def _on_revoke(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        keys = {(tp.topic, tp.partition) for tp in partitions}
        try:
            committed = self._commit(keys & self._partitions.owned)
        except Exception as exc:
            log.warning("commit_failed", error=str(exc))
            committed = {}
        dropped = self._drop(keys)
        log.event("revoked", partitions=_fmt(keys), committed=len(committed),
                  dropped=dropped, owned=len(self._partitions))

    def _on_lost(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        keys = {(tp.topic, tp.partition) for tp in partitions}
        dropped = self._drop(keys)
        log.warning("lost", partitions=_fmt(keys), dropped=dropped, owned=len(self._partitions))

    def _drop(self, keys: set[PartitionKey]) -> int:
        """Forget partitions we no longer own; their unhandled messages go to the new owner."""
        dropped = sum(self._tracker.unhandled_count(k) for k in keys)
        self._tracker.forget(keys)
        self._partitions.drop(keys)
        self._retries.drop(keys)
        return dropped

    def _on_error(self, err: KafkaError) -> None:
        found = refusal.kafka(err, self.cfg.kafka.bootstrap_servers)
        if found is not None:
            self._refuse(found)
        elif (fatal := fatal_error(err, "consumer")) is not None:
            self._fail(fatal)
        else:
            self._kafka_error(err)

    def _kafka_error(self, err: KafkaError) -> None:
        """A transient client error (a broker down, a timeout): librdkafka retries it on its
        own and reports it on every attempt, so at most one line per error code per interval."""
        repeated = self._error_throttle.held(err.code())
        if repeated is not None:
            log.warning("kafka_error", error=str(err), repeated=repeated)

    # -- status ------------------------------------------------------------------------------

    def _tick(self) -> None:
        self._watchdog.ping()
        now = time.monotonic()
        elapsed = now - self._last_status
        if elapsed < STATUS_INTERVAL_S:
            return
        done = self.indexed + self.already_present + self.dead_lettered
        rate = (done - self._status_done) / elapsed
        lag_by_partition = self._lag()
        lag = sum(lag_by_partition.values())
        self.metrics.set_lag(lag_by_partition)
        self.metrics.assigned.set(len(self._partitions))
        if done != self._status_done or lag == 0:
            self._progress_at = now
        self._last_status, self._status_done = now, done
        status = (f"docs/s={rate:.0f} lag={lag} indexed={self.indexed} "
                  f"dlq={self.dead_lettered}")
        stalled_s = self.stalled_s
        if stalled_s:
            status = (f"STALLED: nothing handled for {stalled_s:.0f}s with lag={lag}, "
                      f"retrying ({self._retry_reason or 'no batch in hand'}); {status}")
            if not self._stalled:
                self._stalled = True
                log.warning("stalled", no_progress_s=round(stalled_s), lag=lag,
                            reason=self._retry_reason or "unknown",
                            owned=len(self._partitions))
        elif self._stalled:
            self._stalled = False
            log.event("stall_cleared", lag=lag, indexed=self.indexed)
        self.metrics.stalled.set(stalled_s)
        sdnotify.notify(f"STATUS={status}")
        log.event("throughput", docs_per_s=round(rate, 1), lag=lag, indexed=self.indexed,
                  already_present=self.already_present, dlq=self.dead_lettered,
                  owned=len(self._partitions))

    @property
    def stalled_s(self) -> float:
        """Seconds without progress while messages wait, once past ``consumer.stall_after_s``
        (0.0 when making progress, idle, or the report is off). Updated every STATUS_INTERVAL_S.

        Stalled is not hung: the watchdog keeps being fed, because the loop is alive and a
        restart would not fix what it waits for (an outage, a document retried on purpose); it
        would only drop the retry state and rebalance the group. See docs/DESIGN.md.
        """
        limit = self.cfg.consumer.stall_after_s
        waited = self._last_status - self._progress_at
        return waited if limit and waited >= limit else 0.0

    def _lag(self) -> dict[PartitionKey, int]:
        """Messages not yet handled per owned partition (cached high watermarks, no request);
        partitions not read yet are left out."""
        lag: dict[PartitionKey, int] = {}
        for topic, partition in self._partitions.owned:
            try:
                _low, high = self._consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), cached=True)
            except KafkaException:
                continue
            pos = self._tracker.position((topic, partition))
            if pos is None:
                continue
            if high is not None and high >= 0:
                lag[(topic, partition)] = max(0, high - pos)
        return lag


def _fmt(keys: set[PartitionKey]) -> str:
    return ",".join(f"{t}:{p}" for t, p in sorted(keys)) or "-"


def consumer_config(cfg: Config, *, error_cb: Callable[[KafkaError], None] | None = None,
                    on_commit: Callable[[KafkaError | None, list[TopicPartition]], None]
                    | None = None) -> dict[str, Any]:
    """librdkafka settings for the sink consumer.

    Tuning comes first so ``kafka.client_overrides`` can change it; the delivery-semantics keys
    come last so nothing can turn auto-commit back on.
    """
    kcfg, ccfg = cfg.kafka, cfg.consumer
    tuning: dict[str, Any] = {
        # Fewer, larger fetches under load, still at most 100 ms of added latency when idle.
        "fetch.min.bytes": 65536,
        "fetch.wait.max.ms": 100,
        # Bound the prefetch so RSS stays small whatever the backlog. Fetched record batches
        # stay in memory decompressed (zstd JSON inflates ~8x) while any of their messages is
        # queued, so the per-partition fetch size matters as much as the queue size: these
        # keep a 6-partition consumer at ~85 MiB RSS with 500-message batches (measured),
        # while smaller values starve consume() and cost throughput.
        "queued.max.messages.kbytes": 8192,
        "queued.min.messages": max(1000, 4 * ccfg.batch_size),
        "max.partition.fetch.bytes": 262144,
        "fetch.max.bytes": 2097152,
        # When a bound above is reached librdkafka postpones that partition's next fetch by
        # this much (default 1 s): with bounded queues that starved consume() and capped a
        # 6-partition consumer at a third of its rate (measured). Refill promptly instead.
        "fetch.queue.backoff.ms": 20,
    }
    semantics: dict[str, Any] = {
        "group.id": kcfg.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
        "session.timeout.ms": ccfg.session_timeout_ms,
        "max.poll.interval.ms": ccfg.max_poll_interval_ms,
        # Run-once mode stops when every owned partition has been read to its end.
        "enable.partition.eof": ccfg.max_batches > 0,
    }
    conf = {**tuning, **client_config(kcfg, "logpipe-consumer"), **semantics}
    if error_cb is not None:
        conf["error_cb"] = error_cb
    if on_commit is not None:
        conf["on_commit"] = on_commit
    return conf


def make_es_client(cfg: Config) -> Elasticsearch:
    """The Elasticsearch client, parsing responses with orjson (bulk answers are large), with a
    connection per request the consumer can have in flight: the transport keeps 10 per node, and
    a request beyond that would open a connection and throw it away afterwards."""
    return make_client(cfg.elasticsearch,
                       serializers={"application/json": OrjsonSerializer()},
                       connections_per_node=max(10, cfg.consumer.requests_in_flight))


def run(cfg: Config) -> int:
    """Entry point of ``logpipe consume``: the process exit code.

    SIGTERM/SIGINT stop fetching, finish the batch in hand (bounded by
    ``consumer.shutdown_timeout_s``), commit and leave the group; the exit code is then 0.
    """
    sink = SinkConsumer(cfg)
    previous: dict[signal.Signals, Any] = {}

    def handle(signum: int, _frame: FrameType | None) -> None:
        sink.stop()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handle)
    try:
        return sink.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
