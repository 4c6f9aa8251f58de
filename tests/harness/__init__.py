"""Test harness: real Kafka and Elasticsearch servers on loopback (see servers.py)."""

from .servers import ElasticsearchNode, HarnessError, KafkaCluster, free_port

__all__ = ["ElasticsearchNode", "HarnessError", "KafkaCluster", "free_port"]
