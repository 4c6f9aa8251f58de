"""The command line, and the command logic behind it with fake clients (no servers)."""

from __future__ import annotations

import json
import re
import time
import tomllib
from datetime import date
from pathlib import Path
from typing import Any, ClassVar

import pytest

from logpipe import admin, cli, log, ops, producer
from logpipe.config import SECRET_MASK, CheckConfig, Config, ElasticsearchConfig

SUBCOMMANDS = [["produce"], ["bootstrap"], ["prune"], ["consume"], ["status"], ["check"], ["alert"],
               ["config"], ["config", "show"]]


def _config_file(tmp_path: Path, text: str = "") -> str:
    path = tmp_path / "logpipe.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=" ".join)
def test_help_for_every_subcommand(words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([*words, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: logpipe " + " ".join(words))
    assert "--config" in out


def test_top_level_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in ("produce", "bootstrap", "consume", "status", "check", "config"):
        assert name in out
    # Every module the help names as deciding a behaviour exists (two hops: help, then the file).
    where = out[out.index("where each behaviour is decided"):]
    named = set(re.findall(r"\b([a-z]+)\.py\b", where))
    assert {"offsets", "dlq", "producer", "consumer"} <= named
    for module in named:
        assert (Path(cli.__file__).parent / f"{module}.py").is_file(), module


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("logpipe 0.")


def test_no_command_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2


SECRET_CONFIG = """
[kafka]
security_protocol = "SASL_SSL"
sasl_mechanism = "PLAIN"
sasl_username = "logpipe"
sasl_password_file = "/etc/logpipe/kafka.pw"
client_overrides = { "ssl.key.password" = "hunter2" }
[producer]
seed = 5
"""


def test_config_show_toml_masks_secrets_and_round_trips(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _config_file(tmp_path, SECRET_CONFIG)
    assert cli.main(["--config", path, "config", "show"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out
    shown = tomllib.loads(out)
    assert shown["kafka"]["client_overrides"]["ssl.key.password"] == SECRET_MASK
    assert shown["kafka"]["sasl_password_file"] == "/etc/logpipe/kafka.pw"
    assert shown["producer"]["seed"] == 5
    assert shown["elasticsearch"]["hosts"] == ["http://localhost:9200"]


def test_config_show_json_and_config_after_subcommand(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _config_file(tmp_path, SECRET_CONFIG)
    assert cli.main(["config", "show", "--format", "json", "--config", path]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out
    shown = json.loads(out)
    assert shown["kafka"]["sasl_username"] == "logpipe"
    assert shown["producer"]["seed"] == 5


def test_config_show_uses_env_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LOGPIPE_CONFIG", _config_file(tmp_path))
    monkeypatch.setenv("LOGPIPE_KAFKA_PARTITIONS", "9")
    assert cli.main(["config", "show"]) == 0
    assert tomllib.loads(capsys.readouterr().out)["kafka"]["partitions"] == 9


def test_config_show_unset_seed_is_a_comment(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--config", _config_file(tmp_path), "config", "show"]) == 0
    out = capsys.readouterr().out
    assert "# seed is unset" in out
    assert "seed" not in tomllib.loads(out)["producer"]


@pytest.mark.parametrize(("text", "key"), [
    ("[kafka]\npartitons = 6\n", "kafka.partitons"),
    ("[consumer]\nbatch_size = \"big\"\n", "consumer.batch_size"),
])
def test_bad_config_exits_2_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           text: str, key: str) -> None:
    assert cli.main(["--config", _config_file(tmp_path, text), "config", "show"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"logpipe: config error: {key}")


def test_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--config", str(tmp_path / "nope.toml"), "status"]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_bad_flag_value_exits_2_naming_the_key(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--config", _config_file(tmp_path), "produce", "--count", "-5"]) == 2
    assert "producer.count" in capsys.readouterr().err


def test_pidfile_without_daemon_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--config", _config_file(tmp_path), "consume", "--pidfile", "/tmp/x.pid"])
    assert info.value.code == 2


def test_consume_passes_flags_to_the_consumer(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from logpipe import consumer

    seen: list[Config] = []

    def fake_run(cfg: Config) -> int:
        seen.append(cfg)
        return 7

    monkeypatch.setattr(consumer, "run", fake_run)
    code = cli.main(["--config", _config_file(tmp_path), "consume", "--max-batches", "3",
                     "--batch-size", "50"])
    assert code == 7
    assert seen[0].consumer.max_batches == 3 and seen[0].consumer.batch_size == 50


def test_check_flags_override_thresholds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(ops, "collect", lambda cfg: _status(lag=500))
    path = _config_file(tmp_path)
    assert cli.main(["--config", path, "check"]) == ops.OK
    assert capsys.readouterr().out.startswith("LOGPIPE OK - lag=500 ")
    assert cli.main(["--config", path, "check", "--lag-warning", "100"]) == ops.WARNING
    assert cli.main(["--config", path, "check", "--lag-warning", "100",
                     "--max-lag", "400"]) == ops.CRITICAL
    out = capsys.readouterr().out
    assert "LOGPIPE CRITICAL - lag=500" in out and "lag=500;100;400;0" in out


# ---------------------------------------------------------------------------------------------
# check evaluation


def _status(lag: int = 0, end: int = 1000, dlq: int = 0, size: int = 100,
            since_commit_s: float | None = 5.0) -> ops.Status:
    part = ops.PartitionStatus(partition=0, low=0, end=end, committed=end - lag, lag=lag,
                               since_commit_s=since_commit_s)
    dlq_part = ops.PartitionStatus(partition=0, low=0, end=dlq, committed=None, lag=0)
    return ops.Status(
        kafka=ops.KafkaStatus(topic="t", group_id="g", partitions=[part], dlq_topic="t.dlq",
                              dlq_partitions=[dlq_part]),
        elasticsearch=ops.EsStatus(alias="t", docs=end - lag, newest_indexed_at=None,
                                   index_bytes=size))


@pytest.mark.parametrize(("status", "code", "word"), [
    (_status(), ops.OK, "OK"),
    (_status(lag=10_001), ops.WARNING, "WARNING"),
    (_status(lag=100_001, end=200_000), ops.CRITICAL, "CRITICAL"),
    (_status(dlq=20), ops.WARNING, "WARNING"),  # 2 % > 1 %
    (_status(dlq=60), ops.CRITICAL, "CRITICAL"),
    (_status(size=60 * 1024**3), ops.WARNING, "WARNING"),
    # Lag with an old last commit: stalled; an old commit without lag is an idle partition.
    (_status(lag=10, since_commit_s=301), ops.WARNING, "WARNING"),
    (_status(lag=10, since_commit_s=901), ops.CRITICAL, "CRITICAL"),
    (_status(lag=0, since_commit_s=5000), ops.OK, "OK"),
    # No commit time to judge by (another client's commit): not a stall, said as unknown.
    (_status(lag=10, since_commit_s=None), ops.OK, "OK"),
    (ops.Status(errors={"kafka": "broker down"}), ops.UNKNOWN, "UNKNOWN"),
])
def test_evaluate(status: ops.Status, code: int, word: str) -> None:
    got, line = ops.evaluate(status, CheckConfig())
    assert got == code, line
    assert line.startswith(f"LOGPIPE {word} - ")
    if code != ops.UNKNOWN:
        assert " | lag=" in line and "error_rate=" in line and "index_bytes=" in line


def test_stall_thresholds_name_themselves_and_zero_turns_them_off() -> None:
    stalled = _status(lag=10, since_commit_s=400)
    code, line = ops.evaluate(stalled, CheckConfig())
    assert code == ops.WARNING
    assert "stalled_s=400 (stalled_s>300)" in line and "stalled_s=400s;300;900;0" in line
    code, line = ops.evaluate(stalled, CheckConfig(stall_warning_s=0, stall_critical_s=0))
    assert code == ops.OK, line
    assert "stalled_s=unknown" in ops.evaluate(_status(lag=1, since_commit_s=None),
                                               CheckConfig())[1]


def test_error_rate_without_messages_is_zero() -> None:
    assert _status(end=0).kafka is not None
    assert _status(end=0).kafka.error_rate == 0.0  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------------
# prune and the template (fake Elasticsearch)


class _FakeIndices:
    def __init__(self, names: list[str]) -> None:
        self.names = set(names)
        self.deleted: list[str] = []

    def get_alias(self, index: str, expand_wildcards: str) -> dict[str, Any]:
        prefix = index.rstrip("*")
        return {n: {} for n in self.names if n.startswith(prefix)}

    def delete(self, index: str) -> None:
        assert "*" not in index and "," not in index
        self.deleted.append(index)
        self.names.discard(index)


class _FakeES:
    def __init__(self, names: list[str]) -> None:
        self.indices = _FakeIndices(names)


def test_prune_deletes_only_old_daily_indices() -> None:
    names = ["web-logs-topic-2026.10.24", "web-logs-topic-2026.10.25", "web-logs-topic-2026.11.24",
             "web-logs-topic-2026.12.01", "web-logs-topic-2020.01.01-restored",
             "web-logs-topic-archive-2020.01.01", "web-logs-topic-2020.13.45",
             "web-logs-topic-2020.1.1", "other-2020.01.01"]
    fake = _FakeES(names)
    cfg = ElasticsearchConfig(retention_days=30)
    deleted = admin.prune(fake, cfg, today=date(2026, 11, 24))  # type: ignore[arg-type]
    assert deleted == ["web-logs-topic-2026.10.24"]
    assert fake.indices.deleted == deleted


def test_prune_zero_keeps_everything() -> None:
    fake = _FakeES(["web-logs-topic-2000.01.01"])
    cfg = ElasticsearchConfig(retention_days=0)
    assert admin.prune(fake, cfg, today=date(2026, 11, 24)) == []  # type: ignore[arg-type]
    assert fake.indices.deleted == []


def test_template_matches_generator_fields() -> None:
    from logpipe.generator import FIELDS

    body = admin.index_template(ElasticsearchConfig(replicas=0))
    assert body["index_patterns"] == ["web-logs-topic-*"]
    assert body["template"]["aliases"] == {"web-logs-topic": {}}
    assert body["template"]["settings"]["number_of_replicas"] == 0
    mappings = body["template"]["mappings"]
    assert mappings["dynamic"] == "strict"
    assert set(mappings["properties"]) == {*FIELDS, "indexed_at"}
    assert mappings["properties"]["client_ip"]["type"] == "ip"
    assert mappings["properties"]["timestamp"]["type"] == "date"


# ---------------------------------------------------------------------------------------------
# producer accounting (fake confluent_kafka.Producer)


class _FakeProducer:
    """Accepts messages, raises BufferError while 100 are unreported, reports on poll."""

    instances: ClassVar[list[_FakeProducer]] = []
    fail_every = 0
    # Block in poll() like librdkafka: for the timeout rounded down to whole milliseconds.
    blocking_poll = False

    def __init__(self, conf: dict[str, Any], logger: Any = None) -> None:
        self.conf = conf
        self.pending: list[tuple[bytes, Any]] = []
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.buffer_errors = 0
        self.polls = 0
        _FakeProducer.instances.append(self)

    def produce(self, topic: str, value: bytes, key: bytes, on_delivery: Any) -> None:
        if len(self.pending) >= 100:
            self.buffer_errors += 1
            raise BufferError("queue full")
        self.sent.append((topic, key, value))
        self.pending.append((key, on_delivery))

    def poll(self, timeout: float = 0) -> int:
        self.polls += 1
        if self.blocking_poll:
            time.sleep(int(timeout * 1000) / 1000)
        served = len(self.pending)
        for i, (_key, cb) in enumerate(self.pending):
            failed = self.fail_every and (len(self.sent) - served + i) % self.fail_every == 0
            cb(_Err() if failed else None, _Msg())
        self.pending.clear()
        return served

    def flush(self, timeout: float = 0) -> int:
        self.poll()
        return 0


class _Err:
    def str(self) -> str:
        return "boom"

    def code(self) -> int:
        from confluent_kafka import KafkaError

        return int(KafkaError._MSG_TIMED_OUT)

    def name(self) -> str:
        return "_MSG_TIMED_OUT"

    def retriable(self) -> bool:
        return False

    def fatal(self) -> bool:
        return False


class _Msg:
    def topic(self) -> str:
        return "web-logs-topic"


@pytest.fixture
def fake_producer(monkeypatch: pytest.MonkeyPatch) -> type[_FakeProducer]:
    _FakeProducer.instances = []
    _FakeProducer.fail_every = 0
    monkeypatch.setattr(producer, "Producer", _FakeProducer)
    return _FakeProducer


def test_produce_counts_deliveries_and_survives_full_queue(
        fake_producer: type[_FakeProducer]) -> None:
    result = producer.produce(Config(), 2500, seed=1)
    fake = fake_producer.instances[0]
    assert result.produced == result.delivered == 2500 and result.ok
    assert fake.buffer_errors > 0, "the fake queue should have filled up"
    assert len({key for _, key, _ in fake.sent}) == 2500
    assert fake.conf["enable.idempotence"] is True and fake.conf["acks"] == "all"
    assert fake.conf["compression.type"] == "zstd"
    topic, key, value = fake.sent[0]
    assert topic == "web-logs-topic" and json.loads(value)["log_id"] == key.decode()


def test_produce_failures_make_exit_code_1(fake_producer: type[_FakeProducer],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    fake_producer.fail_every = 10
    result = producer.produce(Config(), 100)
    assert result.failed == 10 and result.delivered == 90 and not result.ok
    assert producer.run(Config().replace("producer", count=100)) == 1


class _FencedProducer(_FakeProducer):
    """An idempotent producer that reaches a fatal state after 150 messages: confluent-kafka
    raises the error from poll()/flush() (fatal() true), once; produce() fails with its code
    (fatal() false) from the moment it is set, before any poll() reported it."""

    raised = False

    def produce(self, topic: str, value: bytes, key: bytes, on_delivery: Any) -> None:
        from confluent_kafka import KafkaError, KafkaException

        if len(self.sent) >= 150:
            raise KafkaException(KafkaError(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER))
        super().produce(topic, value, key, on_delivery)

    def poll(self, timeout: float = 0) -> int:
        from confluent_kafka import KafkaError, KafkaException

        served = super().poll(timeout)
        if len(self.sent) >= 150 and not self.raised:
            self.raised = True
            raise KafkaException(KafkaError(
                KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
                "ProduceRequest for web-logs-topic [0] with 5 message(s) failed due to "
                "sequence desynchronization with broker 1", fatal=True))
        return served

    def __len__(self) -> int:
        return len(self.pending)


def test_produce_stops_at_a_fatal_state_with_one_line(fake_producer: type[_FakeProducer],
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str],
                                                      ) -> None:
    log.setup("INFO")
    monkeypatch.setattr(producer, "Producer", _FencedProducer)
    result = producer.produce(Config(), 10_000)
    assert result.fatal is not None and not result.ok
    assert result.produced == 150 and result.delivered == 150
    assert producer.run(Config().replace("producer", count=10_000)) == 1
    fatal = [line for line in capsys.readouterr().err.splitlines() if "event=fatal" in line]
    assert len(fatal) == 2, fatal  # one per run
    assert "reason=kafka_fatal client=producer cause=OUT_OF_ORDER_SEQUENCE_NUMBER" in fatal[0]


def test_produce_rate_mode_paces(fake_producer: type[_FakeProducer]) -> None:
    result = producer.produce(Config(), 0, rate=200, duration=0.5)
    assert 90 <= result.produced <= 100
    assert result.elapsed_s >= 0.4


def test_produce_rate_mode_waits_instead_of_spinning(fake_producer: type[_FakeProducer],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # 1,000 logs/s for 0.5 s is 25 chunks of 20: about one wait and one send per chunk. A loop
    # that asks poll() for less than a millisecond spins thousands of times instead.
    monkeypatch.setattr(fake_producer, "blocking_poll", True)
    result = producer.produce(Config(), 0, rate=1000, duration=0.5)
    assert result.produced == 500 and result.delivered == 500
    assert result.elapsed_s >= 0.45
    assert fake_producer.instances[-1].polls < 150, fake_producer.instances[-1].polls
