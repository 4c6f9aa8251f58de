"""Every client the package builds carries the configured security settings: the producer, the
consumer, its dead-letter producer, bootstrap's admin client, the status reader and the
Elasticsearch client. Secrets come from the files, never from the config itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from logpipe import admin, dlq, ops
from logpipe.config import Config
from logpipe.consumer import consumer_config
from logpipe.es import make_client
from logpipe.producer import producer_config


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    kpw = tmp_path / "kafka.pw"
    kpw.write_text("kafka-secret\n")
    kpw.chmod(0o600)
    epw = tmp_path / "es.pw"
    epw.write_text("es-secret\n")
    epw.chmod(0o600)
    ca = tmp_path / "ca.crt"
    ca.write_text("not parsed here\n")
    return (Config()
            .replace("kafka", bootstrap_servers="k1:9093", security_protocol="SASL_SSL",
                     sasl_mechanism="SCRAM-SHA-512", sasl_username="logpipe-consumer",
                     sasl_password_file=str(kpw), ssl_ca_location=str(ca))
            .replace("elasticsearch", hosts=["https://es1:9200"], username="logpipe-writer",
                     password_file=str(epw), ca_certs=str(ca)))


def _assert_secure(conf: dict[str, Any], ca: str) -> None:
    assert conf["security.protocol"] == "sasl_ssl"
    assert conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["sasl.username"] == "logpipe-consumer"
    assert conf["sasl.password"] == "kafka-secret"  # the file's content, newline stripped
    assert conf["ssl.ca.location"] == ca


def test_kafka_clients_carry_security(cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = cfg.kafka.ssl_ca_location
    _assert_secure(producer_config(cfg), ca)
    _assert_secure(consumer_config(cfg), ca)

    seen: dict[str, dict[str, Any]] = {}

    def capture(name: str) -> Any:
        class Fake:
            def __init__(self, conf: dict[str, Any], **_kw: Any) -> None:
                seen[name] = conf

            def close(self) -> None:
                pass

            def list_topics(self, **_kw: Any) -> Any:
                raise RuntimeError("not needed")

            def poll(self, _timeout: float = 0) -> None:
                return None
        return Fake

    monkeypatch.setattr(dlq, "Producer", capture("dlq"))
    monkeypatch.setattr(admin, "AdminClient", capture("admin"))
    monkeypatch.setattr(ops, "Consumer", capture("status"))
    dlq.DeadLetterQueue(cfg.kafka)
    admin.make_admin(cfg.kafka)
    with pytest.raises(RuntimeError):
        ops.kafka_status(cfg.kafka)
    for name in ("dlq", "admin", "status"):
        _assert_secure(seen[name], ca)
        assert callable(seen[name].get("error_cb")) or name == "admin", name


def test_elasticsearch_client_carries_auth_and_ca(cfg: Config) -> None:
    es = make_client(cfg.elasticsearch)
    try:
        node = es.transport.node_pool.get().config
        assert node.scheme == "https" and node.ca_certs == cfg.elasticsearch.ca_certs
        assert node.verify_certs is True
        auth = es._headers.get("authorization", "")
        assert auth.startswith("Basic ")
    finally:
        es.close()
