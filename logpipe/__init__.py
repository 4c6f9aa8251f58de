"""logpipe: web access logs from a Faker producer through Kafka into Elasticsearch."""

__version__ = "0.1.0"
