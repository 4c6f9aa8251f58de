"""Which client errors are refusals (fatal, exit 4) and which are outages (retried)."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException
from elastic_transport import ApiResponseMeta, HttpHeaders, NodeConfig, TlsError
from elasticsearch import (
    ApiError,
    AuthenticationException,
    AuthorizationException,
)
from elasticsearch import (
    ConnectionError as EsConnectionError,
)

from logpipe import refusal
from logpipe.admin import BootstrapError
from logpipe.bulk import Doc, classify, classify_item

BOOTSTRAP = "k1:9093,k2:9093"


def kafka_error(code: int, text: str) -> KafkaError:
    return KafkaError(code, text)


@pytest.mark.parametrize(("code", "text", "reason", "broker"), [
    (KafkaError._AUTHENTICATION,
     "sasl_ssl://10.0.0.5:9093/bootstrap: SASL authentication error: Authentication failed "
     "during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512",
     refusal.KAFKA_AUTH, "10.0.0.5:9093"),
    (KafkaError.SASL_AUTHENTICATION_FAILED, "Broker: SASL Authentication failed",
     refusal.KAFKA_AUTH, BOOTSTRAP),
    (KafkaError._SSL,
     "sasl_ssl://k2:9093/2: SSL handshake failed: error:0A000086:SSL routines::certificate "
     "verify failed: broker certificate could not be verified",
     refusal.KAFKA_TLS, "k2:9093"),
    (KafkaError._TRANSPORT,
     "ssl://k1:9093/bootstrap: error:0A000086:SSL routines::certificate verify failed",
     refusal.KAFKA_TLS, "k1:9093"),
    (KafkaError.TOPIC_AUTHORIZATION_FAILED, "Broker: Topic authorization failed",
     refusal.KAFKA_ACL, BOOTSTRAP),
    (KafkaError.GROUP_AUTHORIZATION_FAILED,
     "FindCoordinator response error: Group authorization failed.", refusal.KAFKA_ACL, BOOTSTRAP),
    (KafkaError.CLUSTER_AUTHORIZATION_FAILED, "Broker: Cluster authorization failed",
     refusal.KAFKA_ACL, BOOTSTRAP),
])
def test_kafka_refusals(code: int, text: str, reason: str, broker: str) -> None:
    found = refusal.kafka(kafka_error(code, text), BOOTSTRAP)
    assert found is not None
    assert (found.reason, found.target_key, found.target) == (reason, "broker", broker)
    if reason == refusal.KAFKA_ACL:
        assert found.detail.startswith(kafka_error(code, text).name())


@pytest.mark.parametrize(("code", "text"), [
    (KafkaError._TRANSPORT, "sasl_ssl://k1:9093/bootstrap: Connect to ipv4#10.0.0.5:9093 "
                            "failed: Connection refused"),
    (KafkaError._TRANSPORT, "ssl://k1:9093/1: SSL handshake failed: Disconnected"),
    (KafkaError._ALL_BROKERS_DOWN, "2/2 brokers are down"),
    (KafkaError._MSG_TIMED_OUT, "Local: Message timed out"),
    (KafkaError.NOT_COORDINATOR, "Broker: Not coordinator"),
    (KafkaError._PARTITION_EOF, "Broker: No more messages"),
])
def test_kafka_outages_are_not_refusals(code: int, text: str) -> None:
    assert refusal.kafka(kafka_error(code, text), BOOTSTRAP) is None


def _meta(status: int) -> ApiResponseMeta:
    return ApiResponseMeta(status=status, http_version="1.1", headers=HttpHeaders(),
                           duration=0.01, node=NodeConfig("https", "es1", 9200))


def test_elasticsearch_401_403_are_refusals() -> None:
    body = {"error": {"type": "security_exception",
                      "reason": "unable to authenticate user [logpipe]"}}
    found = refusal.elasticsearch(
        AuthenticationException("security_exception", _meta(401), body), ["https://es1:9200"])
    assert found is not None
    assert found.fields() == {"reason": "es_auth_failed", "host": "https://es1:9200",
                              "detail": "HTTP 401: security_exception: unable to authenticate "
                                        "user [logpipe]"}
    found = refusal.elasticsearch(
        AuthorizationException("security_exception", _meta(403), {}), ["https://es1:9200"])
    assert found is not None and found.reason == refusal.ES_PRIVILEGE


def test_elasticsearch_unknown_ca_is_a_refusal_other_tls_errors_are_not() -> None:
    exc = TlsError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get "
                   "local issuer certificate (_ssl.c:1006)")
    found = refusal.elasticsearch(exc, ["https://es1:9200", "https://es2:9200"])
    assert found is not None
    assert (found.reason, found.target) == (refusal.ES_TLS, "https://es1:9200,https://es2:9200")
    assert refusal.elasticsearch(TlsError("EOF occurred in violation of protocol"), ["h"]) is None


@pytest.mark.parametrize("exc", [
    ApiError("es_rejected_execution_exception", _meta(429), {}),
    ApiError("internal", _meta(503), {}),
    EsConnectionError("Connection refused"),
])
def test_elasticsearch_outages_are_not_refusals(exc: Exception) -> None:
    assert refusal.elasticsearch(exc, ["https://es1:9200"]) is None


def test_find_follows_the_cause_chain() -> None:
    try:
        try:
            raise KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED,
                                            "Authorization failed."))
        except KafkaException as exc:
            raise BootstrapError("create topic web-logs-topic: Authorization failed.") from exc
    except BootstrapError as outer:
        found = refusal.find(outer, BOOTSTRAP, ["https://es1:9200"])
    assert found is not None and found.reason == refusal.KAFKA_ACL
    assert refusal.find(BootstrapError("nope"), BOOTSTRAP, []) is None


def test_refusal_line_and_target_fill_in() -> None:
    found = refusal.Refusal(refusal.ES_PRIVILEGE, "host", "", "HTTP 403: " + "x" * 1000)
    assert found.at("https://es1:9200").target == "https://es1:9200"
    assert found.at("https://es1:9200").at("other").target == "https://es1:9200"
    assert len(found.fields()["detail"]) == 300
    assert found.text().startswith("es_not_authorized host= detail=HTTP 403: xxx")


def test_watch_keeps_the_first_refusal() -> None:
    watch = refusal.KafkaErrorWatch(BOOTSTRAP)
    watch(kafka_error(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
    watch.check()  # nothing yet
    watch(kafka_error(KafkaError._AUTHENTICATION, "sasl_ssl://k1:9093/bootstrap: bad"))
    watch(kafka_error(KafkaError._SSL, "sasl_ssl://k2:9093/2: certificate verify failed"))
    with pytest.raises(refusal.Refused) as info:
        watch.check()
    assert info.value.refusal.reason == refusal.KAFKA_AUTH
    assert info.value.refusal.target == "k1:9093"


def test_bulk_item_403_security_exception_is_a_refusal_not_a_dead_letter() -> None:
    assert classify_item(403, {"type": "security_exception", "reason": "unauthorized"}) \
        == ("refuse", "security_exception")
    # A read-only block is the cluster's state, retried (not a refusal).
    assert classify_item(403, {"type": "cluster_block_exception", "reason": "read-only"})[0] \
        == "retry"
    docs = [Doc("web-logs-topic-2026.11.30", f"id-{n}", b"{}") for n in range(2)]
    response = {"errors": True, "items": [
        {"create": {"_index": docs[0].index, "_id": "id-0", "status": 201}},
        {"create": {"_index": docs[1].index, "_id": "id-1", "status": 403,
                    "error": {"type": "security_exception", "reason": "unauthorized"}}}]}
    outcome = classify(response, docs)
    assert outcome.created == [0] and outcome.retry == [1] and not outcome.rejected
    assert outcome.refusal is not None and outcome.refusal.reason == refusal.ES_PRIVILEGE


def test_watch_list_topics_ends_at_a_refusal_not_at_the_timeout() -> None:
    import time

    watch = refusal.KafkaErrorWatch(BOOTSTRAP)

    class Client:
        """Like librdkafka with a wrong password: metadata requests time out, and the error
        callback (run from poll) says why."""

        calls = 0

        def list_topics(self, timeout: float) -> None:
            Client.calls += 1
            assert timeout <= 1.0
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "Failed to get metadata"))

        def poll(self, _timeout: float) -> int:
            if Client.calls >= 2:
                watch(kafka_error(KafkaError._AUTHENTICATION,
                                  "sasl_ssl://k1:9093/bootstrap: SASL authentication error"))
            return 0

    began = time.monotonic()
    with pytest.raises(refusal.Refused) as info:
        watch.list_topics(Client(), timeout_s=30.0)
    assert info.value.refusal.reason == refusal.KAFKA_AUTH
    assert Client.calls == 2 and time.monotonic() - began < 1.0


def test_watch_list_topics_outage_raises_after_the_timeout() -> None:
    watch = refusal.KafkaErrorWatch(BOOTSTRAP)

    class Down:
        calls = 0

        def list_topics(self, timeout: float) -> None:
            Down.calls += 1
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "Failed to get metadata"))

        def poll(self, _timeout: float) -> int:
            return 0

    with pytest.raises(KafkaException):
        watch.list_topics(Down(), timeout_s=0.05)
    assert Down.calls == 1
