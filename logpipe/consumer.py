"""`logpipe consume`: Kafka -> Elasticsearch sink, effectively exactly once in Elasticsearch.

At-least-once from Kafka (manual commits of handled offsets only), idempotent in Elasticsearch
(op type ``create``, ``_id`` = message key, index from the event timestamp). One batch at a time:
fetch -> bulk -> dead-letter what Elasticsearch rejects -> retry what can be retried (partitions
paused, still polling) -> commit. See docs/DESIGN.md.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from types import FrameType
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from elastic_transport import OrjsonSerializer
from elasticsearch import ApiError, Elasticsearch, TransportError

from logpipe import log, refusal, sdnotify
from logpipe.bulk import (
    BulkOutcome,
    Doc,
    Rejected,
    TooLarge,
    backoff_s,
    build_body,
    classify,
    make_doc,
    send_in_parts,
    split_docs,
)
from logpipe.bulk import now_iso as _now_iso
from logpipe.config import Config, ConfigError
from logpipe.dlq import DeadLetter, DeadLetterQueue
from logpipe.es import make_client
from logpipe.fatal import FatalError, fatal_error, fatal_in
from logpipe.kafka import RdKafkaLogger, client_config
from logpipe.metrics import ConsumerMetrics
from logpipe.offsets import OffsetTracker, PartitionKey, commit_metadata
from logpipe.refusal import Refusal

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
# Only the fields classification needs: keeps the response small and cheap to parse.
BULK_FILTER_PATH = "errors,items.*._id,items.*._index,items.*.status,items.*.error"


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
        self.metrics.bulk_cap.set(cfg.consumer.max_bulk_bytes)
        self._stop = threading.Event()
        self._stop_at: float | None = None
        self._consumer = consumer
        self._es = es
        self._dlq = dlq
        self._rng = rng
        self._tracker = OffsetTracker()
        self._assigned: set[PartitionKey] = set()
        self._generation: dict[PartitionKey, int] = {}
        self._eof: set[PartitionKey] = set()
        self._carry: list[_InHand] = []
        self._paused: set[PartitionKey] = set()
        self._watchdog = sdnotify.Watchdog()
        self._pool: ThreadPoolExecutor | None = None
        # Request size cap (consumer.max_bulk_bytes), lowered by 413 answers until restart.
        self._bulk_cap = cfg.consumer.max_bulk_bytes
        self._smallest_refused = 0
        self._bulk_cap_lock = threading.Lock()
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
        # When we last committed each partition (monotonic), for the idle refresh.
        self._committed_at: dict[PartitionKey, float] = {}

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
            self._consumer = Consumer(consumer_config(self.cfg, error_cb=self._on_error),
                                      logger=RdKafkaLogger())
        if self._es is None:
            self._es = make_es_client(self.cfg)
        if self._dlq is None:
            self._dlq = DeadLetterQueue(kcfg, tick=self._watchdog.ping)
        self._pool = ThreadPoolExecutor(ccfg.bulk_concurrency, thread_name_prefix="logpipe-bulk")

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
        if self._pool is not None:
            # A request abandoned at the shutdown deadline finishes on its own (bounded by
            # elasticsearch.request_timeout_s); its messages were not committed.
            self._pool.shutdown(wait=False, cancel_futures=True)
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
        ccfg = self.cfg.consumer
        run_once = ccfg.max_batches > 0
        unassigned_since = time.monotonic()
        unassigned_limit = ccfg.session_timeout_ms / 1000 + 10.0
        while not self.stopping and self._fatal is None and self._refusal is None:
            self._tick()
            self._refresh_commits()
            batch = self._fetch()
            if self._fatal is not None:
                break  # what was fetched stays uncommitted for the instance that goes on
            if batch:
                self._process(batch)
                self.batches += 1
                if run_once and (self.batches >= ccfg.max_batches or self._drained()):
                    break
                continue
            # Idle: retry a commit that failed earlier (e.g. during a rebalance), if any.
            self._commit()
            if run_once:
                if self._assigned:
                    unassigned_since = time.monotonic()
                    if self._drained():
                        break
                elif time.monotonic() - unassigned_since > unassigned_limit:
                    log.warning("no_assignment", waited_s=unassigned_limit)
                    break

    def _drained(self) -> bool:
        """Run-once: every owned partition has been read to its end and nothing is in hand."""
        return bool(self._assigned) and self._eof >= self._assigned and not self._carry

    def _fetch(self) -> list[_InHand]:
        size = self.cfg.consumer.batch_size
        if self._carry:
            live = [m for m in self._carry if self._owned(m)]
            carried, self._carry = live[:size], live[size:]
            if carried:
                return carried
        # consume() returns only when it has a full batch or its timeout expired; collect in
        # short slices so a run-once invocation notices the partitions' ends without sitting
        # out a whole poll timeout for the last partial batch.
        run_once = self.cfg.consumer.max_batches > 0
        deadline = time.monotonic() + self.cfg.consumer.poll_timeout_s
        batch: list[_InHand] = []
        while len(batch) < size:
            left = deadline - time.monotonic()
            batch.extend(self._accept(self._consumer.consume(
                size - len(batch), max(0.0, min(FETCH_SLICE_S, left)))))
            if left <= FETCH_SLICE_S or self._fatal is not None or self.stopping \
                    or self._refusal is not None \
                    or (run_once and self._assigned and self._eof >= self._assigned):
                break
            self._watchdog.ping()
        return batch

    def _accept(self, messages: Sequence[Message]) -> list[_InHand]:
        out: list[_InHand] = []
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    eof_topic, eof_partition = msg.topic(), msg.partition()
                    if eof_topic is not None and eof_partition is not None:
                        self._eof.add((eof_topic, eof_partition))
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
            self._eof.discard(key)
            self._tracker.fetched(key, offset)
            out.append(_InHand(key, offset, self._generation.get(key, 0), msg.key(), msg.value()))
        return out

    def _owned(self, m: _InHand) -> bool:
        return m.key in self._assigned and self._generation.get(m.key, 0) == m.generation

    def _process(self, batch: list[_InHand]) -> None:
        ccfg, es_prefix = self.cfg.consumer, self.cfg.elasticsearch.index
        started = time.monotonic()
        indexed_at = _now_iso()
        for m in batch:
            result = make_doc(m.value, m.msg_key, index_prefix=es_prefix, indexed_at=indexed_at,
                              max_bytes=ccfg.max_message_bytes)
            if isinstance(result, Doc):
                m.doc = result
            else:
                m.rejected = result
        created = present = dead = retried = 0
        attempt = 0
        remaining = batch
        while True:
            remaining = [m for m in remaining if self._owned(m)]
            if not remaining:
                break
            retry: list[_InHand] = []
            reason = ""
            to_index = [m for m in remaining if m.rejected is None]
            if to_index:
                outcome = self._bulk([m.doc for m in to_index if m.doc is not None])
                for pos in outcome.created:
                    self._tracker.handled(to_index[pos].key, to_index[pos].offset)
                for pos in outcome.already_present:
                    self._tracker.handled(to_index[pos].key, to_index[pos].offset)
                for pos, rejected in outcome.rejected.items():
                    to_index[pos].rejected = rejected
                retry.extend(to_index[pos] for pos in outcome.retry)
                if outcome.refusal is not None:
                    self._refuse(outcome.refusal.at(",".join(self.cfg.elasticsearch.hosts)))
                created += len(outcome.created)
                present += len(outcome.already_present)
                self.metrics.handled("indexed", len(outcome.created))
                self.metrics.handled("already_present", len(outcome.already_present))
                self.indexed += len(outcome.created)
                self.already_present += len(outcome.already_present)
                reason = outcome.retry_reason
            to_dlq = [m for m in remaining if m.rejected is not None]
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
            remaining = retry
            if not remaining or self._halted:
                # Refused or fatal: what is not handled stays uncommitted for the next start.
                break
            if self._stop.is_set() and self._past_shutdown_deadline():
                break
            wait = backoff_s(attempt, ccfg.retry_initial_backoff_s, ccfg.retry_max_backoff_s,
                             self._rng())
            if self._stop_at is not None:
                wait = min(wait, max(0.0, self._stop_at + ccfg.shutdown_timeout_s
                                     - time.monotonic()))
            attempt += 1
            retried += len(remaining)
            self.retried += len(remaining)
            self._retry_reason = reason or "unknown"
            self.metrics.retry(self._retry_reason, len(remaining))
            log.event("bulk_retry", items=len(remaining), attempt=attempt,
                      backoff_s=round(wait, 3), reason=reason or "unknown")
            self._wait_paused(wait)
        self._retry_reason = ""
        committed = self._commit()
        left = [m for m in remaining if self._owned(m)]
        if left:
            log.warning("batch_incomplete", left_for_redelivery=len(left))
        seconds = time.monotonic() - started
        self.metrics.batch_seconds.observe(seconds)
        log.event("batch_committed", docs=len(batch), created=created, already_present=present,
                  dlq=dead, retried=retried, seconds=round(seconds, 3),
                  partitions=len(committed))

    # -- Elasticsearch -----------------------------------------------------------------------

    def _bulk(self, docs: list[Doc]) -> BulkOutcome:
        """Send ``docs`` (split for bulk_concurrency and the request size cap, and again
        wherever a request is refused as too large) and merge the outcomes, positions relative
        to ``docs``.

        Requests run on the pool even one at a time: the main thread keeps the systemd
        watchdog fed while a slow request is within its own timeout, and can give up waiting
        at the shutdown deadline (the abandoned documents count as not indexed).
        """
        assert self._pool is not None
        chunks = self.cfg.consumer.bulk_concurrency
        if len(docs) < 2 * chunks:
            chunks = 1  # not worth splitting a handful of retries
        cap = self._bulk_cap
        parts = split_docs(docs, chunks, cap)
        futures = [self._pool.submit(self._bulk_chunk, part) for part in parts]
        pending = set(futures)
        while pending:
            _done, pending = wait(pending, timeout=WAIT_SLICE_S)
            self._watchdog.ping()
            if pending and self._stop.is_set() and self._past_shutdown_deadline():
                break
        merged = BulkOutcome()
        base = 0
        for part, future in zip(parts, futures, strict=True):
            if future.done():
                outcome = future.result()
            else:
                future.cancel()
                outcome = BulkOutcome(retry=list(range(len(part))), retry_reason="shutdown")
            merged.add(outcome, base)
            base += len(part)
        if self._bulk_cap < cap:
            self.metrics.bulk_cap.set(self._bulk_cap)
            # Once per lowering, not per refused request: the recursive halving behind it
            # may have taken several.
            log.warning("bulk_too_large", refused_bytes=self._smallest_refused,
                        previous_cap_bytes=cap, new_cap_bytes=self._bulk_cap,
                        hint="a limit below consumer.max_bulk_bytes: Elasticsearch "
                             "http.max_content_length or a proxy's body size limit")
        return merged

    def _bulk_chunk(self, docs: list[Doc]) -> BulkOutcome:
        return send_in_parts(docs, self._bulk_request)

    def _too_large(self, body_bytes: int) -> TooLarge:
        """Note a 413: the limit is below ``body_bytes``, so cut later requests at half of it
        (the size of the halves sent next) rather than meet the limit with every batch."""
        with self._bulk_cap_lock:
            self._bulk_cap = min(self._bulk_cap, max(1, body_bytes // 2))
            self._smallest_refused = min(self._smallest_refused or body_bytes, body_bytes)
        return TooLarge(body_bytes, "HTTP 413 (over Elasticsearch's http.max_content_length "
                                    "or a proxy's body size limit)")

    def _bulk_request(self, docs: list[Doc]) -> BulkOutcome | TooLarge:
        """One ``_bulk`` request; a failure of the whole request makes every item retriable,
        except a 413, which says the body is too large.

        Measured against Elasticsearch 8.19 with http.max_content_length lowered: an
        over-limit ``_bulk`` is answered 413 (empty body) from the Content-Length header alone,
        before any of the body is read or indexed; the body is then read and discarded and the
        connection kept. The client sees an ``ApiError`` with status 413, never a reset (bodies
        of 1 to 45 MiB, four in parallel). A reverse proxy's 413 (an HTML page) arrives the
        same way. A reset that swallowed the answer would be an ordinary ``TransportError``
        and retried: nothing tells it apart from an outage.
        """
        assert self._es is not None
        body = build_body(docs)
        reason = ""
        try:
            with self.metrics.bulk_seconds.time():
                response = self._es.bulk(body=body,  # type: ignore[arg-type]
                                         filter_path=BULK_FILTER_PATH)
        except ApiError as exc:
            if exc.meta.status == 413:
                return self._too_large(len(body))
            reason = f"http_{exc.meta.status}"
            detail = str(exc)[:300]
            found = refusal.elasticsearch(exc, self.cfg.elasticsearch.hosts)
            if found is not None:
                return BulkOutcome(retry=list(range(len(docs))), retry_reason=reason,
                                   refusal=found)
        except TransportError as exc:
            reason = type(exc).__name__
            detail = str(exc)[:300]
            found = refusal.elasticsearch(exc, self.cfg.elasticsearch.hosts)
            if found is not None:
                return BulkOutcome(retry=list(range(len(docs))), retry_reason=reason,
                                   refusal=found)
        except Exception as exc:
            reason = type(exc).__name__
            detail = str(exc)[:300]
        else:
            return classify(response.body, docs)
        log.warning("bulk_request_failed", reason=reason, error=detail, items=len(docs))
        return BulkOutcome(retry=list(range(len(docs))), retry_reason=reason)

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

    # -- waiting while retrying --------------------------------------------------------------

    def _wait_paused(self, seconds: float) -> None:
        """Sleep ``seconds`` without leaving the group: partitions paused, still polling."""
        end = time.monotonic() + seconds
        try:
            while True:
                self._pause_all()
                self._tick()
                left = end - time.monotonic()
                if left <= 0 or self._fatal is not None \
                        or (self._stop.is_set() and self._past_shutdown_deadline()):
                    break
                messages = self._consumer.consume(self.cfg.consumer.batch_size,
                                                  min(PAUSED_POLL_S, left))
                # Anything that still arrives (a partition assigned meanwhile) is kept in
                # order for the next batch, never dropped.
                self._carry.extend(self._accept(messages))
        finally:
            self._resume_all()

    def _pause_all(self) -> None:
        new = self._assigned - self._paused
        if new:
            self._consumer.pause([TopicPartition(t, p) for t, p in new])
            self._paused |= new

    def _resume_all(self) -> None:
        current = self._paused & self._assigned
        if current:
            self._consumer.resume([TopicPartition(t, p) for t, p in current])
        self._paused.clear()

    # -- commits and rebalances --------------------------------------------------------------

    def _commit(self, keys: set[PartitionKey] | None = None) -> dict[PartitionKey, int]:
        """Synchronously commit handled positions that advanced (only partitions we own)."""
        selected = self._assigned if keys is None else keys
        return self._send_commit(self._tracker.to_commit(selected))

    def _refresh_commits(self) -> None:
        """Commit idle partitions' positions again with a fresh time (see COMMIT_REFRESH_S):
        without it a partition that had nothing to do for an hour and then gets a message looks
        stalled to `logpipe check` until that message is committed."""
        now = time.monotonic()
        positions = {}
        for key in self._assigned:
            if now - self._committed_at.get(key, now) < COMMIT_REFRESH_S:
                continue
            position = self._tracker.caught_up(key)
            if position is not None:
                positions[key] = position
        if positions:
            self._send_commit(positions)
            # Attempted counts: a refresh that failed (a rebalance) waits for the next round
            # instead of being retried, and logged, on every loop.
            self._committed_at.update(dict.fromkeys(positions, now))

    def _send_commit(self, positions: dict[PartitionKey, int]) -> dict[PartitionKey, int]:
        if not positions or (self._fatal is not None and self._fatal.client == "consumer"):
            # A consumer in a fatal state can commit nothing any more (librdkafka refuses).
            return {}
        metadata = commit_metadata(time.time())
        offsets = [TopicPartition(t, p, pos, metadata=metadata)
                   for (t, p), pos in positions.items()]
        try:
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
        done = {}
        for tp in result or offsets:
            if tp.error is None:
                done[(tp.topic, tp.partition)] = tp.offset
            else:
                found = refusal.kafka(tp.error, self.cfg.kafka.bootstrap_servers)
                if found is not None:
                    self._refuse(found)
                elif (fatal := fatal_error(tp.error, "consumer")) is not None:
                    self._fail(fatal)
                    continue
                log.warning("commit_failed", partition=tp.partition, error=str(tp.error))
        self._tracker.mark_committed(done)
        if done:
            self.metrics.committed()
        now = time.monotonic()
        self._committed_at.update(dict.fromkeys(done, now))
        return done

    def _on_assign(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        # confluent-kafka performs the incremental assign itself after this callback returns
        # (cooperative protocol), since we do not call incremental_assign here.
        keys = {(tp.topic, tp.partition) for tp in partitions}
        if not keys:
            return  # an incremental rebalance that gave us nothing new
        self._tracker.forget(keys)
        for key in keys:
            self._generation[key] = self._generation.get(key, 0) + 1
        self._assigned |= keys
        self._eof -= keys
        log.event("assigned", partitions=_fmt(keys), owned=len(self._assigned))

    def _on_revoke(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        keys = {(tp.topic, tp.partition) for tp in partitions}
        try:
            committed = self._commit(keys & self._assigned)
        except Exception as exc:
            log.warning("commit_failed", error=str(exc))
            committed = {}
        dropped = self._drop(keys)
        log.event("revoked", partitions=_fmt(keys), committed=len(committed),
                  dropped=dropped, owned=len(self._assigned))

    def _on_lost(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        keys = {(tp.topic, tp.partition) for tp in partitions}
        dropped = self._drop(keys)
        log.warning("lost", partitions=_fmt(keys), dropped=dropped, owned=len(self._assigned))

    def _drop(self, keys: set[PartitionKey]) -> int:
        """Forget partitions we no longer own; their unhandled messages go to the new owner."""
        dropped = sum(self._tracker.unhandled_count(k) for k in keys)
        self._tracker.forget(keys)
        for key in keys:
            self._generation[key] = self._generation.get(key, 0) + 1
            self._committed_at.pop(key, None)
        self._assigned -= keys
        self._paused -= keys
        self._eof -= keys
        self._carry = [m for m in self._carry if m.key not in keys]
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
        self.metrics.assigned.set(len(self._assigned))
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
                            reason=self._retry_reason or "unknown", owned=len(self._assigned))
        elif self._stalled:
            self._stalled = False
            log.event("stall_cleared", lag=lag, indexed=self.indexed)
        self.metrics.stalled.set(stalled_s)
        sdnotify.notify(f"STATUS={status}")
        log.event("throughput", docs_per_s=round(rate, 1), lag=lag, indexed=self.indexed,
                  already_present=self.already_present, dlq=self.dead_lettered,
                  owned=len(self._assigned))

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
        for topic, partition in self._assigned:
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
                    ) -> dict[str, Any]:
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
    return conf


def make_es_client(cfg: Config) -> Elasticsearch:
    """The Elasticsearch client, parsing responses with orjson (bulk answers are large)."""
    return make_client(cfg.elasticsearch,
                       serializers={"application/json": OrjsonSerializer()})


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
