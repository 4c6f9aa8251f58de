"""Config loading and validation: every bad input fails with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from logpipe import config
from logpipe.config import SECRET_MASK, Config, ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "logpipe.example.toml"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "logpipe.toml"
    path.write_text(text)
    return path


def test_defaults_without_file(tmp_path: Path) -> None:
    cfg = config.load(environ={"LOGPIPE_CONFIG": str(_write(tmp_path, ""))})
    assert cfg == Config()
    assert cfg.kafka.topic == "web-logs-topic" and cfg.kafka.partitions == 6
    assert cfg.producer.count == 100 and cfg.producer.compression == "zstd"


def test_missing_default_file_is_fine_but_explicit_missing_file_is_an_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "absent.toml")
    assert config.load(environ={}) == Config()
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "absent.toml", environ={})
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(environ={"LOGPIPE_CONFIG": str(tmp_path / "absent.toml")})


def test_file_values(tmp_path: Path) -> None:
    path = _write(tmp_path, '[kafka]\npartitions = 12\n[elasticsearch]\nhosts = ["http://a:9200"]\n')
    cfg = config.load(path, environ={})
    assert cfg.kafka.partitions == 12
    assert cfg.elasticsearch.hosts == ["http://a:9200"]


@pytest.mark.parametrize(("text", "key"), [
    ("[kafka]\npartitons = 3\n", "kafka.partitons"),
    ("[kafak]\n", "kafak"),
    ("[kafka]\npartitions = \"six\"\n", "kafka.partitions"),
    ("[kafka]\npartitions = true\n", "kafka.partitions"),
    ("[kafka]\npartitions = 0\n", "kafka.partitions"),
    ("[consumer]\nmax_bulk_bytes = 0\n", "consumer.max_bulk_bytes"),
    ("[elasticsearch]\nverify_certs = \"yes\"\n", "elasticsearch.verify_certs"),
    ("[elasticsearch]\nhosts = \"http://a:9200\"\n", "elasticsearch.hosts"),
    ("[elasticsearch]\nreplicas = -1\n", "elasticsearch.replicas"),
    ("[producer]\ncompression = \"brotli\"\n", "producer.compression"),
    ("[logging]\nlevel = \"LOUD\"\n", "logging.level"),
    ("kafka = 1\n", "kafka"),
])
def test_bad_values_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(_write(tmp_path, text), environ={})
    assert str(info.value).startswith(key), str(info.value)


def test_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(_write(tmp_path, "[kafka\n"), environ={})


def test_env_overrides_file_and_parses_types(tmp_path: Path) -> None:
    path = _write(tmp_path, "[kafka]\npartitions = 12\n")
    cfg = config.load(path, environ={
        "LOGPIPE_KAFKA_PARTITIONS": "3",
        "LOGPIPE_KAFKA_BOOTSTRAP_SERVERS": "k1:9092,k2:9092",
        "LOGPIPE_ELASTICSEARCH_HOSTS": "http://a:9200, http://b:9200,",
        "LOGPIPE_CONSUMER_RETRY_MAX_BACKOFF_S": "60",
        "LOGPIPE_PRODUCER_SEED": "42",
    })
    assert cfg.kafka.partitions == 3
    assert cfg.kafka.bootstrap_servers == "k1:9092,k2:9092"
    assert cfg.elasticsearch.hosts == ["http://a:9200", "http://b:9200"]
    assert cfg.consumer.retry_max_backoff_s == 60.0
    assert cfg.producer.seed == 42


def test_env_empty_optional_is_none(tmp_path: Path) -> None:
    path = _write(tmp_path, "[producer]\nseed = 7\n")
    assert config.load(path, environ={}).producer.seed == 7
    assert config.load(path, environ={"LOGPIPE_PRODUCER_SEED": ""}).producer.seed is None


@pytest.mark.parametrize(("raw", "expected"), [
    ("true", True), ("1", True), ("yes", True), ("ON", True),
    ("false", False), ("0", False), ("no", False), ("off", False),
])
def test_env_bool_parsing(tmp_path: Path, raw: str, expected: bool) -> None:
    cfg = config.load(_write(tmp_path, ""), environ={"LOGPIPE_ELASTICSEARCH_VERIFY_CERTS": raw})
    assert cfg.elasticsearch.verify_certs is expected


def test_env_bad_bool_and_unknown_names(tmp_path: Path) -> None:
    path = _write(tmp_path, "")
    with pytest.raises(ConfigError, match=r"^elasticsearch\.verify_certs"):
        config.load(path, environ={"LOGPIPE_ELASTICSEARCH_VERIFY_CERTS": "maybe"})
    with pytest.raises(ConfigError, match="LOGPIPE_KAFAK_TOPIC"):
        config.load(path, environ={"LOGPIPE_KAFAK_TOPIC": "x"})
    with pytest.raises(ConfigError, match=r"^kafka\.topik"):
        config.load(path, environ={"LOGPIPE_KAFKA_TOPIK": "x"})
    with pytest.raises(ConfigError, match=r"^kafka\.partitions"):
        config.load(path, environ={"LOGPIPE_KAFKA_PARTITIONS": "many"})


@pytest.mark.parametrize(("text", "key"), [
    ("[kafka]\nreplication_factor = 1\nmin_insync_replicas = 2\n", "kafka.min_insync_replicas"),
    ("[kafka]\ndlq_topic = \"web-logs-topic\"\n", "kafka.dlq_topic"),
    ("[kafka]\nsecurity_protocol = \"SASL_SSL\"\n", "kafka.sasl_mechanism"),
    ("[elasticsearch]\nhosts = []\n", "elasticsearch.hosts"),
    ("[consumer]\nretry_initial_backoff_s = 5\nretry_max_backoff_s = 1\n",
     "consumer.retry_max_backoff_s"),
    ("[check]\nlag_warning = 10\nlag_critical = 5\n", "check.lag_critical"),
])
def test_cross_key_rules(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(_write(tmp_path, text), environ={})
    assert str(info.value).startswith(key), str(info.value)


def test_replace_validates() -> None:
    cfg = Config().replace("producer", count=5, seed=3)
    assert cfg.producer.count == 5 and cfg.producer.seed == 3
    with pytest.raises(ConfigError, match=r"^producer\.count"):
        Config().replace("producer", count=-1)
    with pytest.raises(ConfigError, match=r"^producer\.cuont"):
        Config().replace("producer", cuont=1)


def test_masked_hides_inline_secrets_but_shows_secret_file_paths(tmp_path: Path) -> None:
    path = _write(tmp_path, """
