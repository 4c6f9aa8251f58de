"""Kafka message -> Elasticsearch bulk document, the ``_bulk`` body, and result classification.

Pure functions, no I/O. The rules (see docs/DESIGN.md):

* every document is sent with op type ``create`` and ``_id`` = message key, to the daily index of
  its own event ``timestamp``;
* a bulk item is matched to its document by ``_index`` + ``_id``, never by position;
* 200/201 -> done, 409 -> already present (a replay), 429/5xx/missing -> retry, 400 document
  errors -> dead-letter topic with the reason;
* a request refused as too large (413) is sent again in halves; a document refused alone goes to
  the dead-letter topic as ``too_large``.
"""

from __future__ import annotations

import re
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import orjson

from logpipe.es import index_name
from logpipe.refusal import ES_PRIVILEGE, Refusal

# Elasticsearch refuses the whole bulk request (not just the item) for an _id over 512 bytes.
MAX_ID_BYTES = 512
MAX_ERROR_CHARS = 1000

# Shape of the generator's timestamps; the date part names the daily index, so anything else
# (a local-time offset, a date-only value) would put the document in the wrong index.
_TIMESTAMP = re.compile(
    rb"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:Z|\+00:00)")
_TIMESTAMP_STR = re.compile(_TIMESTAMP.pattern.decode())

# Item error types that are about the cluster, not the document: retry them whatever the status.
RETRIABLE_ERROR_TYPES = frozenset({
    "es_rejected_execution_exception",
    "circuit_breaking_exception",
    "cluster_block_exception",
    "unavailable_shards_exception",
    "no_shard_available_action_exception",
    "node_not_connected_exception",
    "node_closed_exception",
    "primary_missing_action_exception",
    "process_cluster_event_timeout_exception",
    "receive_timeout_transport_exception",
    "timeout_exception",
    "index_closed_exception",
})
_MAPPING_ERROR_TYPES = frozenset({
    "mapper_parsing_exception",
    "document_parsing_exception",
    "strict_dynamic_mapping_exception",
})


@dataclass(slots=True)
class Doc:
    """One bulk ``create``: target index, document id and the JSON source (one line).

    Not frozen: one is built per message and a frozen dataclass's ``__init__`` costs ~3x more.
    """

    index: str
    doc_id: str
    source: bytes


@dataclass(frozen=True, slots=True)
class Rejected:
    """A message that cannot be indexed and goes to the dead-letter topic."""

    reason: str
    error: str


@dataclass(slots=True)
class BulkOutcome:
    """Positions (in the request's document list) grouped by what happens next."""

    created: list[int] = field(default_factory=list)
    already_present: list[int] = field(default_factory=list)
    retry: list[int] = field(default_factory=list)
    # position -> (reason code, error text)
    rejected: dict[int, Rejected] = field(default_factory=dict)
    # One retry reason for the log line (the first seen).
    retry_reason: str = ""
    # Elasticsearch refused us (credentials, certificate, a missing privilege): the refused
    # items are also in ``retry`` (never handled), but the consumer stops instead of retrying.
    refusal: Refusal | None = None


    def add(self, other: BulkOutcome, base: int) -> None:
        """Merge the outcome of a request whose documents start at position ``base``."""
        self.created.extend(base + p for p in other.created)
        self.already_present.extend(base + p for p in other.already_present)
        self.retry.extend(base + p for p in other.retry)
        self.rejected.update({base + p: r for p, r in other.rejected.items()})
        self.retry_reason = self.retry_reason or other.retry_reason
        self.refusal = self.refusal or other.refusal


@dataclass(frozen=True, slots=True)
class TooLarge:
    """A whole request refused for its size (HTTP 413): ``body_bytes`` is what was sent."""

    body_bytes: int
    detail: str


