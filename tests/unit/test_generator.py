"""The fake access-log generator: field types, distributions, seeds and ids."""

from __future__ import annotations

import collections
import ipaddress
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from logpipe import es
from logpipe.generator import FIELDS, LogGenerator, format_timestamp, new_log_id

TS_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


@pytest.fixture(scope="module")
def logs() -> list[dict[str, Any]]:
    return LogGenerator(seed=7).batch(20_000)


def _content(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k not in ("log_id", "timestamp")}


def test_fields_and_types(logs: list[dict[str, Any]]) -> None:
    for doc in logs[:2000]:
        assert tuple(doc) == FIELDS
        assert isinstance(doc["status"], int) and 100 <= doc["status"] <= 599
        assert isinstance(doc["bytes"], int) and doc["bytes"] >= 0
        assert isinstance(doc["response_time_ms"], float) and doc["response_time_ms"] > 0
        assert doc["method"] in {"GET", "POST", "PUT", "DELETE", "HEAD", "PATCH"}
        assert doc["http_version"] in {"HTTP/1.0", "HTTP/1.1", "HTTP/2.0"}
        assert doc["endpoint"].startswith("/")
        assert doc["user_agent"] and doc["host"] and doc["referrer"]
        assert doc["referrer"] == "-" or doc["referrer"].startswith("http")
        ipaddress.ip_address(doc["client_ip"])
        assert uuid.UUID(doc["log_id"]).version == 7


def test_head_and_not_modified_have_no_body(logs: list[dict[str, Any]]) -> None:
    empty = [d for d in logs if d["method"] == "HEAD" or d["status"] in (204, 304)]
    assert empty, "sample too small to contain HEAD/304"
    assert all(d["bytes"] == 0 for d in empty)


def test_ipv6_share_present_but_minor(logs: list[dict[str, Any]]) -> None:
    versions = collections.Counter(ipaddress.ip_address(d["client_ip"]).version for d in logs)
    share = versions[6] / len(logs)
    assert 0.01 < share < 0.4, versions


def test_status_distribution_is_weighted(logs: list[dict[str, Any]]) -> None:
    classes = collections.Counter(d["status"] // 100 for d in logs)
    ok = (classes[2] + classes[3]) / len(logs)
    assert ok > 0.8, classes
    assert classes[4] > 0 and classes[5] > 0, classes
    assert classes[4] > classes[5], classes
    assert collections.Counter(d["status"] for d in logs).most_common(1)[0][0] == 200


def test_endpoint_popularity_is_skewed(logs: list[dict[str, Any]]) -> None:
    counts = collections.Counter(d["endpoint"] for d in logs).most_common()
    assert len(counts) > 30
    top, bottom = counts[0][1], counts[-1][1]
    assert top > 10 * bottom, counts[:3] + counts[-3:]


def test_post_only_on_forms_and_api(logs: list[dict[str, Any]]) -> None:
    posted = {d["endpoint"] for d in logs if d["method"] == "POST"}
    assert posted
    assert all(p.startswith("/api/") or p in {"/login", "/checkout", "/contact", "/logout",
                                              "/register"} for p in posted), posted


def test_seed_reproduces_content_but_not_ids() -> None:
    a = LogGenerator(seed=42).batch(500)
    b = LogGenerator(seed=42).batch(500)
    assert [_content(d) for d in a] == [_content(d) for d in b]
    assert not {d["log_id"] for d in a} & {d["log_id"] for d in b}


def test_different_seeds_differ() -> None:
    a = LogGenerator(seed=1).batch(200)
    b = LogGenerator(seed=2).batch(200)
    assert [_content(d) for d in a] != [_content(d) for d in b]


def test_ids_unique_across_100k() -> None:
    gen = LogGenerator(seed=3)
    ids = [d["log_id"] for d in gen.batch(100_000)]
    assert len(set(ids)) == len(ids)


def test_ids_time_ordered_within_and_across_generators() -> None:
    first = LogGenerator(seed=5)
    second = LogGenerator(seed=5)
    ids = [d["log_id"] for d in first.batch(5000)]
    ids += [second.generate()["log_id"] for _ in range(2000)]
    ids += [d["log_id"] for d in first.batch(5000)]
    # UUIDv7 strings sort like their 128-bit values: lexical order is time order.
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_id_carries_current_time() -> None:
    before = time.time_ns() // 1_000_000
    value = uuid.UUID(new_log_id()).int
    after = time.time_ns() // 1_000_000
    # The counter may borrow a millisecond or two under load; allow a little slack.
    assert before <= value >> 80 <= after + 5


def test_timestamp_format_parses_as_utc_now(logs: list[dict[str, Any]]) -> None:
    gen = LogGenerator(seed=None, max_jitter_ms=1000)
    now = datetime.now(UTC)
    for doc in gen.batch(1000):
        ts = doc["timestamp"]
        assert len(ts) == 24 and ts.endswith("Z") and ts[19] == "."
        parsed = datetime.strptime(ts, TS_FORMAT).replace(tzinfo=UTC)
        assert abs((parsed - now).total_seconds()) < 5
        assert datetime.fromisoformat(ts) == parsed
        assert es.index_name("web-logs-topic", ts) == f"web-logs-topic-{parsed:%Y.%m.%d}"


def test_format_timestamp() -> None:
    assert format_timestamp(1_795_514_400_123) == "2026-11-24T10:00:00.123Z"
    assert format_timestamp(0) == "1970-01-01T00:00:00.000Z"


def test_messages_key_is_log_id_and_value_is_the_json_doc() -> None:
    for key, value in LogGenerator(seed=9).messages(50):
        doc = orjson.loads(value)
        assert key == doc["log_id"].encode()
        assert tuple(doc) == FIELDS


def test_negative_jitter_rejected() -> None:
    with pytest.raises(ValueError, match="jitter"):
        LogGenerator(max_jitter_ms=-1)


def test_benchmark_prints_rate() -> None:
    """Not a timing assertion: prints logs/s for a quick look (`pytest -s`)."""
    gen = LogGenerator(seed=1)
    n = 50_000
    started = time.perf_counter()
    docs = gen.batch(n)
    dict_rate = n / (time.perf_counter() - started)
    started = time.perf_counter()
    msgs = gen.messages(n)
    msg_rate = n / (time.perf_counter() - started)
    print(f"generator dicts_per_s={dict_rate:.0f} messages_per_s={msg_rate:.0f}")
    assert len(docs) == len(msgs) == n
