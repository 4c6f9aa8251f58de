"""``logpipe bootstrap`` (and ``logpipe prune``): idempotent setup, safe on every deploy.

Kafka: the log topic and its dead-letter topic exist with the configured partitions,
replication and the topic configs logpipe manages (``min.insync.replicas``; a longer
``retention.ms`` for the DLQ, which people read days later). A topic with fewer partitions
than configured is grown; Kafka can never shrink one, so more partitions is only a warning,
as is a replication factor that differs (changing it needs a reassignment, not a deploy).

Elasticsearch: an index template ``<index>`` for ``<index>-*`` carries the mapping, settings and
the alias ``<index>``, so every daily index ``<index>-YYYY.MM.DD`` joins the alias the moment
the consumer (or bootstrap) creates it. Bootstrap also creates today's index so the alias (and
Kibana's data view ``<index>*``) works before the first document arrives, and pushes
``number_of_replicas``/``refresh_interval`` changes to the existing daily indices.

The mapping is ``dynamic: strict``: a document with a field not listed here is rejected (400)
and the consumer dead-letters it, instead of a typo or a changed producer quietly growing the
mapping (and Kibana's field list) forever. Adding a field therefore means adding it here first.

Retention is by daily index, named from each event's own date, not by ILM or a data stream:
a replayed message must land in the index that already holds its ``_id`` so ``create`` answers
409 (see docs/DESIGN.md), and the test Elasticsearch distribution has no x-pack, so there is no
ILM to rely on anyway. ``prune`` deletes whole daily indices older than
``elasticsearch.retention_days`` by the date in their name; it never touches an index whose name
is not exactly ``<index>-YYYY.MM.DD``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewPartitions,
    NewTopic,
    ResourceType,
)
from elasticsearch import ApiError, Elasticsearch, NotFoundError, TransportError

from logpipe import log, refusal
from logpipe.config import Config, ElasticsearchConfig, KafkaConfig
from logpipe.es import index_name, index_pattern, make_client
from logpipe.kafka import RdKafkaLogger, client_config
from logpipe.refusal import KafkaErrorWatch, Refused

# Dead letters are read by people, often after a weekend: keep them 30 days.
DLQ_RETENTION_MS = 30 * 24 * 3600 * 1000
# Template priority above the default 0 so a catch-all template never wins over ours.
TEMPLATE_PRIORITY = 200
_REQUEST_TIMEOUT_S = 30.0

T = TypeVar("T")


class BootstrapError(RuntimeError):
    """A setup step failed; the message says which and why."""


MAPPINGS: dict[str, Any] = {
    "dynamic": "strict",
    "properties": {
        "log_id": {"type": "keyword"},
        "timestamp": {"type": "date", "format": "strict_date_optional_time||epoch_millis"},
        # Set by the consumer when it indexes the document (freshness, `logpipe status`).
        "indexed_at": {"type": "date", "format": "strict_date_optional_time||epoch_millis"},
        "client_ip": {"type": "ip"},
        "method": {"type": "keyword"},
        "endpoint": {"type": "keyword", "ignore_above": 2048},
        "http_version": {"type": "keyword"},
        "status": {"type": "short"},
        "bytes": {"type": "long"},
        "response_time_ms": {"type": "float"},
        "user_agent": {
            "type": "text",
            "fields": {"keyword": {"type": "keyword", "ignore_above": 512}},
        },
        "referrer": {"type": "keyword", "ignore_above": 2048},
        "host": {"type": "keyword"},
    },
}


# ---------------------------------------------------------------------------------------------
# waiting


def wait_for(what: str, probe: Callable[[], T], timeout_s: float, interval_s: float = 1.0,
             hosts: tuple[str, ...] = ()) -> T:
    """Call ``probe`` until it succeeds or ``timeout_s`` passes; then BootstrapError.

    A refusal (``Refused``, or an Elasticsearch 401/403/unverifiable certificate from one of
    ``hosts``) ends the wait at once: it will not go away by waiting.
    """
    deadline = time.monotonic() + timeout_s
    attempt = 0
    while True:
        attempt += 1
        try:
            return probe()
        except Refused:
            raise
        except Exception as exc:  # any other failure means "not reachable yet"
            found = refusal.elasticsearch(exc, hosts) if hosts else None
            if found is not None:
                raise Refused(found) from exc
            if time.monotonic() + interval_s > deadline:
                raise BootstrapError(
                    f"{what} not reachable after {timeout_s:.0f} s: {exc}") from exc
            if attempt == 1:
                log.event("waiting", target=what, timeout_s=timeout_s, error=str(exc))
            time.sleep(interval_s)


# ---------------------------------------------------------------------------------------------
# Kafka


def make_admin(cfg: KafkaConfig, watch: KafkaErrorWatch | None = None) -> AdminClient:
    conf = client_config(cfg, "logpipe-admin")
    if watch is not None:
        conf["error_cb"] = watch
    return AdminClient(conf, logger=RdKafkaLogger())


def _kafka_step(exc: KafkaException, topic: str) -> None:
    """Raise ``Refused`` when a failed admin request on ``topic`` was a missing ACL (the broker
    is filled in by ``run``)."""
    found = refusal.kafka(exc.args[0], "")
    if found is not None:
        raise Refused(dataclasses.replace(found, detail=f"topic {topic}: {found.detail}")) \
            from exc


def _topic_configs(cfg: KafkaConfig, dlq: bool) -> dict[str, str]:
    configs = {"min.insync.replicas": str(cfg.min_insync_replicas)}
    if dlq:
        configs["retention.ms"] = str(DLQ_RETENTION_MS)
    return configs


def ensure_topic(admin: AdminClient, name: str, partitions: int, replication: int,
                 configs: dict[str, str], timeout_s: float = _REQUEST_TIMEOUT_S) -> str:
    """Create, grow or leave one topic; returns the action taken (for logs and tests)."""
    # All topics rather than list_topics(topic=name): asking for one topic by name can
    # auto-create it on brokers with auto.create.topics.enable, with the broker defaults.
    metadata = admin.list_topics(timeout=timeout_s)
    topic = metadata.topics.get(name)
    if topic is None or (topic.error is not None
                         and topic.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART):
        futures = admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=replication,
                      config=configs)], request_timeout=timeout_s)
        try:
            futures[name].result(timeout=timeout_s)
        except KafkaException as exc:
            _kafka_step(exc, name)
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise BootstrapError(f"create topic {name}: {exc.args[0].str()}") from exc
            # Another deploy created it in the meantime: fine, same settings.
            log.event("topic_exists", topic=name, note="created concurrently")
            return "exists"
        settings = " ".join(f"{k}={v}" for k, v in sorted(configs.items()))
        log.event("topic_created", topic=name, partitions=partitions,
                  replication_factor=replication, configs=settings)
        return "created"

    action = "unchanged"
    current = len(topic.partitions)
    replicas = len(topic.partitions[0].replicas) if topic.partitions else 0
    if current < partitions:
        futures = admin.create_partitions([NewPartitions(name, partitions)],
                                          request_timeout=timeout_s)
        try:
            futures[name].result(timeout=timeout_s)
        except KafkaException as exc:
            _kafka_step(exc, name)
            raise BootstrapError(f"grow topic {name} to {partitions} partitions: "
                                 f"{exc.args[0].str()}") from exc
        # Keys move to other partitions from now on: per-key order holds only from here.
        log.event("topic_grown", topic=name, partitions_before=current, partitions=partitions)
        action = "grown"
    elif current > partitions:
        log.warning("topic_partitions_not_shrunk", topic=name, partitions=current,
                    configured=partitions, note="Kafka never reduces partitions; left as is")
    if replicas != replication:
        log.warning("topic_replication_differs", topic=name, replication_factor=replicas,
                    configured=replication, note="needs a partition reassignment; left as is")
    if _sync_topic_configs(admin, name, configs, timeout_s) and action == "unchanged":
        action = "updated"
    if action == "unchanged":
        log.event("topic_exists", topic=name, partitions=current, replication_factor=replicas)
    return action


def _sync_topic_configs(admin: AdminClient, name: str, wanted: dict[str, str],
                        timeout_s: float) -> bool:
    """Set the managed topic configs that differ; other configs are left alone."""
    resource = ConfigResource(ResourceType.TOPIC, name)
    described = admin.describe_configs([resource], request_timeout=timeout_s)
    try:
        entries = next(iter(described.values())).result(timeout=timeout_s)
    except KafkaException as exc:
        _kafka_step(exc, name)
        raise BootstrapError(f"describe topic {name} configs: {exc.args[0].str()}") from exc
    changes = {k: v for k, v in wanted.items() if k not in entries or entries[k].value != v}
    if not changes:
        return False
    alter = ConfigResource(ResourceType.TOPIC, name, incremental_configs=[
        ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
        for k, v in changes.items()])
    futures = admin.incremental_alter_configs([alter], request_timeout=timeout_s)
    try:
        next(iter(futures.values())).result(timeout=timeout_s)
    except KafkaException as exc:
        _kafka_step(exc, name)
        raise BootstrapError(f"alter topic {name} configs: {exc.args[0].str()}") from exc
    log.event("topic_config_updated", topic=name,
              configs=" ".join(f"{k}={v}" for k, v in sorted(changes.items())))
    return True


def bootstrap_kafka(cfg: KafkaConfig, wait_timeout_s: float = 60.0) -> dict[str, str]:
    """Ensure the log topic and the DLQ topic; returns {topic: action}."""
    watch = KafkaErrorWatch(cfg.bootstrap_servers)
    admin = make_admin(cfg, watch)

    # A rejected password or certificate is only reported to the error callback, which the
    # watch serves between short metadata requests: a refusal ends the wait at once.
    wait_for(f"kafka {cfg.bootstrap_servers}", lambda: watch.list_topics(admin, 5.0),
             wait_timeout_s)
    return {
        cfg.topic: ensure_topic(admin, cfg.topic, cfg.partitions, cfg.replication_factor,
                                _topic_configs(cfg, dlq=False)),
        cfg.dlq_topic: ensure_topic(admin, cfg.dlq_topic, cfg.dlq_partitions,
                                    cfg.replication_factor, _topic_configs(cfg, dlq=True)),
    }


# ---------------------------------------------------------------------------------------------
# Elasticsearch


def index_template(cfg: ElasticsearchConfig) -> dict[str, Any]:
    """The body of the ``<index>`` index template (also what the tests compare)."""
    return {
        "index_patterns": [index_pattern(cfg.index)],
        "priority": TEMPLATE_PRIORITY,
        "template": {
            "settings": {
                "number_of_shards": cfg.shards,
                "number_of_replicas": cfg.replicas,
                "refresh_interval": cfg.refresh_interval,
            },
            "mappings": MAPPINGS,
            "aliases": {cfg.index: {}},
        },
    }


def _fingerprint(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def ensure_template(es: Elasticsearch, cfg: ElasticsearchConfig) -> str:
    """Put the template unless the stored one has the same fingerprint in its ``_meta``."""
    body = index_template(cfg)
    fingerprint = _fingerprint(body)
    try:
        found = es.indices.get_index_template(name=cfg.index)["index_templates"]
    except NotFoundError:
        found = []
    existing = found[0]["index_template"] if found else None
    if existing and existing.get("_meta", {}).get("logpipe_fingerprint") == fingerprint:
        log.event("template_unchanged", template=cfg.index)
        return "unchanged"
    es.indices.put_index_template(name=cfg.index, meta={"managed_by": "logpipe",
                                                        "logpipe_fingerprint": fingerprint},
                                  **body)
    action = "updated" if existing else "created"
    log.event(f"template_{action}", template=cfg.index, pattern=index_pattern(cfg.index),
              shards=cfg.shards, replicas=cfg.replicas)
    return action


def _check_alias_name_free(es: Elasticsearch, cfg: ElasticsearchConfig) -> None:
    # A concrete index called like the alias (auto-created by a write before bootstrap ran)
    # makes the alias impossible; say so instead of failing on every index creation.
    if es.indices.exists(index=cfg.index) and not es.indices.exists_alias(name=cfg.index):
        raise BootstrapError(
            f"elasticsearch: a concrete index named {cfg.index!r} exists, so the alias of that "
            f"name cannot be created; reindex or delete it, then run bootstrap again")


def ensure_today_index(es: Elasticsearch, cfg: ElasticsearchConfig,
                       now: datetime | None = None) -> str:
    """Create today's (UTC) daily index so the alias exists before any document."""
    now = now or datetime.now(UTC)
    name = index_name(cfg.index, now.strftime("%Y-%m-%dT%H:%M:%S.000Z"))
    if es.indices.exists(index=name):
        log.event("index_exists", index=name)
        return "exists"
    try:
        es.indices.create(index=name)
    except ApiError as exc:
        if exc.meta.status == 400 and "resource_already_exists_exception" in str(exc):
            log.event("index_exists", index=name, note="created concurrently")
            return "exists"
        raise
    log.event("index_created", index=name, alias=cfg.index)
    return "created"


