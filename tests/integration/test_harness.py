"""The harness itself: real Kafka and Elasticsearch answer, and Elasticsearch keeps its data
across a stop/start (the outage tests rely on it)."""

from __future__ import annotations

import uuid

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import NewTopic
from harness.servers import QUIET_RDKAFKA, ElasticsearchNode, KafkaCluster


def test_kafka_produce_and_consume(kafka: KafkaCluster) -> None:
    topic = f"smoke-{uuid.uuid4().hex[:8]}"
    admin = kafka.admin()
    admin.create_topics([NewTopic(topic, 2, 1)])[topic].result(timeout=30)
    sent = {f"k{i}": f"v{i}" for i in range(20)}
    producer = Producer({"bootstrap.servers": kafka.bootstrap_servers, "acks": "all",
                         "logger": QUIET_RDKAFKA})
    for k, v in sent.items():
        producer.produce(topic, key=k, value=v)
    assert producer.flush(30) == 0, "messages still queued after flush"

    consumer = Consumer({"bootstrap.servers": kafka.bootstrap_servers,
                         "group.id": f"smoke-{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False,
                         "logger": QUIET_RDKAFKA})
    got: dict[str, str] = {}
    try:
        consumer.subscribe([topic])
        for _ in range(60):
            for msg in consumer.consume(100, 1.0):
                assert msg.error() is None, msg.error()
                got[msg.key().decode()] = msg.value().decode()
            if len(got) >= len(sent):
                break
    finally:
        consumer.close()
    assert got == sent
    # auto.create.topics.enable=false: a typo in a topic name must not create a topic.
    md = admin.list_topics(timeout=10)
    assert "no-such-topic" not in md.topics


def test_elasticsearch_index_search_and_survive_restart(elasticsearch: ElasticsearchNode
                                                        ) -> None:
    es = elasticsearch.client()
    index = f"smoke-{uuid.uuid4().hex[:8]}"
    es.indices.create(index=index, settings={"number_of_shards": 1, "number_of_replicas": 0})
    es.index(index=index, id="a1", document={"msg": "hello harness"}, refresh=True)
    hits = es.search(index=index, query={"match": {"msg": "harness"}})["hits"]["hits"]
    assert [h["_id"] for h in hits] == ["a1"]

    elasticsearch.stop()
    assert not elasticsearch.running
    elasticsearch.start()
    es = elasticsearch.client()
    es.cluster.health(index=index, wait_for_status="yellow", timeout="30s")
    assert es.get(index=index, id="a1")["_source"] == {"msg": "hello harness"}
    es.indices.delete(index=index)
