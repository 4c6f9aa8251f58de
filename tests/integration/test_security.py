"""The package against Kafka and Elasticsearch with security on (the harness's ``secure=True``).

Kafka: SASL_SSL with SCRAM-SHA-512, a CA the clients must trust, ACLs by least privilege per
principal (producer, consumer, admin). Elasticsearch: HTTPS, file-realm users, a writer role for
``web-logs-topic*`` only. The truth is read with the harness's super users.

Refusals are checked as the operator sees them: exit code 4, one ``event=fatal`` line naming
the broker or host and the reason, quickly (no waiting out timeouts), no secret in any output.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.pipeline import Completed, Pipeline, parse_events, record
from harness.servers import (
    ADMIN_USER,
    CONSUMER_USER,
    ES_WRITER_USER,
    PRODUCER_USER,
    SecureServers,
)
from harness.tls import TestCA

EXIT_REFUSED = 4
# A refusal must end a command well before any of its waits would (bootstrap waits 60 s,
# produce flushes for 30 s, status reads metadata for 10 s); measured 0.6-2.8 s on a busy machine.
REFUSAL_BUDGET_S = 10.0


@pytest.fixture
def secure(request: pytest.FixtureRequest, secure_servers: SecureServers,
           tmp_path: Path) -> Iterator[Pipeline]:
    p = Pipeline(secure_servers.kafka, secure_servers.elasticsearch, tmp_path / "pipeline",
                 request.node.name)
    yield p
    if p._es is not None:
        p._es.close()


def secrets_of(p: Pipeline) -> list[str]:
    return [*p.kafka.passwords.values(), *p.es_node.passwords.values()]


def assert_no_secret(p: Pipeline, *texts: str) -> None:
    for text in texts:
        for secret in secrets_of(p):
            assert secret not in text, "a password appears in the output"


def fatal_line(done: Completed) -> dict[str, str]:
    """The one ``event=fatal`` line of a refused command (and the exit code it goes with)."""
    assert done.returncode == EXIT_REFUSED, done.describe()
    fatal = done.events("fatal")
    assert len(fatal) == 1, f"expected one event=fatal line:\n{done.describe()}"
    assert done.seconds < REFUSAL_BUDGET_S, f"refusal took {done.seconds:.1f}s"
    return fatal[0]


def wrong_password_file(tmp_path: Path) -> Path:
    path = tmp_path / "wrong.password"
    path.write_text("not-the-password\n")
    path.chmod(0o600)
    return path


@pytest.mark.slow
def test_produce_consume_exact_count_over_sasl_ssl_and_https(secure: Pipeline) -> None:
    p = secure
    outputs: list[str] = []
    boot = p.bootstrap()
    produced = p.produce(3000)
    keys = p.topic_keys()
    assert len(keys) == 3000 and len(set(keys)) == 3000
    # The consumer as a service, so its argument list can be read while it runs: the
    # password files are named in the config file, the passwords themselves nowhere.
    service = p.spawn("consume")
    try:
        service.wait_for_event("ready", timeout=60)
        cmdline = Path(f"/proc/{service.pid}/cmdline").read_bytes().decode(errors="replace")
        assert_no_secret(p, cmdline)
        deadline = time.monotonic() + 120
        while p.doc_count() < 3000 and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        code = service.terminate_and_wait(timeout=60)
    assert code == 0, service.log()[-3000:]
    cmp = p.compare(keys)
    committed, ends = p.committed(), p.end_offsets()
    status = p.cli("status", "--json")
    check = p.cli("check")
    outputs += [boot.stderr, produced.stderr, service.log(), status.stdout, status.stderr,
                check.stdout, check.stderr]
    record("secure_exact", produced=3000, documents=cmp.documents, missing=len(cmp.missing),
           duplicates=len(cmp.duplicates), produce_s=round(produced.seconds, 1))
    assert cmp.exact, cmp.describe()
    assert committed == ends, f"committed {committed} != end offsets {ends}"
    st = json.loads(status.stdout)
    assert st["kafka"]["lag"] == 0 and st["elasticsearch"]["docs"] == 3000, status.stdout
    assert check.stdout.startswith("LOGPIPE OK"), check.stdout
    assert_no_secret(p, *outputs)


def test_wrong_kafka_password_is_refused_quickly(secure: Pipeline, tmp_path: Path) -> None:
    p = secure
    wrong = {"LOGPIPE_KAFKA_SASL_PASSWORD_FILE": str(wrong_password_file(tmp_path))}
    broker = p.kafka.bootstrap_servers
    runs = {
        "produce": p.cli("produce", "--count", "50", check=False,
                         env={**p.principal_env(PRODUCER_USER), **wrong}),
        "consume": p.cli("consume", check=False, env=wrong),
        "bootstrap": p.cli("bootstrap", "--only", "kafka", check=False,
                           env={**p.principal_env(ADMIN_USER), **wrong}),
        "status": p.cli("status", check=False, env=wrong),
    }
    for name, done in runs.items():
        fatal = fatal_line(done)
        assert fatal["reason"] == "kafka_auth_failed", (name, fatal)
        assert fatal["broker"] == broker, (name, fatal)
        assert "invalid credentials" in fatal["detail"], (name, fatal)
        assert "not-the-password" not in done.stderr + done.stdout
        assert_no_secret(p, done.stderr, done.stdout)
        record(f"refused_{name}", seconds=round(done.seconds, 1), detail=fatal["detail"][:120])
    check = p.cli("check", check=False, env=wrong)
    assert check.returncode == 2, check.describe()  # Nagios CRITICAL
    assert check.stdout.startswith(f"LOGPIPE CRITICAL - kafka_auth_failed broker={broker}")
    # Nothing reached the topic.
    p.bootstrap()
    assert sum(p.end_offsets().values()) == 0


def test_unknown_ca_is_refused(secure: Pipeline, tmp_path: Path) -> None:
    p = secure
    other = TestCA(tmp_path / "other-ca", name="some other CA")
    done = p.cli("consume", check=False,
                 env={"LOGPIPE_KAFKA_SSL_CA_LOCATION": str(other.cert_path)})
    fatal = fatal_line(done)
    assert fatal["reason"] == "kafka_tls_failed" and fatal["broker"] == p.kafka.bootstrap_servers
    assert "certificate verify failed" in fatal["detail"]
    record("refused_kafka_ca", seconds=round(done.seconds, 1), detail=fatal["detail"][:120])

    done = p.cli("bootstrap", "--only", "elasticsearch", check=False,
                 env={"LOGPIPE_ELASTICSEARCH_CA_CERTS": str(other.cert_path)})
    fatal = fatal_line(done)
    assert fatal["reason"] == "es_tls_failed" and fatal["host"] == p.es_node.url
    assert "CERTIFICATE_VERIFY_FAILED" in fatal["detail"]
    record("refused_es_ca", seconds=round(done.seconds, 1), detail=fatal["detail"][:120])


def test_wrong_elasticsearch_password_is_refused(secure: Pipeline, tmp_path: Path) -> None:
    p = secure
    done = p.cli("consume", check=False, env={
        "LOGPIPE_ELASTICSEARCH_PASSWORD_FILE": str(wrong_password_file(tmp_path))})
    fatal = fatal_line(done)
    assert fatal["reason"] == "es_auth_failed" and fatal["host"] == p.es_node.url
    assert "HTTP 401" in fatal["detail"] and ES_WRITER_USER in fatal["detail"]
    assert_no_secret(p, done.stderr)
    record("refused_es_password", seconds=round(done.seconds, 1), detail=fatal["detail"][:120])


def test_consumer_principal_cannot_produce(secure: Pipeline) -> None:
    p = secure
    p.bootstrap()
    done = p.cli("produce", "--count", "20", check=False,
                 env=p.principal_env(CONSUMER_USER))
    fatal = fatal_line(done)
    assert fatal["reason"] == "kafka_not_authorized", fatal
    assert fatal["detail"].startswith("TOPIC_AUTHORIZATION_FAILED"), fatal
    assert sum(p.end_offsets().values()) == 0
    record("refused_acl_produce", seconds=round(done.seconds, 1), detail=fatal["detail"][:120])
    # And the producer principal cannot consume: its group is not the producer's to join.
    done = p.cli("consume", "--max-batches", "1", check=False,
                 env=p.principal_env(PRODUCER_USER))
    fatal = fatal_line(done)
    assert fatal["reason"] == "kafka_not_authorized", fatal
    record("refused_acl_consume", seconds=round(done.seconds, 1), detail=fatal["detail"][:120])


def test_elasticsearch_writer_is_refused_outside_its_pattern(secure: Pipeline) -> None:
    from elasticsearch import AuthorizationException, Elasticsearch

    p = secure
    outside = f"other-{p.topic}"
    p.es.indices.create(index=outside)  # made by the super user: exists, but is not ours
    writer = Elasticsearch(p.es_node.url, request_timeout=30,
                           **p.es_node.auth_kwargs(ES_WRITER_USER))
    try:
        for name, call in {
            "create_doc": lambda: writer.index(index=outside, id="1", document={"a": 1},
                                               op_type="create"),
            "search": lambda: writer.search(index=outside),
            "delete_index": lambda: writer.indices.delete(index=outside),
        }.items():
            with pytest.raises(AuthorizationException) as info:
                call()
            assert info.value.meta.status == 403, name
    finally:
        writer.close()

    # The consumer with an index outside the role: a refusal, and nothing committed past
    # the documents Elasticsearch never took.
    p.bootstrap()
    p.produce(200)
    done = p.cli("consume", "--max-batches", "5", check=False,
                 env={"LOGPIPE_ELASTICSEARCH_INDEX": outside})
    fatal = fatal_line(done)
    assert fatal["reason"] == "es_not_authorized" and fatal["host"] == p.es_node.url
    assert "HTTP 403" in fatal["detail"], fatal
    # At most the start positions (offset 0: "next to read is the first") are committed.
    assert all(offset <= 0 for offset in p.committed().values()), p.committed()
    record("refused_es_privilege", seconds=round(done.seconds, 1), detail=fatal["detail"][:120])
    # The same messages then go through once the index is right.
    p.consume_all()
    assert p.doc_count() == 200
    p.assert_committed_only_indexed()


def test_config_show_masks_secrets(secure: Pipeline) -> None:
    p = secure
    inline = "inline-secret-value"
    p.write_config(kafka={"client_overrides": {"sasl.password": inline,
                                               "socket.keepalive.enable": "true"}})
    for fmt in ("toml", "json"):
        done = p.cli("config", "show", "--format", fmt)
        assert inline not in done.stdout
        assert_no_secret(p, done.stdout, done.stderr)
        # The password files are paths operators need to see; their content is not shown.
        assert str(p.kafka.password_file(CONSUMER_USER)) in done.stdout
        assert str(p.es_node.password_file(ES_WRITER_USER)) in done.stdout
    shown = json.loads(p.cli("config", "show", "--format", "json").stdout)
    assert shown["kafka"]["client_overrides"]["sasl.password"] == "********"
    assert shown["kafka"]["client_overrides"]["socket.keepalive.enable"] == "true"


def test_fatal_line_format(secure: Pipeline, tmp_path: Path) -> None:
    """The exact shape an operator (and journald) sees: one line, key=value, reason first."""
    p = secure
    done = p.cli("produce", "--count", "5", check=False, env={
        **p.principal_env(PRODUCER_USER),
        "LOGPIPE_KAFKA_SASL_PASSWORD_FILE": str(wrong_password_file(tmp_path))})
    lines = [line for line in done.stderr.splitlines() if "event=fatal" in line]
    assert len(lines) == 1, done.describe()
    assert re.match(r"ts=\S+ level=error event=fatal reason=kafka_auth_failed "
                    r"broker=127\.0\.0\.1:\d+ detail=\".+\"$", lines[0]), lines[0]
    assert parse_events(lines[0], "fatal")