_DAILY = r"-(\d{4})\.(\d{2})\.(\d{2})"


def daily_indices(es: Elasticsearch, prefix: str) -> dict[str, date]:
    """``{name: date}`` for indices named exactly ``<prefix>-YYYY.MM.DD`` (valid dates only)."""
    pattern = re.compile(re.escape(prefix) + _DAILY + r"\Z")
    names = es.indices.get_alias(index=index_pattern(prefix), expand_wildcards="open,closed")
    out: dict[str, date] = {}
    for name in names:
        match = pattern.match(name)
        if match is None:
            continue
        try:
            out[name] = date(int(match[1]), int(match[2]), int(match[3]))
        except ValueError:
            continue  # e.g. web-logs-topic-2026.13.40: not ours to judge
    return out


def sync_index_settings(es: Elasticsearch, cfg: ElasticsearchConfig) -> list[str]:
    """Apply the dynamic settings (replicas, refresh interval) to existing daily indices."""
    indices = daily_indices(es, cfg.index)
    if not indices:
        return []
    current = es.indices.get_settings(index=",".join(sorted(indices)),
                                      name="index.number_of_replicas,index.refresh_interval",
                                      expand_wildcards="open,closed")
    changed: list[str] = []
    for name in sorted(indices):
        settings = current.get(name, {}).get("settings", {}).get("index", {})
        replicas = settings.get("number_of_replicas")
        refresh = settings.get("refresh_interval")
        if replicas == str(cfg.replicas) and refresh in (cfg.refresh_interval, None):
            continue
        es.indices.put_settings(index=name, settings={
            "index": {"number_of_replicas": cfg.replicas,
                      "refresh_interval": cfg.refresh_interval}})
        log.event("index_settings_updated", index=name, replicas_before=replicas,
                  replicas=cfg.replicas, refresh_interval=cfg.refresh_interval)
        changed.append(name)
    return changed


