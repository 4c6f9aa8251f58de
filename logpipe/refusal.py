"""Refusals: a server that answers but will not let us in is a configuration problem, not an outage.

A wrong password, a CA that does not verify the server's certificate, a missing Kafka ACL or
Elasticsearch privilege: waiting cannot fix any of them, so every command stops at the first one
with exit code ``EXIT_REFUSED`` (4) and one line naming the server and the reason::

    event=fatal reason=kafka_auth_failed broker=127.0.0.1:9093 detail="..."

Under systemd the consumer's unit is not restarted on exit 4 (``RestartPreventExitStatus``): it
stays failed until the configuration is fixed, instead of a loop of failed logins. Outages
(connection refused, timeouts, 5xx, 429) are never refusals: those keep being retried in-process.
Fatal client states (``logpipe.fatal.fatal_cause``) are a third kind: exit 1, restart helps.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from logpipe import log
from logpipe.fatal import FatalError, cause_code, error_in, fatal_error, fatal_logged

EXIT_REFUSED = 4

KAFKA_AUTH = "kafka_auth_failed"
KAFKA_TLS = "kafka_tls_failed"
KAFKA_ACL = "kafka_not_authorized"
ES_AUTH = "es_auth_failed"
ES_TLS = "es_tls_failed"
ES_PRIVILEGE = "es_not_authorized"

_KAFKA_AUTH_CODES = frozenset({KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED})
_KAFKA_ACL_CODES = frozenset({
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.GROUP_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
})
# OpenSSL's wording for every verification failure (unknown CA, expired, name mismatch). Other
# TLS errors (a handshake cut short by a restarting server) are outages and stay retriable.
_VERIFY_FAILED = ("certificate verify failed", "certificate_verify_failed")
# librdkafka prefixes broker errors with the broker's name: "sasl_ssl://10.0.0.5:9093/1: ...".
_BROKER_PREFIX = re.compile(r"^(?:[a-z_]+://)?([^/\s]+:\d+)/\S*:")
_MAX_DETAIL = 300
_SLICE_S = 1.0


@dataclass(frozen=True)
class Refusal:
    reason: str
    # "broker" (Kafka) or "host" (Elasticsearch): the field name in the log line.
    target_key: str
    target: str
    detail: str

    def fields(self) -> dict[str, Any]:
        return {"reason": self.reason, self.target_key: self.target,
                "detail": self.detail[:_MAX_DETAIL]}

    def log(self) -> None:
        log.error("fatal", **self.fields())

    def text(self) -> str:
        """The same fields as one plain line (for ``logpipe check`` output)."""
        return f"{self.reason} {self.target_key}={self.target} detail={self.detail[:_MAX_DETAIL]}"

    def at(self, target: str) -> Refusal:
        """This refusal with the target filled in when the classifier could not know it."""
        return self if self.target else replace(self, target=target)


class Refused(Exception):
    """Raised to unwind a command at a refusal; the CLI logs it and exits ``EXIT_REFUSED``."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.text())
        self.refusal = refusal


def _verify_failed(text: str) -> bool:
    lowered = text.lower()
    return any(marker in lowered for marker in _VERIFY_FAILED)


def kafka(err: KafkaError, bootstrap: str) -> Refusal | None:
    """The refusal a librdkafka error means, or None for anything retriable."""
    text = err.str()
    match = _BROKER_PREFIX.match(text)
    broker = match.group(1) if match else bootstrap
    # A fatal error's cause (``_FATAL`` on a consumer) may itself be a refusal.
    code = cause_code(err)
    if code in _KAFKA_AUTH_CODES:
        return Refusal(KAFKA_AUTH, "broker", broker, text)
    if code in _KAFKA_ACL_CODES:
        return Refusal(KAFKA_ACL, "broker", broker, f"{err.name()}: {text}")
    if code in (KafkaError._SSL, KafkaError._TRANSPORT) and _verify_failed(text):
        return Refusal(KAFKA_TLS, "broker", broker, text)
    return None


