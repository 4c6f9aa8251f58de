"""The single configuration object: a TOML file plus ``LOGPIPE_<SECTION>_<KEY>`` overrides.

Every key has a type and a default here; anything unknown or ill-typed fails at start with a
message that names the key, so a typo in ``/etc/logpipe/logpipe.toml`` never becomes a silent
default.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_PATH = Path("/etc/logpipe/logpipe.toml")
ENV_PREFIX = "LOGPIPE_"
SECRET_MASK = "********"


class ConfigError(ValueError):
    """Raised for any bad configuration; the message names the offending key."""


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: str = "localhost:9092"
    topic: str = "web-logs-topic"
    dlq_topic: str = "web-logs-topic.dlq"
    group_id: str = "elasticsearch-consumer-group"
    partitions: int = 6
    replication_factor: int = 1
    min_insync_replicas: int = 1
    dlq_partitions: int = 1
    # PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password_file: str = ""
    ssl_ca_location: str = ""
    # Extra librdkafka properties for sites that need more
    # (e.g. {"socket.keepalive.enable"="true"}).
    client_overrides: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ElasticsearchConfig:
    hosts: list[str] = field(default_factory=lambda: ["http://localhost:9200"])
    # Alias every daily index joins; also the prefix of the daily index names.
    index: str = "web-logs-topic"
    shards: int = 2
    replicas: int = 1
    refresh_interval: str = "1s"
    # Daily indices older than this are deleted by `logpipe prune` (logpipe-prune.timer) and
    # `logpipe bootstrap --prune`; 0 keeps every index forever.
    retention_days: int = 30
    username: str = ""
    password_file: str = ""
    api_key_file: str = ""
    ca_certs: str = ""
    verify_certs: bool = True
    request_timeout_s: float = 30.0


@dataclass(frozen=True)
class ProducerConfig:
    count: int = 100
    rate: float = 0.0
    duration_s: float = 0.0
    seed: int | None = None
    compression: str = "zstd"
    linger_ms: int = 20
    batch_size_bytes: int = 262144
    flush_timeout_s: float = 30.0


@dataclass(frozen=True)
class ConsumerConfig:
    batch_size: int = 500
    # 0 runs until stopped; N > 0 processes at most N batches then exits (timer mode).
    max_batches: int = 0
    # A batch closes when full or after this long. Under a backlog batches fill at once, so
    # this only matters when the consumer has caught up: there it bounds how long a log waits
    # for its batch (end-to-end latency) at the cost of smaller bulk requests.
    poll_timeout_s: float = 0.25
    # Bulk requests sent in parallel for one batch (the batch is split into this many chunks).
    bulk_concurrency: int = 1
    # Batches in hand at once, each sent as soon as it is built: with 2, the next batch is
    # fetched, built and in flight while one is indexed, so Elasticsearch never waits for the
    # consumer. Memory grows with it (batch_size messages each); requests in flight are at most
    # bulk_concurrency x pipeline_depth.
    pipeline_depth: int = 2
    # A batch also closes once its messages hold this many bytes: with pipeline_depth, bounds
    # the memory in hand when messages are large (batch_size of ~400-byte logs is ~200 KB).
    max_batch_bytes: int = 16 * 1024 * 1024
    retry_initial_backoff_s: float = 0.5
    retry_max_backoff_s: float = 30.0
    # On SIGTERM: how long to keep trying to finish the batch in hand before closing.
    shutdown_timeout_s: float = 20.0
    session_timeout_ms: int = 45000
    max_poll_interval_ms: int = 300000
    # Messages larger than this are dead-lettered rather than indexed.
    max_message_bytes: int = 1048576
    # With messages waiting (lag > 0) and none handled for this long, the consumer reports itself
    # stalled: a warning line and STATUS= (systemctl status). 0 turns the report off.
    stall_after_s: float = 300.0
    # Largest bulk request body sent: a batch over it goes in several requests. Keep it under
    # Elasticsearch's http.max_content_length (100 MiB by default) and any proxy's body limit;
    # a request refused with 413 anyway is split and the cap lowered until the next start.
    max_bulk_bytes: int = 32 * 1024 * 1024

    @property
    def requests_in_flight(self) -> int:
        """Bulk requests the consumer may have in flight at once: every part of every batch in
        hand (each batch is sent as soon as it is built)."""
        return self.bulk_concurrency * self.pipeline_depth


@dataclass(frozen=True)
class CheckConfig:
    lag_warning: int = 10000
    lag_critical: int = 100000
    # Fraction of messages dead-lettered (DLQ end offsets / main topic end offsets).
    error_rate_warning: float = 0.01
    error_rate_critical: float = 0.05
    index_size_warning_bytes: int = 50 * 1024**3
    index_size_critical_bytes: int = 100 * 1024**3
    # A partition with lag whose last commit is older than this is stalled (0 = not checked).
    # The consumer refreshes an idle partition's commit every minute, so keep these well above
    # 60 s plus the check interval.
    stall_warning_s: float = 300.0
    stall_critical_s: float = 900.0


@dataclass(frozen=True)
class MetricsConfig:
    # The consumer serves Prometheus metrics on http://<address>:<port>/metrics; 0 = off.
    # Loopback by default: scrape from this host, or choose an address behind a firewall.
    port: int = 0
    address: str = "127.0.0.1"
    # The producer (a oneshot) writes its last run's metrics to this file after each run, for
    # node_exporter's textfile collector ("" = off).
    textfile: str = ""


@dataclass(frozen=True)
class AlertConfig:
    # What `logpipe alert` runs on a check state change (logpipe-alert@.service), as an argument
    # list (no shell). Empty: the alert is only its journald line. The alert text comes on stdin
    # and in ALERT_* variables; {text}, {state}, ... in an argument are replaced (logpipe/alert.py).
    command: list[str] = field(default_factory=list)
    # The command is killed after this long (a hung webhook must not hold the alert unit).
    timeout_s: float = 30.0


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"


@dataclass(frozen=True)
class Config:
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    elasticsearch: ElasticsearchConfig = field(default_factory=ElasticsearchConfig)
    producer: ProducerConfig = field(default_factory=ProducerConfig)
    consumer: ConsumerConfig = field(default_factory=ConsumerConfig)
    check: CheckConfig = field(default_factory=CheckConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    alert: AlertConfig = field(default_factory=AlertConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def replace(self, section: str, **values: Any) -> Config:
        """A copy with some keys of one section changed (CLI flags use this), validated."""
        current = getattr(self, section)
        data = {**dataclasses.asdict(current), **values}
        return dataclasses.replace(self, **{section: _build_section(section, data)})


SECTIONS: dict[str, type[Any]] = {f.name: f.type for f in dataclasses.fields(Config)}  # type: ignore[misc]
# `from __future__ import annotations` makes field types strings; resolve them once.
_SECTION_TYPES: dict[str, type[Any]] = {
    name: typing.get_type_hints(Config)[name] for name in SECTIONS
}

_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("kafka", "security_protocol"): ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    ("kafka", "sasl_mechanism"): ("", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"),
    ("producer", "compression"): ("none", "gzip", "snappy", "lz4", "zstd"),
    ("logging", "level"): ("DEBUG", "INFO", "WARNING", "ERROR"),
}
_POSITIVE = {
    ("kafka", "partitions"), ("kafka", "replication_factor"), ("kafka", "min_insync_replicas"),
    ("kafka", "dlq_partitions"), ("elasticsearch", "shards"), ("consumer", "batch_size"),
    ("consumer", "bulk_concurrency"), ("consumer", "pipeline_depth"),
    ("consumer", "poll_timeout_s"), ("consumer", "max_message_bytes"),
    ("consumer", "max_bulk_bytes"), ("consumer", "max_batch_bytes"),
    ("producer", "flush_timeout_s"),
    ("elasticsearch", "request_timeout_s"), ("alert", "timeout_s"),
}
_NON_NEGATIVE = {
    ("elasticsearch", "replicas"), ("elasticsearch", "retention_days"), ("producer", "count"),
    ("producer", "rate"), ("producer", "duration_s"), ("producer", "linger_ms"),
    ("consumer", "max_batches"), ("consumer", "retry_initial_backoff_s"),
    ("consumer", "retry_max_backoff_s"), ("consumer", "shutdown_timeout_s"),
    ("consumer", "stall_after_s"), ("check", "stall_warning_s"), ("check", "stall_critical_s"),
}


def _is_secret(key: str) -> bool:
    # Secret *files* are paths, which operators need to see; inline secrets are masked.
    key = key.lower()
    return any(word in key for word in ("password", "secret", "api_key", "token")) \
        and not key.endswith("_file")


def _coerce(section: str, key: str, value: Any, hint: Any, *, from_env: bool) -> Any:
    """Convert/validate one value against its annotation; raise ConfigError naming the key."""
    name = f"{section}.{key}"
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or (from_env and value == ""):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(section, key, value, inner, from_env=from_env)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if from_env and str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if from_env and str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise TypeError("expected true or false")
        if hint is int:
            if isinstance(value, bool):
                raise TypeError("expected an integer, got a boolean")
            if isinstance(value, int):
                return value
            if from_env or isinstance(value, str):
                try:
                    return int(str(value).strip())
                except ValueError:
                    raise TypeError("expected an integer") from None
            raise TypeError(f"expected an integer, got {type(value).__name__}")
        if hint is float:
            if isinstance(value, bool):
                raise TypeError("expected a number, got a boolean")
            if isinstance(value, (int, float)):
                return float(value)
            if from_env or isinstance(value, str):
                try:
                    return float(str(value).strip())
                except ValueError:
                    raise TypeError("expected a number") from None
            raise TypeError(f"expected a number, got {type(value).__name__}")
        if hint is str:
            if isinstance(value, str):
                return value
            raise TypeError(f"expected a string, got {type(value).__name__}")
        if origin is list:
            if from_env and isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return list(value)
            raise TypeError("expected a list of strings")
        if origin is dict:
            if isinstance(value, Mapping):
                return {str(k): str(v) for k, v in value.items()}
            raise TypeError("expected a table of key = value")
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: {exc} (got {value!r})") from None
    raise ConfigError(f"{name}: unsupported type {hint!r}")  # pragma: no cover


def _check_value(section: str, key: str, value: Any) -> None:
    name = f"{section}.{key}"
    choices = _CHOICES.get((section, key))
    if choices is not None and value not in choices:
        raise ConfigError(f"{name}: must be one of {', '.join(c or '(empty)' for c in choices)}"
                          f" (got {value!r})")
    if (section, key) in _POSITIVE and value <= 0:
        raise ConfigError(f"{name}: must be greater than 0 (got {value!r})")
    if (section, key) in _NON_NEGATIVE and value < 0:
        raise ConfigError(f"{name}: must not be negative (got {value!r})")
    if (section, key) == ("metrics", "port") and not 0 <= value <= 65535:
        raise ConfigError(f"{name}: must be a TCP port, or 0 for off (got {value!r})")


def _build_section(section: str, data: Mapping[str, Any], from_env: frozenset[str] = frozenset(),
                   ) -> Any:
    cls = _SECTION_TYPES[section]
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        known = ", ".join(sorted(hints))
        raise ConfigError(f"{section}.{unknown[0]}: unknown key (known: {known})")
    values = {}
    for key, raw in data.items():
        value = _coerce(section, key, raw, hints[key], from_env=key in from_env)
        if value is not None:
            _check_value(section, key, value)
        values[key] = value
    cfg = cls(**values)
    _check_section(section, cfg)
    return cfg


def _check_section(section: str, cfg: Any) -> None:
    """Cross-key rules within one section."""
    if section == "kafka":
        if cfg.min_insync_replicas > cfg.replication_factor:
            raise ConfigError(
                f"kafka.min_insync_replicas: must not exceed kafka.replication_factor "
                f"({cfg.min_insync_replicas} > {cfg.replication_factor})")
        if cfg.topic == cfg.dlq_topic:
            raise ConfigError("kafka.dlq_topic: must differ from kafka.topic")
        if cfg.security_protocol.startswith("SASL"):
            for key in ("sasl_mechanism", "sasl_username", "sasl_password_file"):
                if not getattr(cfg, key):
                    raise ConfigError(f"kafka.{key}: required when security_protocol is SASL_*")
        if cfg.ssl_ca_location and not cfg.security_protocol.endswith("SSL"):
            # A CA file with a plaintext protocol means TLS was meant but is not on.
            raise ConfigError("kafka.ssl_ca_location: set, but security_protocol "
                              f"{cfg.security_protocol} does not use TLS")
    if section == "elasticsearch" and not cfg.hosts:
        raise ConfigError("elasticsearch.hosts: at least one host is required")
    if section == "elasticsearch" and cfg.username and not cfg.password_file \
            and not cfg.api_key_file:
        raise ConfigError("elasticsearch.password_file: required when username is set")
    if section == "consumer" and cfg.retry_max_backoff_s < cfg.retry_initial_backoff_s:
        raise ConfigError("consumer.retry_max_backoff_s: must be >= retry_initial_backoff_s")
    if section == "check":
        for metric in ("lag", "error_rate", "index_size"):
            suffix = "_bytes" if metric == "index_size" else ""
            warn = getattr(cfg, f"{metric}_warning{suffix}")
            crit = getattr(cfg, f"{metric}_critical{suffix}")
            if crit < warn:
                raise ConfigError(f"check.{metric}_critical{suffix}: must be >= the warning level")


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """LOGPIPE_KAFKA_BOOTSTRAP_SERVERS -> {"kafka": {"bootstrap_servers": ...}}.

    Section names contain no underscore, so the first `_` after the prefix separates section
    and key without ambiguity.
    """
    out: dict[str, dict[str, str]] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == "LOGPIPE_CONFIG":
            continue
        rest = name[len(ENV_PREFIX):].lower()
        section, _, key = rest.partition("_")
        if section not in SECTIONS or not key:
            raise ConfigError(f"{name}: unknown setting (sections: {', '.join(SECTIONS)})")
        out.setdefault(section, {})[key] = value
    return out


def load(path: str | os.PathLike[str] | None = None,
         environ: Mapping[str, str] | None = None) -> Config:
    """Build the effective configuration.

    The file is optional only when no path was asked for explicitly (neither argument nor
    LOGPIPE_CONFIG): an operator who names a file that is missing gets an error, not defaults.
    """
    env = os.environ if environ is None else environ
    explicit = path is not None or "LOGPIPE_CONFIG" in env
    file_path = Path(path if path is not None else env.get("LOGPIPE_CONFIG", DEFAULT_PATH))
    data: dict[str, Any] = {}
    if file_path.exists():
        try:
            with file_path.open("rb") as fh:
                data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file_path}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{file_path}: cannot read: {exc.strerror}") from None
    elif explicit:
        raise ConfigError(f"{file_path}: config file not found")
    for section, value in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{section}: unknown section (known: {', '.join(SECTIONS)})")
        if not isinstance(value, Mapping):
            raise ConfigError(f"{section}: must be a table ([{section}])")
    overrides = _env_overrides(env)
    sections = {}
    for section in SECTIONS:
        merged = {**data.get(section, {}), **overrides.get(section, {})}
        sections[section] = _build_section(section, merged,
                                           frozenset(overrides.get(section, {})))
    return Config(**sections)


def read_secret(path: str, key: str) -> str:
    """The content of a secret file (trailing newline stripped), or a ConfigError naming the key.

    A file other users may read is used but warned about (the secret is as good as public on
    that host); the warning names the file, never its content.
    """
    try:
        secret = Path(path).read_text(encoding="utf-8").rstrip("\n")
        mode = os.stat(path).st_mode & 0o777
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read secret file {path}: {exc.strerror}") from None
    if mode & 0o007:
        from logpipe import log  # local: log is a leaf module, config must stay importable alone

        log.warning("secret_file_readable_by_others", key=key, path=path, mode=f"{mode:04o}")
    return secret


def masked(cfg: Config) -> dict[str, dict[str, Any]]:
    """The effective config as plain data, secrets masked (for `logpipe config show`)."""
    out: dict[str, dict[str, Any]] = {}
    for section in SECTIONS:
        values = dataclasses.asdict(getattr(cfg, section))
        for key, value in values.items():
            if _is_secret(key) and value:
                values[key] = SECRET_MASK
            elif isinstance(value, dict):
                values[key] = {k: SECRET_MASK if _is_secret(k) else v for k, v in value.items()}
        out[section] = values
    return out
