"""Bulk requests to Elasticsearch on a small thread pool, so the consume loop never blocks on one.

``BulkSender.submit(docs)`` splits the documents (``consumer.bulk_concurrency`` parts, each under
the request size cap), queues one request per part and returns a ``PendingBulk`` at once; the
consumer builds the next batch while this one is indexed. The pool has a thread for every part of
every batch in hand (``bulk_concurrency`` x ``consumer.pipeline_depth``), so a batch goes out the
moment it is submitted, beside the one still being indexed. With one request in flight,
Elasticsearch idled while each answer was read, parsed and handled and the next request sent
(~2 ms of every ~25 ms request, more when the consumer shares its cores); with the next batch
already in flight it always has one to work on. Answers are still handled oldest first, and
what is committed does not depend on which request is answered first.

A request refused with 413 is sent again in halves (``bulk.send_in_parts``), and the cap is
lowered for later requests until restart. Everything else a request can fail with makes its items
retriable; which of them the consumer retries, dead-letters or commits is its decision.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from elasticsearch import ApiError, Elasticsearch, TransportError

from logpipe import log, refusal
from logpipe.bulk import BulkOutcome, Doc, TooLarge, build_body, classify, send_in_parts, split_docs
from logpipe.metrics import ConsumerMetrics

# Only the fields classification needs: keeps the response small and cheap to parse.
BULK_FILTER_PATH = "errors,items.*._id,items.*._index,items.*.status,items.*.error"


@dataclass(slots=True)
class PendingBulk:
    """The requests of one submitted batch; positions in the outcome are relative to its docs."""

    parts: list[list[Doc]]
    futures: list[Future[BulkOutcome]]
    cap_before: int

    def done(self) -> bool:
        return all(f.done() for f in self.futures)

    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for every request; True when all have answered."""
        _done, pending = wait(self.futures, timeout=timeout_s)
        return not pending


class BulkSender:
    """Sends documents with ``_bulk`` ``create`` requests; learns a lower size cap from 413s."""

    def __init__(self, es: Elasticsearch, *, hosts: list[str], concurrency: int,
                 in_flight: int, max_bulk_bytes: int, metrics: ConsumerMetrics) -> None:
        """``concurrency``: parts per batch; ``in_flight``: requests in flight at most."""
        self._es = es
        self._hosts = hosts
        self._concurrency = concurrency
        self._metrics = metrics
        self._pool = ThreadPoolExecutor(in_flight, thread_name_prefix="logpipe-bulk")
        # Request size cap (consumer.max_bulk_bytes), lowered by 413 answers until restart.
        self._cap = max_bulk_bytes
        self._smallest_refused = 0
        # The cap last logged: a batch queued before a lowering must not log it again.
        self._reported_cap = max_bulk_bytes
        self._cap_lock = threading.Lock()
        metrics.bulk_cap.set(max_bulk_bytes)

    @property
    def cap_bytes(self) -> int:
        return self._cap

    def submit(self, docs: list[Doc]) -> PendingBulk:
        """Queue ``docs`` for indexing and return at once."""
        chunks = self._concurrency
        if len(docs) < 2 * chunks:
            chunks = 1  # not worth splitting a handful of retries
        cap = self._cap
        parts = split_docs(docs, chunks, cap)
        # Bodies are built here, on the caller's thread, while the previous request is in
        # flight: a request thread that built its own body would leave Elasticsearch idle
        # meanwhile.
        futures = [self._pool.submit(self._send, part, build_body(part)) for part in parts]
        return PendingBulk(parts, futures, cap)

    def _send(self, docs: list[Doc], body: bytes) -> BulkOutcome:
        """One part, with its body built; cut again first if a 413 lowered the cap after it
        was queued (the next batch is queued before the answers to this one are in)."""
        if len(body) <= self._cap:
            # The first request send_in_parts makes is for ``docs`` itself: reuse its body.
            return send_in_parts(docs, lambda part: self._request(
                part, body if part is docs else None))
        pieces = split_docs(docs, 1, self._cap)
        outcome, base = BulkOutcome(), 0
        for piece in pieces:
            outcome.add(send_in_parts(piece, self._request), base)
            base += len(piece)
        return outcome

    def outcome(self, pending: PendingBulk) -> BulkOutcome:
        """The merged outcome of ``pending``; requests that have not answered (abandoned at the
        shutdown deadline) count as retriable, so none of their documents is committed."""
        merged = BulkOutcome()
        base = 0
        for part, future in zip(pending.parts, pending.futures, strict=True):
            if future.done() and not future.cancelled():
                outcome = future.result()
            else:
                future.cancel()
                outcome = BulkOutcome(retry=list(range(len(part))), retry_reason="shutdown")
            merged.add(outcome, base)
            base += len(part)
        if self._cap < pending.cap_before and self._cap != self._reported_cap:
            self._reported_cap = self._cap
            self._metrics.bulk_cap.set(self._cap)
            # Once per lowering, not per refused request: the recursive halving behind it may
            # have taken several.
            log.warning("bulk_too_large", refused_bytes=self._smallest_refused,
                        previous_cap_bytes=pending.cap_before, new_cap_bytes=self._cap,
                        hint="a limit below consumer.max_bulk_bytes: Elasticsearch "
                             "http.max_content_length or a proxy's body size limit")
        return merged

    def close(self) -> None:
        # A request abandoned at the shutdown deadline finishes on its own (bounded by
        # elasticsearch.request_timeout_s); its messages were not committed.
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _too_large(self, body_bytes: int) -> TooLarge:
        """Note a 413: the limit is below ``body_bytes``, so cut later requests at half of it
        (the size of the halves sent next) rather than meet the limit with every batch."""
        with self._cap_lock:
            self._cap = min(self._cap, max(1, body_bytes // 2))
            self._smallest_refused = min(self._smallest_refused or body_bytes, body_bytes)
        return TooLarge(body_bytes, "HTTP 413 (over Elasticsearch's http.max_content_length "
                                    "or a proxy's body size limit)")

    def _request(self, docs: list[Doc], body: bytes | None = None) -> BulkOutcome | TooLarge:
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
        if body is None:
            body = build_body(docs)
        try:
            with self._metrics.bulk_seconds.time():
                response = self._es.bulk(body=body,  # type: ignore[arg-type]
                                         filter_path=BULK_FILTER_PATH)
        except ApiError as exc:
            if exc.meta.status == 413:
                return self._too_large(len(body))
            return self._failed(docs, f"http_{exc.meta.status}", exc)
        except TransportError as exc:
            return self._failed(docs, type(exc).__name__, exc)
        except Exception as exc:
            return self._failed(docs, type(exc).__name__, exc, refusal_possible=False)
        return classify(response.body, docs)

    def _failed(self, docs: list[Doc], reason: str, exc: Exception, *,
                refusal_possible: bool = True) -> BulkOutcome:
        found = refusal.elasticsearch(exc, self._hosts) if refusal_possible else None
        if found is None:
            log.warning("bulk_request_failed", reason=reason, error=str(exc)[:300],
                        items=len(docs))
        return BulkOutcome(retry=list(range(len(docs))), retry_reason=reason, refusal=found)