def prune(es: Elasticsearch, cfg: ElasticsearchConfig, today: date | None = None) -> list[str]:
    """Delete daily indices older than ``retention_days`` (0 keeps all); returns the names.

    An index dated D is kept while D >= today - retention_days, i.e. today plus
    ``retention_days`` previous days. Future-dated indices are never deleted.
    """
    if cfg.retention_days == 0:
        log.event("prune_skipped", reason="retention_days=0")
        return []
    today = today or datetime.now(UTC).date()
    cutoff = today - timedelta(days=cfg.retention_days)
    deleted: list[str] = []
    for name, day in sorted(daily_indices(es, cfg.index).items()):
        if day >= cutoff:
            continue
        # One exact name per request: wildcard deletes are refused by default, rightly.
        es.indices.delete(index=name)
        log.event("index_deleted", index=name, date=day.isoformat(),
                  retention_days=cfg.retention_days)
        deleted.append(name)
    log.event("prune_done", deleted=len(deleted), cutoff=cutoff.isoformat())
    return deleted


def bootstrap_elasticsearch(cfg: ElasticsearchConfig, wait_timeout_s: float = 60.0,
                            do_prune: bool = False, es: Elasticsearch | None = None) -> None:
    es = es or make_client(cfg)
    # Cluster health rather than `GET /`: the stripped test distribution answers 405 there.
    health = wait_for(f"elasticsearch {','.join(cfg.hosts)}", es.cluster.health, wait_timeout_s,
                      hosts=tuple(cfg.hosts))
    log.event("elasticsearch_reachable", cluster=health.get("cluster_name", ""),
              health=health.get("status", ""))
    _check_alias_name_free(es, cfg)
    ensure_template(es, cfg)
    ensure_today_index(es, cfg)
    sync_index_settings(es, cfg)
    if do_prune:
        prune(es, cfg)


