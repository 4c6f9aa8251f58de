"""``logpipe produce``: generate fake logs and send them to the Kafka topic.

Two modes:

* one-shot (the systemd timer): ``count`` messages as fast as the broker takes them;
* load (benchmarks): ``rate`` messages/s, for ``duration`` seconds (or for ``count`` messages when
  no duration is given). ``duration`` without ``rate`` sends as fast as possible for that long.

The producer is idempotent with ``acks=all``: a broker-side retry can neither duplicate nor
reorder messages within a partition. Key = ``log_id``, so the consumer can use the key as the
Elasticsearch document id without parsing the value. Success means every message got a positive
delivery report; anything failed or still queued after ``flush`` is counted and makes the command
exit 1, so a timer run that lost logs is visible in ``systemctl --failed``. So does a fatal client
state (``logpipe.fatal``: e.g. the idempotent producer's sequence state lost), which stops the run
at once with one ``event=fatal reason=kafka_fatal`` line.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from logpipe import log, refusal
from logpipe.config import Config
from logpipe.fatal import RAISED_BY_CLIENT, FatalError
from logpipe.generator import LogGenerator
from logpipe.kafka import RdKafkaLogger, client_config
from logpipe.refusal import KafkaErrorWatch, Refusal

# Messages generated per chunk in one-shot mode; bounds memory and keeps polling regular.
_CHUNK = 1000
# Delivery errors logged individually before only counting them (a dead broker fails thousands).
_MAX_ERRORS_LOGGED = 5
# Flush in slices this long so a refusal reported meanwhile ends the wait at once.
_FLUSH_SLICE_S = 0.5


@dataclass(frozen=True)
class ProduceResult:
    produced: int  # handed to the client (accepted into its queue)
    delivered: int  # acknowledged by the brokers (acks=all)
    failed: int  # negative delivery report
    elapsed_s: float
    # Set when a broker refused us (credentials, certificate, ACL): the run stopped early.
    refusal: Refusal | None = None
    # Set when the client reached a fatal state: the run stopped early.
    fatal: FatalError | None = None

    @property
    def undelivered(self) -> int:
        """Failed plus never reported (still queued when the flush timed out)."""
        return self.produced - self.delivered

    @property
    def ok(self) -> bool:
        return self.undelivered == 0 and self.refusal is None and self.fatal is None

    @property
    def rate(self) -> float:
        """Delivered messages per second."""
        return self.delivered / self.elapsed_s if self.elapsed_s > 0 else 0.0


def producer_config(cfg: Config) -> dict[str, Any]:
    """librdkafka settings for the log producer (site ``client_overrides`` still win)."""
    conf = client_config(cfg.kafka, "logpipe-producer")
    conf.update({
        "enable.idempotence": True,
        "acks": "all",
        "compression.type": cfg.producer.compression,
        "linger.ms": cfg.producer.linger_ms,
        "batch.size": cfg.producer.batch_size_bytes,
    })
    conf.update(cfg.kafka.client_overrides)
    return conf


class _Delivery:
    """Counts delivery reports (called from ``poll``/``flush`` in this thread)."""

    def __init__(self, watch: KafkaErrorWatch) -> None:
        self.delivered = 0
        self.failed = 0
        self._watch = watch

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.delivered += 1
            return
        self.failed += 1
        # A missing ACL shows only here (TOPIC_AUTHORIZATION_FAILED on every message).
        self._watch(err)
        if self.failed <= _MAX_ERRORS_LOGGED and err.code() != KafkaError._PURGE_QUEUE:
            # (Purged messages are the ones dropped after a refusal or a fatal error, which
            # is logged.)
            log.error("delivery_failed", topic=msg.topic(), error=err.str(),
                      code=err.name(), retriable=err.retriable())


def _send(producer: Producer, topic: str, key: bytes, value: bytes, on_delivery: _Delivery,
          watch: KafkaErrorWatch) -> bool:
    """Produce, waiting for room in the local queue; False if the client stopped first."""
    while not watch.stopped:
        try:
            producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
            return True
        except BufferError:
            # Local queue full: serve delivery reports until there is room again.
            producer.poll(0.1)
    return False


def _stopped_by(exc: BaseException, producer: Producer, watch: KafkaErrorWatch) -> bool:
    """Whether ``exc`` means a refusal or a fatal state. A fatal error is raised by poll() or
    flush() (see ``logpipe.fatal.RAISED_BY_CLIENT``); produce() fails with its cause first,
    which need not look fatal, so one poll() hears the error itself."""
    if watch.caught(exc):
        return True
    try:
        producer.poll(0)
    except RAISED_BY_CLIENT as raised:
        return watch.caught(raised)
    return False


def produce(cfg: Config, count: int, rate: float = 0, duration: float = 0,
            seed: int | None = None, stop: threading.Event | None = None) -> ProduceResult:
    """Send logs to ``cfg.kafka.topic``; see the module docstring for the modes.

    ``stop`` (set by a signal handler) ends generation early; what was produced is still
    flushed and counted.
    """
    if count < 0 or rate < 0 or duration < 0:
        raise ValueError("count, rate and duration must not be negative")
    stop = stop or threading.Event()
    generator = LogGenerator(seed)
    topic = cfg.kafka.topic
    watch = KafkaErrorWatch(cfg.kafka.bootstrap_servers, client="producer")
    producer = Producer({**producer_config(cfg), "error_cb": watch},
                        logger=RdKafkaLogger(watch.logged))
    delivery = _Delivery(watch)
    if rate > 0 and duration > 0:
        target: int | None = int(rate * duration)
    elif duration > 0:
        target = None  # as fast as possible until the deadline
    else:
        target = count
    chunk = _CHUNK if rate <= 0 else max(1, min(_CHUNK, int(rate / 50)))
    log.event("produce_start", topic=topic, count=target if target is not None else "unbounded",
              rate=rate, duration_s=duration, seed=seed if seed is not None else "none")

    produced = 0
    started = time.monotonic()
    deadline = started + duration if duration > 0 else None
    try:
        while not stop.is_set() and not watch.stopped and (target is None or produced < target):
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            if rate > 0:
                # Paced in whole chunks (1/50 s of the rate): the schedule says how many should be
                # out by now, one chunk ahead so the first goes at once and the last before the
                # deadline. Until a whole chunk is due, serve delivery reports. Waiting per message
                # instead asks poll() for sub-millisecond timeouts, which librdkafka rounds down to
                # 0: the loop then spins and takes a whole core from the consumer it is feeding.
                want = chunk if target is None else min(chunk, target - produced)
                elapsed = now - started
                due = int(elapsed * rate) + chunk
                if due - produced < want:
                    wait = (produced + want - chunk) / rate - elapsed
                    producer.poll(min(max(wait, 0.001), 0.05))
                    continue
                n = min(chunk, due - produced)
            else:
                n = chunk
            if target is not None:
                n = min(n, target - produced)
            send = producer.produce
            for key, value in generator.messages(n):
                try:
                    send(topic, value=value, key=key, on_delivery=delivery)
                except BufferError:
                    if not _send(producer, topic, key, value, delivery, watch):
                        break
                produced += 1
            producer.poll(0)
    except RAISED_BY_CLIENT as exc:
        if not _stopped_by(exc, producer, watch):
            raise

    remaining = _flush(producer, cfg.producer.flush_timeout_s, watch)
    elapsed = time.monotonic() - started
    result = ProduceResult(produced=produced, delivered=delivery.delivered,
                           failed=delivery.failed, elapsed_s=elapsed, refusal=watch.refusal,
                           fatal=watch.fatal)
    log.event("produce_done", produced=produced, delivered=result.delivered,
              failed=result.failed, seconds=round(elapsed, 3), rate=round(result.rate, 1))
    if result.refusal is not None:
        result.refusal.log()
    elif result.fatal is not None:
        result.fatal.log()
    elif not result.ok:
        log.error("produce_incomplete", undelivered=result.undelivered, failed=result.failed,
                  still_queued=remaining, flush_timeout_s=cfg.producer.flush_timeout_s)
    return result


def _flush(producer: Producer, timeout_s: float, watch: KafkaErrorWatch) -> int:
    """Wait for delivery reports; on a refusal drop what is queued (it cannot be delivered with
    these credentials) instead of waiting out the timeout. Returns the messages left."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            remaining = int(producer.flush(
                min(_FLUSH_SLICE_S, max(0.0, deadline - time.monotonic()))))
        except RAISED_BY_CLIENT as exc:
            # A fatal error: librdkafka already failed what was queued (_PURGE_QUEUE); the
            # requests in flight still get their answer, so the flush goes on.
            if not watch.caught(exc):
                raise
            remaining = len(producer)
        if remaining and watch.refusal is not None:
            producer.purge()
            producer.flush(0)
            return remaining
        if remaining == 0 or time.monotonic() >= deadline:
            return remaining


def run(cfg: Config, stop: threading.Event | None = None) -> int:
    """CLI entry: ``cfg.producer`` carries count/rate/duration/seed; exit 0, 1 (undelivered
    messages, or a fatal client state) or ``EXIT_REFUSED`` (4) when a broker refused the
    credentials, the CA or an ACL."""
    p = cfg.producer
    result = produce(cfg, p.count, rate=p.rate, duration=p.duration_s, seed=p.seed, stop=stop)
    if cfg.metrics.textfile:
        from logpipe.metrics import write_producer_textfile

        try:
            write_producer_textfile(cfg.metrics.textfile, delivered=result.delivered,
                                    failed=result.failed, produced=result.produced,
                                    seconds=result.elapsed_s, ok=result.ok)
        except OSError as exc:
            # The logs went out; a missing metrics directory must not fail the run.
            log.warning("metrics_textfile_failed", path=cfg.metrics.textfile, error=str(exc))
    if result.refusal is not None:
        return refusal.EXIT_REFUSED
    return 0 if result.ok else 1
