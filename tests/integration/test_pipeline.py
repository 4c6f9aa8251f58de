"""End to end through the CLI on real servers: produce -> Kafka -> consume -> Elasticsearch.

The truth is read from the servers themselves: the keys actually in the topic, the committed
offsets of the group, the document ids actually in the daily indices.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from harness.pipeline import Comparison, Pipeline, record
from harness.servers import ElasticsearchNode, KafkaCluster

TEN_K = 10_000


@dataclass
class Loaded:
    pipeline: Pipeline
    keys: list[str]
    first: Comparison
    first_run_s: float
    produce_s: float


@pytest.fixture(scope="module")
def ten_k(kafka: KafkaCluster, elasticsearch: ElasticsearchNode,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    """10,000 logs produced and consumed once (shared by the first-pass and replay tests)."""
    p = Pipeline(kafka, elasticsearch, tmp_path_factory.mktemp("ten-k"), "ten-k", partitions=6)
    p.bootstrap()
    produced = p.produce(TEN_K)
    keys = p.topic_keys()
    assert len(keys) == TEN_K, f"topic holds {len(keys)} messages after producing {TEN_K}"
    assert len(set(keys)) == TEN_K, f"only {len(set(keys))} distinct keys among {TEN_K} messages"
    consumed = p.consume_all(batch_size=500)
    yield Loaded(p, keys, p.compare(keys), consumed.seconds, produced.seconds)
    if p._es is not None:
        p._es.close()


@pytest.mark.slow
def test_ten_thousand_logs_arrive_exactly_once(ten_k: Loaded) -> None:
    p, cmp = ten_k.pipeline, ten_k.first
    committed, ends = p.committed(), p.end_offsets()
    record("ten_thousand", produced=TEN_K, documents=cmp.documents,
           missing=len(cmp.missing), unexpected=len(cmp.unexpected),
           duplicates=len(cmp.duplicates), produce_s=round(ten_k.produce_s, 1),
           consume_s=round(ten_k.first_run_s, 1), committed=sum(committed.values()),
           end=sum(ends.values()))
    assert cmp.exact, cmp.describe()
    assert cmp.documents == TEN_K
    assert committed == ends, f"committed offsets {committed} != end offsets {ends}"

    # Daily indices named from the event timestamp, every one of them under the alias.
    indices = set(p.es.indices.get(index=f"{p.index}-*"))
    assert indices, "no daily index was created"
    daily = re.compile(re.escape(p.index) + r"-\d{4}\.\d{2}\.\d{2}\Z")
    assert all(daily.match(i) for i in indices), f"unexpected index names: {sorted(indices)}"
    aliased = set(p.es.indices.get_alias(name=p.index))
    assert indices <= aliased, f"indices {sorted(indices - aliased)} are not under alias {p.index}"
    assert int(p.es.count(index=p.index)["count"]) == TEN_K

    # The document id is the log_id inside the document.
    hits = p.es.search(index=p.index, size=50, source=["log_id"])["hits"]["hits"]
    assert hits and all(h["_id"] == h["_source"]["log_id"] for h in hits)


@pytest.mark.slow
def test_replay_from_earliest_is_idempotent(ten_k: Loaded) -> None:
    p = ten_k.pipeline
    p.reset_group(0)
    again = p.consume_all(batch_size=500)
    shutdown = again.events("shutdown")
    assert shutdown, f"no shutdown event in the consumer log:\n{again.stderr[-3000:]}"
    indexed = int(shutdown[-1].get("indexed", -1))
    present = int(shutdown[-1].get("already_present", -1))
    cmp = p.compare(ten_k.keys)
    record("replay_from_earliest", documents=cmp.documents, indexed_again=indexed,
           already_present=present, duplicates=len(cmp.duplicates), missing=len(cmp.missing))
    assert cmp.exact, cmp.describe()
    assert cmp.documents == TEN_K
    assert indexed == 0, f"a replay created {indexed} new documents"
    assert present == TEN_K, f"{present} of {TEN_K} replayed messages counted as already present"
    assert p.committed() == p.end_offsets()
    assert not p.duplicate_log_ids()


def test_status_and_check_after_a_full_run(pipeline: Pipeline) -> None:
    pipeline.bootstrap()
    pipeline.produce(200)
    pipeline.consume_all(batch_size=100)
    status = pipeline.cli("status")
    out = status.stdout + status.stderr
    assert pipeline.topic in out, f"status does not name the topic:\n{out}"
    check = pipeline.cli("check", check=False)
    assert check.returncode == 0, f"check is not OK with lag 0:\n{check.describe()}"
    # Lag appears once messages are waiting: produce without consuming and check again.
    pipeline.produce(50)
    lagging = pipeline.cli("check", "--max-lag", "10", check=False)
    record("status_check", check_ok=check.returncode, check_with_lag=lagging.returncode)
    assert lagging.returncode in (1, 2), (
        f"check with 50 waiting and --max-lag 10 should warn or be critical:\n"
        f"{lagging.describe()}")


def test_two_seeded_runs_make_twice_the_documents(pipeline: Pipeline) -> None:
    pipeline.bootstrap()
    pipeline.produce(500, seed=42)
    first_keys = set(pipeline.topic_keys())
    pipeline.produce(500, seed=42)
    keys = pipeline.topic_keys()
    assert len(keys) == 1000
    second_keys = set(keys) - first_keys
    assert len(second_keys) == 500, "the second seeded run reused log_ids of the first"
    pipeline.consume_all(batch_size=250)
    cmp = pipeline.compare(keys)
    record("seeded_twice", documents=cmp.documents, distinct_ids=len(set(keys)),
           duplicates=len(cmp.duplicates))
    assert cmp.exact, cmp.describe()
    assert cmp.documents == 1000