def run(cfg: Config, *, only: str | None = None, do_prune: bool = False,
        wait_timeout_s: float = 60.0) -> int:
    """CLI entry for ``logpipe bootstrap``; ``only`` is None, "kafka" or "elasticsearch".
    Exit 0, 1 (failed) or ``EXIT_REFUSED`` (4: credentials, certificate, ACL/privilege)."""
    try:
        if only in (None, "kafka"):
            bootstrap_kafka(cfg.kafka, wait_timeout_s)
        if only in (None, "elasticsearch"):
            bootstrap_elasticsearch(cfg.elasticsearch, wait_timeout_s, do_prune=do_prune)
    except (Refused, BootstrapError, KafkaException, ApiError, TransportError) as exc:
        found = refusal.find(exc, cfg.kafka.bootstrap_servers, cfg.elasticsearch.hosts)
        if found is not None:
            found.at(cfg.kafka.bootstrap_servers).log()
            return refusal.EXIT_REFUSED
        log.error("bootstrap_failed", error=str(exc))
        return 1
    log.event("bootstrap_done")
    return 0


def run_prune(cfg: Config, wait_timeout_s: float = 60.0) -> int:
    """CLI entry for ``logpipe prune``."""
    es = make_client(cfg.elasticsearch)
    try:
        wait_for(f"elasticsearch {','.join(cfg.elasticsearch.hosts)}", es.cluster.health,
                 wait_timeout_s, hosts=tuple(cfg.elasticsearch.hosts))
        prune(es, cfg.elasticsearch)
    except (Refused, BootstrapError, ApiError, TransportError) as exc:
        found = refusal.find(exc, cfg.kafka.bootstrap_servers, cfg.elasticsearch.hosts)
        if found is not None:
            found.log()
            return refusal.EXIT_REFUSED
        log.error("prune_failed", error=str(exc))
        return 1
    return 0
