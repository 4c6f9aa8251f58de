"""Bulk documents, NDJSON bodies and classification of real-shaped Elasticsearch 8 answers."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from logpipe.bulk import (
    MAX_ID_BYTES,
    BulkOutcome,
    Doc,
    Rejected,
    TooLarge,
    backoff_s,
    build_body,
    classify,
    classify_item,
    make_doc,
    now_iso,
    send_in_parts,
    split_docs,
    valid_timestamp,
)

INDEXED_AT = "2026-11-24T10:00:05.000Z"
EVENT = {
    "log_id": "019ab6f0-0000-7000-8000-000000000001",
    "timestamp": "2026-11-24T10:00:00.123Z",
    "client_ip": "203.0.113.7",
    "method": "GET",
    "endpoint": "/api/items?q=a b",
    "http_version": "HTTP/1.1",
    "status": 200,
    "bytes": 5120,
    "response_time_ms": 12.5,
    "user_agent": "Mozilla/5.0 \"quoted\"",
    "referrer": "-",
    "host": "web-01",
}


def doc_for(value: bytes, key: bytes | None = b"k1", max_bytes: int = 1 << 20) -> Doc | Rejected:
    return make_doc(value, key, index_prefix="web-logs-topic", indexed_at=INDEXED_AT,
                    max_bytes=max_bytes)


def as_doc(result: Doc | Rejected) -> Doc:
    assert isinstance(result, Doc), result
    return result


def as_rejected(result: Doc | Rejected) -> Rejected:
    assert isinstance(result, Rejected), result
    return result


# -- make_doc --------------------------------------------------------------------------------


def test_doc_index_id_and_source() -> None:
    doc = as_doc(doc_for(orjson.dumps(EVENT), key=str(EVENT["log_id"]).encode()))
    assert doc.index == "web-logs-topic-2026.11.24"
    assert doc.doc_id == EVENT["log_id"]
    assert orjson.loads(doc.source) == {**EVENT, "indexed_at": INDEXED_AT}
    assert b"\n" not in doc.source


def test_index_follows_event_time_not_wall_clock() -> None:
    event = {**EVENT, "timestamp": "2019-01-31T23:59:59.999Z"}
    assert as_doc(doc_for(orjson.dumps(event))).index == "web-logs-topic-2019.01.31"


def test_splice_with_trailing_whitespace() -> None:
    doc = as_doc(doc_for(orjson.dumps(EVENT) + b"  \t"))
    assert orjson.loads(doc.source)["indexed_at"] == INDEXED_AT


def test_pretty_printed_value_is_reencoded_on_one_line() -> None:
    doc = as_doc(doc_for(orjson.dumps(EVENT, option=orjson.OPT_INDENT_2)))
    assert b"\n" not in doc.source
    assert orjson.loads(doc.source) == {**EVENT, "indexed_at": INDEXED_AT}


def test_existing_indexed_at_is_replaced_not_duplicated() -> None:
    doc = as_doc(doc_for(orjson.dumps({**EVENT, "indexed_at": "old"})))
    assert doc.source.count(b"indexed_at") == 1
    assert orjson.loads(doc.source)["indexed_at"] == INDEXED_AT


def test_missing_key_falls_back_to_log_id() -> None:
    assert as_doc(doc_for(orjson.dumps(EVENT), key=None)).doc_id == EVENT["log_id"]


@pytest.mark.parametrize(("value", "key", "reason"), [
    (b"\xff\xfe not utf-8", b"k", "not_json"),
    (b"{not json", b"k", "not_json"),
    (b"[1, 2]", b"k", "not_object"),
    (b'"a string"', b"k", "not_object"),
    (orjson.dumps({**EVENT, "timestamp": None}), b"k", "bad_timestamp"),
    (orjson.dumps({k: v for k, v in EVENT.items() if k != "timestamp"}), b"k", "bad_timestamp"),
    (orjson.dumps({**EVENT, "timestamp": "2026-11-24"}), b"k", "bad_timestamp"),
    (orjson.dumps({**EVENT, "timestamp": "2026-02-30T10:00:00Z"}), b"k", "bad_timestamp"),
    (orjson.dumps({**EVENT, "timestamp": "2026-11-24T23:00:00+02:00"}), b"k", "bad_timestamp"),
    (orjson.dumps({**EVENT, "timestamp": 1732442400}), b"k", "bad_timestamp"),
    (orjson.dumps({k: v for k, v in EVENT.items() if k != "log_id"}), None, "no_id"),
    (orjson.dumps(EVENT), b"\xff\xfe", "bad_key"),
    (orjson.dumps(EVENT), b"", "bad_id"),
    (orjson.dumps(EVENT), b"x" * (MAX_ID_BYTES + 1), "bad_id"),
])
def test_undecodable_messages_are_rejected(value: bytes, key: bytes | None, reason: str) -> None:
    assert as_rejected(doc_for(value, key)).reason == reason


def test_missing_value_is_rejected() -> None:
    assert as_rejected(make_doc(None, b"k", index_prefix="p", indexed_at=INDEXED_AT,
                                max_bytes=10)).reason == "not_json"


def test_oversized_is_rejected_before_parsing() -> None:
    value = orjson.dumps(EVENT)
    assert as_rejected(doc_for(value, max_bytes=len(value) - 1)).reason == "oversized"
    assert isinstance(doc_for(value, max_bytes=len(value)), Doc)


def test_timestamp_validation() -> None:
    assert valid_timestamp("2026-11-24T10:00:00.123Z")
    assert valid_timestamp("2026-11-24T10:00:00Z")
    assert valid_timestamp("2026-11-24T10:00:00.123456+00:00")
    assert not valid_timestamp("2026-13-01T10:00:00Z")
    assert not valid_timestamp("2026-11-24 10:00:00Z")
    assert not valid_timestamp("20261124T100000Z")
    assert not valid_timestamp(" 2026-11-24T10:00:00Z")
    assert valid_timestamp(now_iso())


# -- build_body ------------------------------------------------------------------------------


def test_body_is_ndjson_create_pairs() -> None:
    docs = [
        as_doc(doc_for(orjson.dumps({**EVENT, "log_id": f"id-{i}"}), key=f"id-{i}".encode()))
        for i in range(3)
    ]
    body = build_body(docs)
    assert body.endswith(b"\n")
    lines = body.split(b"\n")[:-1]
    assert len(lines) == 6
    for i, doc in enumerate(docs):
        action = orjson.loads(lines[2 * i])
        assert action == {"create": {"_index": "web-logs-topic-2026.11.24", "_id": f"id-{i}"}}
        source = orjson.loads(lines[2 * i + 1])
        assert source["log_id"] == f"id-{i}"
        assert source["indexed_at"] == INDEXED_AT
        assert lines[2 * i + 1] == doc.source


def test_body_escapes_ids_and_indices() -> None:
    doc = Doc('idx-"q"', 'id "with" quotes\\', b'{"a":1}')
    action = orjson.loads(build_body([doc]).split(b"\n")[0])
    assert action == {"create": {"_index": 'idx-"q"', "_id": 'id "with" quotes\\'}}


def test_empty_body() -> None:
    assert build_body([]) == b""


# -- classify --------------------------------------------------------------------------------

IDX = "web-logs-topic-2026.11.24"


def docs_named(*ids: str, index: str = IDX) -> list[Doc]:
    return [Doc(index, i, b"{}") for i in ids]


def item(doc_id: str, status: int, error: dict[str, Any] | None = None,
         index: str = IDX) -> dict[str, Any]:
    result: dict[str, Any] = {"_index": index, "_id": doc_id, "status": status}
    if status in (200, 201):
        result.update({"_version": 1, "result": "created", "_seq_no": 0, "_primary_term": 1,
                       "_shards": {"total": 2, "successful": 1, "failed": 0}})
    if error is not None:
        result["error"] = error
    return {"create": result}


REJECTED_429 = {
    "type": "es_rejected_execution_exception",
    "reason": "rejected execution of coordinating operation [coordinating_and_primary_bytes=0, "
              "replica_bytes=0, all_bytes=0, coordinating_operation_bytes=5000, "
              "max_coordinating_and_primary_bytes=4000]",
}
CONFLICT_409 = {
    "type": "version_conflict_engine_exception",
    "reason": "[a]: version conflict, document already exists (current version [1])",
    "index_uuid": "x2b7CIrFQOaiT0S2cJ8qVQ", "shard": "0", "index": IDX,
}
MAPPING_400 = {
    "type": "document_parsing_exception",
    "reason": "[1:42] failed to parse field [status] of type [short] in document with id 'c'. "
              "Preview of field's value: 'abc'",
    "caused_by": {"type": "number_format_exception", "reason": "For input string: \"abc\""},
}
UNAVAILABLE_503 = {
    "type": "unavailable_shards_exception",
    "reason": "[web-logs-topic-2026.11.24][0] primary shard is not active Timeout: [1m]",
}


def test_all_created_fast_path() -> None:
    docs = docs_named("a", "b")
    response = {"took": 3, "errors": False, "items": [item("a", 201), item("b", 201)]}
    outcome = classify(response, docs)
    assert outcome.created == [0, 1]
    assert not outcome.retry and not outcome.rejected and not outcome.already_present


def test_mixed_response_matched_by_id_not_position() -> None:
    docs = docs_named("a", "b", "c", "d", "e")
    # Items deliberately out of order: position would mis-attribute every result.
    response = {"errors": True, "items": [
        item("e", 503, UNAVAILABLE_503),
        item("c", 400, MAPPING_400),
        item("a", 201),
        item("d", 429, REJECTED_429),
        item("b", 409, CONFLICT_409),
    ]}
    outcome = classify(response, docs)
    assert outcome.created == [0]
    assert outcome.already_present == [1]
    assert sorted(outcome.retry) == [3, 4]
    assert list(outcome.rejected) == [2]
    rejected = outcome.rejected[2]
    assert rejected.reason == "mapping_error"
    assert "document_parsing_exception" in rejected.error
    assert "number_format_exception" in rejected.error
    assert outcome.retry_reason in ("unavailable_shards_exception",
                                    "es_rejected_execution_exception")


def test_conflict_is_already_present() -> None:
    outcome = classify({"errors": True, "items": [item("a", 409, CONFLICT_409)]},
                       docs_named("a"))
    assert outcome.already_present == [0]


def test_missing_item_is_retried() -> None:
    outcome = classify({"errors": True, "items": [item("a", 201)]}, docs_named("a", "b"))
    assert outcome.created == [0]
    assert outcome.retry == [1]
    assert outcome.retry_reason == "missing_item"


def test_fewer_items_without_errors_is_not_all_created() -> None:
    outcome = classify({"errors": False, "items": [item("b", 201)]}, docs_named("a", "b"))
    assert outcome.created == [1]
    assert outcome.retry == [0]


def test_response_without_items_retries_everything() -> None:
    outcome = classify({"error": {"type": "x"}, "status": 500}, docs_named("a", "b"))
    assert outcome.retry == [0, 1]


def test_same_id_in_two_indices() -> None:
    docs = [Doc("web-logs-topic-2026.11.23", "a", b"{}"), Doc("web-logs-topic-2026.11.24", "a",
                                                               b"{}")]
    response = {"errors": True, "items": [
        item("a", 429, REJECTED_429, index="web-logs-topic-2026.11.24"),
        item("a", 201, index="web-logs-topic-2026.11.23"),
    ]}
    outcome = classify(response, docs)
    assert outcome.created == [0]
    assert outcome.retry == [1]


def test_duplicate_id_in_one_batch() -> None:
    docs = docs_named("a", "a")
    response = {"errors": True, "items": [item("a", 201), item("a", 409, CONFLICT_409)]}
    outcome = classify(response, docs)
    assert sorted(outcome.created + outcome.already_present) == [0, 1]


def test_index_in_answer_differs_falls_back_to_id() -> None:
    outcome = classify({"errors": True, "items": [item("a", 201, index="concrete-000001")]},
                       docs_named("a"))
    assert outcome.created == [0]


def test_unknown_ids_in_answer_are_ignored() -> None:
    outcome = classify({"errors": True, "items": [item("zzz", 201), item("a", 201)]},
                       docs_named("a", "b"))
    assert outcome.created == [0]
    assert outcome.retry == [1]


@pytest.mark.parametrize(("status", "error", "verdict", "reason"), [
    (201, None, "created", ""),
    (200, None, "created", ""),
    (409, CONFLICT_409, "already_present", ""),
    (429, REJECTED_429, "retry", "es_rejected_execution_exception"),
    (503, UNAVAILABLE_503, "retry", "unavailable_shards_exception"),
    (500, {"type": "null_pointer_exception", "reason": None}, "retry", "null_pointer_exception"),
    (502, None, "retry", "http_502"),
    (400, MAPPING_400, "reject", "mapping_error"),
    (400, {"type": "mapper_parsing_exception", "reason": "failed to parse"}, "reject",
     "mapping_error"),
    (400, {"type": "strict_dynamic_mapping_exception", "reason": "[x] not allowed"}, "reject",
     "mapping_error"),
    (400, {"type": "illegal_argument_exception",
           "reason": "Limit of total fields [1000] has been exceeded"}, "reject",
     "illegal_argument"),
    (400, {"type": "x_content_parse_exception", "reason": "bad"}, "reject", "rejected"),
    (403, {"type": "cluster_block_exception",
           "reason": "index [x] blocked by: [FORBIDDEN/8/index write (api)];"}, "retry",
     "cluster_block_exception"),
    (429, {"type": "cluster_block_exception",
           "reason": "index [x] blocked by: [TOO_MANY_REQUESTS/12/disk usage exceeded "
                     "flood-stage watermark, index has read-only-allow-delete block];"},
     "retry", "cluster_block_exception"),
    (401, {"type": "security_exception", "reason": "unable to authenticate"}, "retry",
     "security_exception"),
    (404, {"type": "index_not_found_exception", "reason": "no such index"}, "retry",
     "index_not_found_exception"),
])
def test_classify_item(status: int, error: dict[str, Any] | None, verdict: str,
                       reason: str) -> None:
    assert classify_item(status, error) == (verdict, reason)


def test_error_text_is_truncated() -> None:
    long_error = {"type": "mapper_parsing_exception", "reason": "x" * 5000}
    outcome = classify({"errors": True, "items": [item("a", 400, long_error)]}, docs_named("a"))
    assert len(outcome.rejected[0].error) <= 1000


# -- backoff ---------------------------------------------------------------------------------


def test_backoff_grows_and_is_capped() -> None:
    waits = [backoff_s(n, 0.5, 30.0, jitter=1.0) for n in range(10)]
    assert waits[:4] == [0.5, 1.0, 2.0, 4.0]
    assert max(waits) == 30.0
    assert backoff_s(1000, 0.5, 30.0, jitter=1.0) == 30.0


def test_backoff_jitter_keeps_at_least_half() -> None:
    assert backoff_s(3, 0.5, 30.0, jitter=0.0) == 2.0
    assert 2.0 <= backoff_s(3, 0.5, 30.0, jitter=0.5) <= 4.0


# -- split_docs ------------------------------------------------------------------------------


def sized(n: int, size: int = 100) -> list[Doc]:
    return [Doc(IDX, f"id-{i}", b"x" * size) for i in range(n)]


def test_split_for_concurrency_keeps_order_and_everything() -> None:
    docs = sized(10)
    parts = split_docs(docs, 3, max_bytes=1 << 20)
    assert [len(p) for p in parts] == [4, 4, 2]
    assert [d for p in parts for d in p] == docs


def test_split_by_bytes_bounds_each_request() -> None:
    docs = sized(10, size=1000)
    parts = split_docs(docs, 1, max_bytes=3 * 1200)
    assert [len(p) for p in parts] == [3, 3, 3, 1]
    assert [d for p in parts for d in p] == docs


def test_split_never_leaves_an_oversized_doc_out() -> None:
    docs = sized(2, size=10_000)
    assert [len(p) for p in split_docs(docs, 1, max_bytes=100)] == [1, 1]


def test_split_single_chunk_and_empty() -> None:
    docs = sized(5)
    assert split_docs(docs, 1, max_bytes=1 << 20) == [docs]
    assert split_docs([], 4, max_bytes=100) == [[]]


# -- send_in_parts (413) -----------------------------------------------------------------------


class LimitedEndpoint:
    """Answers like an endpoint with a body size limit: TooLarge over ``limit`` bytes, else
    every document created (or the ids in ``retry`` retried)."""

    def __init__(self, limit: int, retry: frozenset[str] = frozenset()) -> None:
        self.limit = limit
        self.retry = retry
        self.requests: list[list[str]] = []
        self.created: list[str] = []

    def __call__(self, docs: list[Doc]) -> BulkOutcome | TooLarge:
        self.requests.append([d.doc_id for d in docs])
        size = len(build_body(docs))
        if size > self.limit:
            return TooLarge(size, "HTTP 413")
        outcome = BulkOutcome()
        for pos, doc in enumerate(docs):
            if doc.doc_id in self.retry:
                outcome.retry.append(pos)
                outcome.retry_reason = "es_rejected_execution_exception"
            else:
                outcome.created.append(pos)
                self.created.append(doc.doc_id)
        return outcome


def test_under_the_limit_is_one_request() -> None:
    docs = sized(8)
    send = LimitedEndpoint(limit=1 << 20)
    outcome = send_in_parts(docs, send)
    assert outcome.created == list(range(8))
    assert len(send.requests) == 1


def test_too_large_request_is_halved_until_the_parts_fit() -> None:
    docs = sized(8)
    send = LimitedEndpoint(limit=len(build_body(docs[:2])))
    outcome = send_in_parts(docs, send)
    assert sorted(outcome.created) == list(range(8))
    assert not outcome.rejected and not outcome.retry
    # Every document indexed exactly once, in order; the refused requests held 8, 4 and 4.
    assert send.created == [d.doc_id for d in docs]
    assert [len(r) for r in send.requests] == [8, 4, 2, 2, 4, 2, 2]


def test_a_document_too_large_alone_is_rejected_and_the_rest_indexed() -> None:
    docs = sized(5)
    docs[3] = Doc(IDX, "big", b"x" * 5000)
    send = LimitedEndpoint(limit=1000)
    outcome = send_in_parts(docs, send)
    assert set(outcome.rejected) == {3}
    rejected = outcome.rejected[3]
    assert rejected.reason == "too_large"
    assert "HTTP 413" in rejected.error and str(len(build_body([docs[3]]))) in rejected.error
    assert sorted(outcome.created) == [0, 1, 2, 4]
    assert send.created == ["id-0", "id-1", "id-2", "id-4"]
    assert send.requests.count(["big"]) == 1, "a refused single document is not resent"


def test_positions_of_retries_map_back_through_the_halves() -> None:
    docs = sized(6)
    send = LimitedEndpoint(limit=len(build_body(docs[:3])), retry=frozenset({"id-4"}))
    outcome = send_in_parts(docs, send)
    assert outcome.retry == [4]
    assert outcome.retry_reason == "es_rejected_execution_exception"
    assert sorted(outcome.created) == [0, 1, 2, 3, 5]