[kafka]
security_protocol = "SASL_SSL"
sasl_mechanism = "SCRAM-SHA-512"
sasl_username = "logpipe"
sasl_password_file = "/etc/logpipe/kafka.pw"
client_overrides = { "ssl.key.password" = "hunter2", "socket.keepalive.enable" = "true" }
""")
    shown = config.masked(config.load(path, environ={}))
    assert shown["kafka"]["sasl_password_file"] == "/etc/logpipe/kafka.pw"
    assert shown["kafka"]["client_overrides"]["ssl.key.password"] == SECRET_MASK
    assert shown["kafka"]["client_overrides"]["socket.keepalive.enable"] == "true"
    assert "hunter2" not in repr(shown)


def test_read_secret(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    assert config.read_secret(str(secret), "elasticsearch.password_file") == "s3cret"
    with pytest.raises(ConfigError, match=r"^elasticsearch\.password_file: cannot read"):
        config.read_secret(str(tmp_path / "absent"), "elasticsearch.password_file")


def test_example_file_loads_and_lists_every_key() -> None:
    cfg = config.load(EXAMPLE, environ={})
    assert cfg == Config(), "the example shows the defaults"
    text = EXAMPLE.read_text()
    for section, values in config.masked(Config()).items():
        assert f"[{section}]" in text
        for key in values:
            assert f"{key} =" in text or f"# {key} =" in text, f"{section}.{key} missing"


def test_sasl_needs_username_and_password_file() -> None:
    base = {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": "logpipe-consumer", "sasl_password_file": "/etc/logpipe/kafka.pw"}
    Config().replace("kafka", **base)  # complete: fine
    for key in ("sasl_username", "sasl_password_file", "sasl_mechanism"):
        with pytest.raises(ConfigError, match=rf"kafka\.{key}: required"):
            Config().replace("kafka", **{**base, key: ""})
    with pytest.raises(ConfigError, match=r"kafka\.ssl_ca_location"):
        Config().replace("kafka", ssl_ca_location="/etc/logpipe/ca.crt")
    with pytest.raises(ConfigError, match=r"elasticsearch\.password_file: required"):
        Config().replace("elasticsearch", username="logpipe")


def test_masked_hides_passwords_in_client_overrides() -> None:
    cfg = Config().replace("kafka", client_overrides={"sasl.password": "s3cret",
                                                      "ssl.key.password": "k3y",
                                                      "socket.keepalive.enable": "true"})
    shown = config.masked(cfg)["kafka"]["client_overrides"]
    assert shown == {"sasl.password": "********", "ssl.key.password": "********",
                     "socket.keepalive.enable": "true"}


def test_read_secret_warns_about_world_readable_files(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "kafka.password"
    path.write_text("s3cret\n")
    path.chmod(0o640)
    assert config.read_secret(str(path), "kafka.sasl_password_file") == "s3cret"
    assert not caplog.records
    path.chmod(0o644)
    assert config.read_secret(str(path), "kafka.sasl_password_file") == "s3cret"
    (record,) = caplog.records
    assert record.getMessage() == "secret_file_readable_by_others"
    assert record.fields == {"key": "kafka.sasl_password_file",  # type: ignore[attr-defined]
                             "path": str(path), "mode": "0644"}
    assert "s3cret" not in caplog.text
    with pytest.raises(ConfigError, match=r"kafka\.sasl_password_file: cannot read"):
        config.read_secret(str(tmp_path / "missing"), "kafka.sasl_password_file")
