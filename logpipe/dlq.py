"""The dead-letter topic: an idempotent producer whose sends are confirmed before we commit.

A dead-lettered message counts as handled only once the broker has acknowledged the copy
(``acks=all``): a send that fails or times out leaves the message unhandled, so its offset is not
committed past and it is retried.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from logpipe import log
from logpipe.config import KafkaConfig
from logpipe.fatal import RAISED_BY_CLIENT, FatalError
from logpipe.kafka import RdKafkaLogger, client_config
from logpipe.refusal import KafkaErrorWatch, Refusal

# Keep the copy well under the broker's default max.message.bytes (1 MiB, per record batch)
# and librdkafka's message.max.bytes, with room for key and headers.
MAX_DLQ_VALUE_BYTES = 900_000
MAX_HEADER_ERROR_CHARS = 1000


@dataclass(frozen=True, slots=True)
class DeadLetter:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    reason: str
    error: str


def headers_for(letter: DeadLetter) -> list[tuple[str, bytes]]:
    return [
        ("logpipe.reason", letter.reason.encode()),
        ("logpipe.error", letter.error[:MAX_HEADER_ERROR_CHARS].encode("utf-8", "replace")),
        ("logpipe.source.topic", letter.topic.encode()),
        ("logpipe.source.partition", str(letter.partition).encode()),
        ("logpipe.source.offset", str(letter.offset).encode()),
    ]


def fit_value(value: bytes | None, limit: int = MAX_DLQ_VALUE_BYTES,
              ) -> tuple[bytes | None, list[tuple[str, bytes]]]:
    """The value to dead-letter, truncated to ``limit`` with a header noting the original size."""
    if value is None or len(value) <= limit:
        return value, []
    return value[:limit], [("logpipe.truncated_from", str(len(value)).encode())]


class DeadLetterQueue:
    """``send()`` blocks until every letter is acknowledged or failed (at most
    ``flush_timeout_s``), calling ``tick`` about once a second meanwhile (watchdog pings)."""

    def __init__(self, cfg: KafkaConfig, *, flush_timeout_s: float = 30.0,
                 producer: Any = None, tick: Callable[[], None] | None = None) -> None:
        self._topic = cfg.dlq_topic
        self._flush_timeout_s = flush_timeout_s
        self._tick = tick
        # A refused copy (no WRITE ACL on the DLQ topic, bad credentials) is unacknowledged like
        # any failed one; the consumer also stops on it, since retrying cannot help. So it does
        # on a fatal error (the idempotent producer's state lost): only a new client can send.
        self._watch = KafkaErrorWatch(cfg.bootstrap_servers, client="dlq")
        if producer is None:
            conf = {
                "linger.ms": 5,
                # A delivery gives up (and its message is retried by the consumer) instead of
                # blocking the batch for librdkafka's default 5 minutes.
                "message.timeout.ms": int(flush_timeout_s * 1000),
                **client_config(cfg, "logpipe-dlq"),
                "enable.idempotence": True,
                "acks": "all",
                "error_cb": self._watch,
            }
            producer = Producer(conf, logger=RdKafkaLogger(self._watch.logged))
        self._producer = producer

    @property
    def refusal(self) -> Refusal | None:
        return self._watch.refusal

    @property
    def fatal(self) -> FatalError | None:
        return self._watch.fatal

    def _flush(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                remaining = int(self._producer.flush(
                    min(1.0, max(0.0, deadline - time.monotonic()))))
            except RAISED_BY_CLIENT as exc:
                # How confluent-kafka reports a producer's fatal error: raised from flush().
                if not self._watch.caught(exc):
                    raise
                remaining = len(self._producer)
            if self._tick is not None:
                self._tick()
            if remaining == 0 or time.monotonic() >= deadline or self._watch.stopped:
                return remaining

    def send(self, letters: Sequence[DeadLetter], timeout_s: float | None = None) -> list[bool]:
        """Produce every letter and wait for the broker; per letter, True if acknowledged."""
        acked = [False] * len(letters)

        def on_delivery(pos: int) -> Any:
            def callback(err: KafkaError | None, _msg: Message) -> None:
                if err is None:
                    acked[pos] = True
                else:
                    self._watch(err)
                    log.warning("dlq_delivery_failed", error=str(err),
                                source_partition=letters[pos].partition,
                                source_offset=letters[pos].offset)
            return callback

        for pos, letter in enumerate(letters):
            if self._watch.stopped:
                break  # nothing more can be delivered by this client
            value, extra = fit_value(letter.value)
            try:
                self._producer.produce(self._topic, value=value, key=letter.key,
                                       headers=headers_for(letter) + extra,
                                       on_delivery=on_delivery(pos))
            except BufferError:
                # Local queue full: let deliveries drain, then try once more.
                self._flush(self._flush_timeout_s)
                try:
                    self._producer.produce(self._topic, value=value, key=letter.key,
                                           headers=headers_for(letter) + extra,
                                           on_delivery=on_delivery(pos))
                except Exception as exc:
                    log.warning("dlq_produce_failed", error=str(exc),
                                source_offset=letter.offset)
            except KafkaException as exc:  # message too large, unknown topic, ...
                if not self._watch.caught(exc):
                    log.warning("dlq_produce_failed", error=str(exc),
                                source_offset=letter.offset)
            except Exception as exc:
                log.warning("dlq_produce_failed", error=str(exc), source_offset=letter.offset)
        remaining = self._flush(self._flush_timeout_s if timeout_s is None else timeout_s)
        if remaining:
            log.warning("dlq_flush_incomplete", outstanding=remaining)
        return acked

    def close(self, timeout_s: float = 10.0) -> int:
        """Flush what is left; the number of messages still undelivered."""
        if self._watch.stopped:
            # Nothing queued can be delivered with a refused identity or by a client in a
            # fatal state: do not wait for it.
            self._producer.purge()
            timeout_s = 0.0
        try:
            return int(self._producer.flush(timeout_s))
        except RAISED_BY_CLIENT as exc:
            # A fatal error raised after the last send: nothing left can be delivered.
            if not self._watch.caught(exc):
                raise
            self._producer.purge()
            return len(self._producer)
