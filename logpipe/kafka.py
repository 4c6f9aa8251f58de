"""librdkafka client settings shared by the producer, consumer, DLQ producer and admin client."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from logpipe.config import KafkaConfig, read_secret


def client_config(cfg: KafkaConfig, client_id: str) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "bootstrap.servers": cfg.bootstrap_servers,
        "client.id": client_id,
        "security.protocol": cfg.security_protocol.lower(),
    }
    if cfg.security_protocol.startswith("SASL"):
        conf["sasl.mechanism"] = cfg.sasl_mechanism
        conf["sasl.username"] = cfg.sasl_username
        if cfg.sasl_password_file:
            conf["sasl.password"] = read_secret(cfg.sasl_password_file, "kafka.sasl_password_file")
    if cfg.ssl_ca_location:
        conf["ssl.ca.location"] = cfg.ssl_ca_location
    conf.update(cfg.client_overrides)
    return conf


class RdKafkaLogger:
    """Pass as ``logger=`` to a client: librdkafka's own lines become key=value events instead
    of its ``%3|1795...|FAIL|...`` format on stderr.

    confluent-kafka calls ``logger.log(level, "%s [%s] %s", facility, client_name, message)``.
    ``listener(facility, message)``, if given, sees every line first (the fatal-error line:
    ``logpipe.fatal.fatal_logged``).
    """

    def __init__(self, listener: Callable[[str, str], None] | None = None) -> None:
        from logpipe import log

        self._listener = listener
        # While a broker is down librdkafka logs each reconnect (~every 50 ms to 1 s): keep one
        # line per facility and level every 10 s, with how many were held back.
        self._throttle = log.Throttle()

    def log(self, level: int, fmt: str, *args: object) -> None:
        from logpipe import log  # local: keeps this module free of import cycles

        if len(args) == 3:
            facility, client, message = args
            if self._listener is not None:
                self._listener(str(facility), str(message))
            repeated = self._throttle.held((facility, client, level))
            if repeated is None:
                return
            fields: dict[str, Any] = {"facility": facility, "client": client,
                                         "message": message}
            if repeated:
                fields["repeated"] = repeated
            log.event("librdkafka", level, **fields)
        else:
            log.event("librdkafka", level, message=fmt % args if args else fmt)
