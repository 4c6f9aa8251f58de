"""Elasticsearch client construction and the index naming rule.

Documents go to a daily index named from the event's own timestamp (see docs/DESIGN.md: a replay
must land in the same index as the first copy so `create` answers 409).
"""

from __future__ import annotations

from elasticsearch import Elasticsearch

from logpipe.config import ElasticsearchConfig, read_secret


def make_client(cfg: ElasticsearchConfig, **kwargs: object) -> Elasticsearch:
    auth: dict[str, object] = {}
    if cfg.api_key_file:
        auth["api_key"] = read_secret(cfg.api_key_file, "elasticsearch.api_key_file")
    elif cfg.username:
        password = (read_secret(cfg.password_file, "elasticsearch.password_file")
                    if cfg.password_file else "")
        auth["basic_auth"] = (cfg.username, password)
    if cfg.ca_certs:
        auth["ca_certs"] = cfg.ca_certs
    return Elasticsearch(
        cfg.hosts,
        request_timeout=cfg.request_timeout_s,
        verify_certs=cfg.verify_certs,
        # Retries are the consumer's job (per item, with backoff, while polling Kafka).
        max_retries=0,
        retry_on_timeout=False,
        **auth,  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )


def index_name(prefix: str, timestamp: str) -> str:
    """``web-logs-topic`` + ``2026-11-24T10:00:00.123Z`` -> ``web-logs-topic-2026.11.24``.

    The timestamp is the generator's UTC ISO-8601 string; only its date part is used, so this
    is a cheap slice rather than a parse on the hot path. Callers validate the format first.
    """
    return f"{prefix}-{timestamp[0:4]}.{timestamp[5:7]}.{timestamp[8:10]}"


def index_pattern(prefix: str) -> str:
    return f"{prefix}-*"