def now_iso() -> str:
    """UTC now in the generator's format: ``2026-11-24T10:00:00.123Z``."""
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def valid_timestamp(value: object) -> bool:
    """True for a UTC ISO-8601 timestamp that names a real day (e.g. not 2026-02-30)."""
    if not isinstance(value, str) or _TIMESTAMP_STR.fullmatch(value) is None:
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def make_doc(value: bytes | None, key: bytes | None, *, index_prefix: str, indexed_at: str,
             max_bytes: int) -> Doc | Rejected:
    """Validate one message value and turn it into a bulk document (or say why not).

    When the raw value is a single-line JSON object without an ``indexed_at`` field, the field
    is spliced into the bytes instead of re-encoding the whole object.
    """
    if value is None:
        return Rejected("not_json", "message has no value")
    if len(value) > max_bytes:
        return Rejected("oversized", f"value is {len(value)} bytes, limit {max_bytes}")
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return Rejected("not_json", str(exc)[:MAX_ERROR_CHARS])
    if not isinstance(obj, dict):
        return Rejected("not_object", f"value is a JSON {type(obj).__name__}, not an object")
    timestamp = obj.get("timestamp")
    if not valid_timestamp(timestamp):
        return Rejected("bad_timestamp",
                        f"timestamp {str(timestamp)[:100]!r} is not UTC ISO-8601")
    if key is not None:
        try:
            doc_id = key.decode("utf-8")
        except UnicodeDecodeError:
            return Rejected("bad_key", "message key is not UTF-8")
    else:
        log_id = obj.get("log_id")
        if not isinstance(log_id, str):
            return Rejected("no_id", "message has no key and no log_id")
        doc_id = log_id
    if not doc_id or len(doc_id.encode("utf-8")) > MAX_ID_BYTES:
        return Rejected("bad_id", f"document id must be 1..{MAX_ID_BYTES} bytes")
    assert isinstance(timestamp, str)
    if "indexed_at" in obj or b"\n" in value:
        obj["indexed_at"] = indexed_at
        source = orjson.dumps(obj)
    else:
        source = value[:value.rindex(b"}")] + _splice_suffix(indexed_at)
    return Doc(_index_for(index_prefix, timestamp[:10]), doc_id, source)


@lru_cache(maxsize=4)
def _splice_suffix(indexed_at: str) -> bytes:
    return b',"indexed_at":' + orjson.dumps(indexed_at) + b"}"


@lru_cache(maxsize=256)
def _index_for(prefix: str, date: str) -> str:
    return index_name(prefix, date)


def build_body(docs: Sequence[Doc]) -> bytes:
    """The NDJSON ``_bulk`` body: a ``create`` action line and a source line per document."""
    action_prefix: dict[str, bytes] = {}
    parts: list[bytes] = []
    append = parts.append
    for doc in docs:
        prefix = action_prefix.get(doc.index)
        if prefix is None:
            prefix = action_prefix[doc.index] = (
                b'{"create":{"_index":' + orjson.dumps(doc.index) + b',"_id":')
        append(prefix)
        append(orjson.dumps(doc.doc_id))
        append(b"}}\n")
        append(doc.source)
        append(b"\n")
    return b"".join(parts)


