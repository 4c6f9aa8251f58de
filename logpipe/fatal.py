"""Fatal client states: librdkafka errors after which a client can never work again.

A static group member fenced by another instance with the same ``group.instance.id``, an
idempotent producer whose sequence state is lost: only a new client helps, so every command stops
at the first one with exit code 1 and one line naming the client and the cause::

    event=fatal reason=kafka_fatal client=consumer cause=FENCED_INSTANCE_ID detail="..."

Under systemd the consumer's unit is then restarted (``Restart=on-failure``). Refusals
(``logpipe.refusal``: credentials, certificates, ACLs) are the other kind of stop, a configuration
problem (exit 4, not restarted); a fatal error caused by one is a refusal.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from logpipe import log

# Codes after which this client instance can never work again, whatever ``fatal()`` says.
# librdkafka ends an instance by recording a fatal error on it and reporting the generic _FATAL;
# confluent-kafka sets ``fatal()`` only where that report reaches its error callback (a
# producer's poll()/flush() then raise it). A consumer gets it as a message error from consume()
# and every later commit/subscribe fails: code _FATAL (or the broker's own code on the request
# that found out), ``fatal()`` false. See librdkafka's INTRODUCTION.md, "Fatal errors".
_FATAL_CODES = frozenset({
    KafkaError._FATAL,
    # Static membership (group.instance.id): another instance took this identity (the classic
    # protocol fences the older member) or still holds it (KIP-848 refuses the newer one).
    KafkaError.FENCED_INSTANCE_ID,
    KafkaError.UNRELEASED_INSTANCE_ID,
    # A producer fenced by a newer instance: librdkafka's normalised code, and the broker's.
    KafkaError._FENCED,
    KafkaError.PRODUCER_FENCED,
    # Only ever raised as a fatal error (enable.gapless.guarantee).
    KafkaError._GAPLESS_GUARANTEE,
})
# How librdkafka words the consumer's copy of a fatal error: "Fatal error: <cause>: <reason>".
_FATAL_PREFIX = "Fatal error: "
# ... and its log line about it (facility FATAL): "[thrd:main]: Fatal error: <cause>: <reason>".
_THREAD_PREFIX = re.compile(r"^\[thrd:[^\]]*\]: ")
_FATAL_FACILITY = "FATAL"
FATAL_REASON = "kafka_fatal"
_MAX_DETAIL = 300


@functools.cache
def _codes_by_text() -> tuple[tuple[str, int], ...]:
    """librdkafka's description of every error code, longest first (some prefix others)."""
    codes = {getattr(KafkaError, name) for name in dir(KafkaError)}
    pairs = {(KafkaError(code).str(), code) for code in codes if isinstance(code, int)}
    return tuple(sorted(pairs, key=lambda pair: -len(pair[0])))


def cause_code(err: KafkaError) -> int:
    """The code behind ``err``: for the generic _FATAL the one its text names, when it does."""
    code = err.code()
    text = err.str()
    if code != KafkaError._FATAL or not text.startswith(_FATAL_PREFIX):
        return code
    rest = text[len(_FATAL_PREFIX):]
    for description, named in _codes_by_text():
        if named != KafkaError._FATAL and rest.startswith(description):
            return named
    return code


def fatal_cause(err: KafkaError) -> str | None:
    """None if the client can go on after ``err``; else the name of the error that ended it
    (``FENCED_INSTANCE_ID``, ...; ``_FATAL`` when librdkafka did not say which).

    Refusals (``logpipe.refusal``) are decided first by the callers: a fatal error caused by
    one is a configuration problem, not a client state.
    """
    if not (err.fatal() or err.code() in _FATAL_CODES):
        return None
    return KafkaError(cause_code(err)).name()


@dataclass(frozen=True)
class FatalError:
    """A client that cannot continue: the command logs one line and exits 1, and systemd
    restarts it with a new client (``Restart=on-failure``)."""

    # "consumer", "dlq" (the dead-letter producer) or "producer".
    client: str
    cause: str
    detail: str

    def fields(self) -> dict[str, Any]:
        return {"reason": FATAL_REASON, "client": self.client, "cause": self.cause,
                "detail": self.detail[:_MAX_DETAIL]}

    def log(self) -> None:
        log.error("fatal", **self.fields())

    @property
    def specific(self) -> bool:
        """Whether the cause is known (not just librdkafka's generic _FATAL)."""
        return self.cause != KafkaError(KafkaError._FATAL).name()

    def replaces(self, current: FatalError | None) -> bool:
        """Whether to keep this report instead of ``current``: the first one wins, unless it
        only said the generic _FATAL and this one names the cause."""
        return current is None or (self.specific and not current.specific)


def fatal_error(err: KafkaError, client: str) -> FatalError | None:
    cause = fatal_cause(err)
    return FatalError(client, cause, err.str()) if cause is not None else None


# What a producer's poll()/flush() may raise for a fatal error. confluent-kafka sets the
# KafkaException in its error callback without putting it aside, and librdkafka goes on serving
# the delivery reports and log lines already queued: Python code then runs with the exception
# pending. The caller gets the KafkaException, or a SystemError caused by it ("returned a result
# with an exception set"), or a SystemError that lost it ("returned NULL without setting an
# exception"): all three seen with confluent-kafka 2.16.1 (see also its issue 865).
RAISED_BY_CLIENT = (KafkaException, SystemError)


def error_in(exc: BaseException | None) -> KafkaError | None:
    """The ``KafkaError`` of the ``KafkaException`` that is ``exc`` or caused it, if any."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
            return exc.args[0]
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def fatal_logged(facility: str, message: str, client: str) -> FatalError | None:
    """The fatal error a librdkafka log line announces, if it is one. librdkafka logs every
    fatal error as it happens (when an error callback is set), with its cause: the one report
    of it a producer is sure to get (``RAISED_BY_CLIENT``)."""
    if facility != _FATAL_FACILITY:
        return None
    text = _THREAD_PREFIX.sub("", message)
    if not text.startswith(_FATAL_PREFIX):
        return None
    cause = KafkaError(cause_code(KafkaError(KafkaError._FATAL, text))).name()
    return FatalError(client, cause, text)


def fatal_in(exc: BaseException, client: str) -> FatalError | None:
    """The fatal error an exception carries (see ``error_in``), if any."""
    err = error_in(exc)
    return fatal_error(err, client) if err is not None else None