def elasticsearch(exc: BaseException, hosts: Sequence[str]) -> Refusal | None:
    """The refusal an elasticsearch-py exception means, or None for anything retriable."""
    from elastic_transport import TlsError
    from elasticsearch import ApiError

    fallback = ",".join(hosts)
    if isinstance(exc, ApiError) and exc.meta.status in (401, 403):
        node = exc.meta.node
        host = f"{node.scheme}://{node.host}:{node.port}" if node is not None else fallback
        reason = ES_AUTH if exc.meta.status == 401 else ES_PRIVILEGE
        return Refusal(reason, "host", host, f"HTTP {exc.meta.status}: {exc.message}: "
                                             f"{_es_reason(exc)}")
    if isinstance(exc, TlsError):
        # str() of a TlsError is just "TLS error"; the reason is in its message and cause.
        for text in (exc.message, repr(exc.__cause__), *(str(e) for e in exc.errors)):
            if _verify_failed(text):
                return Refusal(ES_TLS, "host", fallback, text)
    return None


def _es_reason(exc: BaseException) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            return str(error.get("reason", ""))
    return ""


def find(exc: BaseException | None, bootstrap: str, hosts: Sequence[str]) -> Refusal | None:
    """The refusal behind ``exc`` or any exception in its ``__cause__`` chain."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, Refused):
            return exc.refusal
        if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
            found = kafka(exc.args[0], bootstrap)
        else:
            found = elasticsearch(exc, hosts)
        if found is not None:
            return found
        exc = exc.__cause__
        seen += 1
    return None


class KafkaErrorWatch:
    """An ``error_cb`` that remembers the first refusal librdkafka reports, and the first fatal
    client state (``logpipe.fatal.fatal_cause``) it sees.

    librdkafka reports a rejected password or certificate only through this callback (requests
    just time out), and only from ``poll()``/``consume()``/``flush()``: callers that block in
    other calls poll the client and then ``check()``. A producer's fatal error never reaches
    the callback: confluent-kafka raises it from ``poll()``/``flush()`` instead, and callers hand
    the exception to ``caught()``.
    """

    def __init__(self, bootstrap: str, client: str = "client") -> None:
        self.bootstrap = bootstrap
        self.client = client
        self.refusal: Refusal | None = None
        self.fatal: FatalError | None = None

    def __call__(self, err: KafkaError) -> None:
        # Other errors (brokers down, timeouts) are retried by the client and already appear
        # as its own `event=librdkafka` lines.
        found = kafka(err, self.bootstrap)
        if found is not None:
            if self.refusal is None:
                self.refusal = found
        else:
            self._note(fatal_error(err, self.client))

    def _note(self, found: FatalError | None) -> None:
        if found is not None and found.replaces(self.fatal):
            self.fatal = found

    def logged(self, facility: str, message: str) -> None:
        """``RdKafkaLogger`` listener: librdkafka's log line announcing a fatal error."""
        self._note(fatal_logged(facility, message, self.client))

    def caught(self, exc: BaseException) -> bool:
        """Remember the refusal or fatal error ``exc`` carries (``logpipe.fatal.error_in``);
        False if it carries neither (the caller re-raises). A SystemError from the client is
        its fatal-error path losing the exception (``logpipe.fatal.RAISED_BY_CLIENT``): the
        client is unusable either way."""
        err = error_in(exc)
        if err is None:
            if not isinstance(exc, SystemError):
                return False
            self._note(FatalError(self.client, KafkaError(KafkaError._FATAL).name(), str(exc)))
            return True
        self(err)
        return kafka(err, self.bootstrap) is not None or fatal_error(err, self.client) is not None

    @property
    def stopped(self) -> bool:
        """Refused or fatal: this client can deliver nothing more."""
        return self.refusal is not None or self.fatal is not None

    def check(self) -> None:
        """Raise ``Refused`` if a refusal was reported."""
        if self.refusal is not None:
            raise Refused(self.refusal)

    def list_topics(self, client: Any, timeout_s: float) -> Any:
        """``client.list_topics()`` in one-second slices, serving the error callback between
        them: a refusal ends the wait within a second or so instead of at ``timeout_s``.
        ``client`` is a Consumer or an AdminClient built with this watch as its ``error_cb``.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                metadata = client.list_topics(timeout=max(0.1, min(_SLICE_S, left)))
            except KafkaException:
                self._serve(client)
                if left <= _SLICE_S:
                    raise
                continue
            self._serve(client)
            return metadata

    def _serve(self, client: Any) -> None:
        """Run the client's callbacks, then raise ``Refused`` if one reported a refusal."""
        event = client.poll(0)
        # A Consumer's poll() hands over errors as events (an AdminClient's returns a count):
        # the group coordinator's refusal arrives that way.
        error = event.error() if event is not None and hasattr(event, "error") else None
        if error is not None:
            self(error)
        self.check()