def split_docs(docs: list[Doc], chunks: int, max_bytes: int) -> list[list[Doc]]:
    """Split a batch into ``chunks`` contiguous parts of similar length (parallel requests),
    cutting further wherever a part's sources would exceed ``max_bytes``. Order is kept."""
    if not docs:
        return [docs]
    chunks = max(1, min(chunks, len(docs)))
    size = -(-len(docs) // chunks)
    parts: list[list[Doc]] = []
    for start in range(0, len(docs), size):
        current: list[Doc] = []
        total = 0
        for doc in docs[start:start + size]:
            # +200 for the action line and newlines.
            cost = len(doc.source) + 200
            if current and total + cost > max_bytes:
                parts.append(current)
                current, total = [], 0
            current.append(doc)
            total += cost
        parts.append(current)
    return parts


def send_in_parts(docs: list[Doc], send: Callable[[list[Doc]], BulkOutcome | TooLarge],
                  ) -> BulkOutcome:
    """``send(docs)``; where the request is too large, send each half the same way at once.

    A size limit is not overload: waiting would not help, and the halves go out without a
    backoff. A document refused on its own can never be indexed through this endpoint and is
    rejected ``too_large`` (dead-lettered). Positions are relative to ``docs``.
    """
    answer = send(docs)
    if isinstance(answer, BulkOutcome):
        return answer
    if len(docs) == 1:
        return BulkOutcome(rejected={0: Rejected(
            "too_large", f"a bulk request holding only this document ({answer.body_bytes} "
                         f"bytes) was refused: {answer.detail}"[:MAX_ERROR_CHARS])})
    middle = len(docs) // 2
    outcome = BulkOutcome()
    outcome.add(send_in_parts(docs[:middle], send), 0)
    outcome.add(send_in_parts(docs[middle:], send), middle)
    return outcome


def error_text(error: object) -> str:
    """``type: reason (caused by: ...)`` from an item's error object, truncated."""
    if not isinstance(error, Mapping):
        return str(error)[:MAX_ERROR_CHARS]
    text = f"{error.get('type', 'unknown')}: {error.get('reason', '')}"
    cause = error.get("caused_by")
    if isinstance(cause, Mapping):
        text += f" (caused by {cause.get('type', '')}: {cause.get('reason', '')})"
    return text[:MAX_ERROR_CHARS]


def classify_item(status: int, error: object) -> tuple[str, str]:
    """One bulk item -> (``created`` | ``already_present`` | ``retry`` | ``reject`` |
    ``refuse``, reason).

    The reason is a short code: the retry cause, or the dead-letter ``logpipe.reason``.
    """
    if 200 <= status < 300:
        return "created", ""
    err_type = str(error.get("type", "")) if isinstance(error, Mapping) else ""
    if status == 409:
        return "already_present", ""
    if status == 403 and err_type == "security_exception":
        # The writer role lacks a privilege on this index: configuration, not data.
        return "refuse", err_type
    if status == 429 or status >= 500 or err_type in RETRIABLE_ERROR_TYPES:
        return "retry", err_type or f"http_{status}"
    if status == 400:
        if err_type in _MAPPING_ERROR_TYPES:
            return "reject", "mapping_error"
        if err_type == "illegal_argument_exception":
            return "reject", "illegal_argument"
        return "reject", "rejected"
    # 401/404 and the like are about credentials or the cluster, not this document: keep
    # retrying (the log shows why) rather than dead-letter the whole stream.
    return "retry", err_type or f"http_{status}"


def classify(response: Mapping[str, Any], docs: Sequence[Doc]) -> BulkOutcome:
    """Match a ``_bulk`` response to the request's documents by ``_index`` + ``_id``.

    Documents without a matching item are retried. Several documents with the same id (a
    duplicate message in one batch) take the items for that id in order.
    """
    outcome = BulkOutcome()
    items = response.get("items")
    if not isinstance(items, list):
        outcome.retry = list(range(len(docs)))
        outcome.retry_reason = "no_items"
        return outcome
    if response.get("errors") is False and len(items) == len(docs):
        # Fast path: every item succeeded, so which item is which does not matter.
        outcome.created = list(range(len(docs)))
        return outcome

    by_key: dict[tuple[str, str], deque[int]] = defaultdict(deque)
    by_id: dict[str, deque[int]] = defaultdict(deque)
    for request_pos, doc in enumerate(docs):
        by_key[(doc.index, doc.doc_id)].append(request_pos)
        by_id[doc.doc_id].append(request_pos)
    seen: set[int] = set()
    for item in items:
        if not isinstance(item, Mapping) or not item:
            continue
        result = next(iter(item.values()))
        if not isinstance(result, Mapping):
            continue
        doc_id = result.get("_id")
        index = result.get("_index")
        if not isinstance(doc_id, str):
            continue
        pos: int | None = _take(by_key.get((str(index), doc_id)), seen)
        if pos is None:
            # The index in the answer can differ from the request (an alias or a reroute); the
            # id alone still identifies the document.
            pos = _take(by_id.get(doc_id), seen)
        if pos is None:
            continue
        seen.add(pos)
        status = result.get("status")
        error = result.get("error")
        verdict, reason = classify_item(status if isinstance(status, int) else 0, error)
        if verdict == "created":
            outcome.created.append(pos)
        elif verdict == "already_present":
            outcome.already_present.append(pos)
        elif verdict == "retry":
            outcome.retry.append(pos)
            outcome.retry_reason = outcome.retry_reason or reason
        elif verdict == "refuse":
            outcome.retry.append(pos)
            outcome.retry_reason = outcome.retry_reason or reason
            if outcome.refusal is None:
                outcome.refusal = Refusal(ES_PRIVILEGE, "host", "",
                                          f"HTTP 403: {error_text(error)}")
        else:
            outcome.rejected[pos] = Rejected(reason, error_text(error))
    missing = [pos for pos in range(len(docs)) if pos not in seen]
    if missing:
        outcome.retry.extend(missing)
        outcome.retry.sort()
        outcome.retry_reason = outcome.retry_reason or "missing_item"
    return outcome


def _take(queue: deque[int] | None, seen: set[int]) -> int | None:
    while queue:
        pos = queue.popleft()
        if pos not in seen:
            return pos
    return None


def backoff_s(attempt: int, initial_s: float, max_s: float, jitter: float) -> float:
    """Exponential backoff for retry ``attempt`` (0-based) with ``jitter`` in [0, 1) applied as
    "equal jitter": half fixed, half random, so retries never collapse to zero wait."""
    base = min(max_s, initial_s * float(2 ** min(attempt, 30)))
    return float(base / 2 + base / 2 * jitter)
