"""Per-test view of the pipeline: unique names, a config file, the CLI, and ground truth readers.

Every test gets its own topic, dead-letter topic, group id and index prefix on the shared
servers, so tests neither interfere nor need server restarts. The helpers read the truth
straight from Kafka and Elasticsearch (not from the package under test): the keys actually in the
topic, the committed offsets, the document ids actually in the indices.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .servers import (
    ADMIN_USER,
    CONSUMER_USER,
    ES_WRITER_USER,
    PRODUCER_USER,
    QUIET_RDKAFKA,
    REPO,
    RUN_ROOT,
    SCRAM,
    ElasticsearchNode,
    KafkaCluster,
)

# Per pytest process: other people's sessions run in the same tree at the same time.
FIGURES_FILE = RUN_ROOT / f"figures-{os.getpid()}.jsonl"
# Runs the CLI exactly like the `logpipe` console script does, without depending on the
# entry-point wrapper having been (re)installed.
_CLI = "import sys; from logpipe.cli import main; sys.exit(main(sys.argv[1:]))"
# Developer override: another `python -c` program to run as the CLI (debugging the harness).
_CLI = os.environ.get("LOGPIPE_TEST_CLI_PROGRAM", _CLI)


def record(test: str, **figures: Any) -> None:
    """Print the figures a test saw and keep them for the run summary (conftest prints them)."""
    line = {"test": test, **figures}
    print(f"FIGURES {json.dumps(line, sort_keys=True)}", flush=True)
    RUN_ROOT.mkdir(parents=True, exist_ok=True)
    with FIGURES_FILE.open("a") as fh:
        fh.write(json.dumps(line, sort_keys=True) + "\n")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) \
            + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(sections: Mapping[str, Mapping[str, Any]]) -> str:
    out = []
    for section, values in sections.items():
        out.append(f"[{section}]")
        out.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
        out.append("")
    return "\n".join(out)


@dataclass
class Completed:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def events(self, name: str) -> list[dict[str, str]]:
        return parse_events(self.stderr, name)

    def describe(self) -> str:
        return (f"`logpipe {' '.join(self.argv[3:])}` exited {self.returncode} "
                f"after {self.seconds:.1f}s"
                f"\n--- stdout (tail):\n{self.stdout[-3000:]}\n--- stderr (tail):\n"
                f"{self.stderr[-6000:]}")


def parse_events(text: str, name: str | None = None) -> list[dict[str, str]]:
    """The ``key=value`` log lines (docs/DESIGN.md "Logs"), optionally only ``event=name``."""
    import shlex

    out = []
    for line in text.splitlines():
        if "event=" not in line:
            continue
        try:
            parts = shlex.split(line)
        except ValueError:
            continue
        fields = dict(p.split("=", 1) for p in parts if "=" in p)
        if name is None or fields.get("event") == name:
            out.append(fields)
    return out


@dataclass
class Pipeline:
    """One test's slice of the shared servers."""

    kafka: KafkaCluster
    es_node: ElasticsearchNode
    workdir: Path
    name: str
    partitions: int = 3
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        suffix = uuid.uuid4().hex[:10]
        slug = "".join(c if c.isalnum() else "-" for c in self.name.lower())[:30].strip("-")
        self.topic = f"it-{slug}-{suffix}"
        self.dlq_topic = f"{self.topic}.dlq"
        self.group_id = f"it-{slug}-{suffix}-group"
        self.index = f"it-{slug}-{suffix}"
        if self.es_node.secure:
            # The writer role covers `web-logs-topic*` only, like the deployed one.
            self.index = f"web-logs-topic-{self.index}"
        if self.kafka.secure:
            self.kafka.grant_logpipe(self.topic, self.dlq_topic, self.group_id)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "logpipe.toml"
        self.write_config()
        self._es: Any = None
        self._admin: Any = None

    # -- configuration ---------------------------------------------------------------------------

    def sections(self) -> dict[str, dict[str, Any]]:
        base: dict[str, dict[str, Any]] = {
            "kafka": {
                "bootstrap_servers": self.kafka.bootstrap_servers,
                "topic": self.topic,
                "dlq_topic": self.dlq_topic,
                "group_id": self.group_id,
                "partitions": self.partitions,
                "replication_factor": 1,
                "min_insync_replicas": 1,
                "dlq_partitions": 1,
            },
            "elasticsearch": {
                "hosts": [self.es_node.url],
                "index": self.index,
                "shards": 1,
                "replicas": 0,
                "refresh_interval": "1s",
                "request_timeout_s": 30.0,
            },
            "producer": {"linger_ms": 5},
            "consumer": {
                "batch_size": 500,
                "poll_timeout_s": 0.5,
                "retry_initial_backoff_s": 0.2,
                "retry_max_backoff_s": 2.0,
                "shutdown_timeout_s": 10.0,
                "session_timeout_ms": 10000,
            },
            "logging": {"level": "INFO"},
        }
        if self.kafka.secure:
            # The config file is the consumer's (consume, status, check); bootstrap and produce
            # run as their own principals through the environment (principal_env).
            base["kafka"].update({
                "security_protocol": "SASL_SSL", "sasl_mechanism": SCRAM,
                "sasl_username": CONSUMER_USER,
                "sasl_password_file": str(self.kafka.password_file(CONSUMER_USER)),
                "ssl_ca_location": str(self.kafka.ca_path)})
        if self.es_node.secure:
            base["elasticsearch"].update({
                "username": ES_WRITER_USER,
                "password_file": str(self.es_node.password_file(ES_WRITER_USER)),
                "ca_certs": str(self.es_node.ca_path)})
        for section, values in self.overrides.items():
            base.setdefault(section, {}).update(values)
        return base

    def write_config(self, **overrides: Mapping[str, Any]) -> Path:
        """(Re)write the TOML file; ``overrides`` are per-section dicts merged in for good."""
        for section, values in overrides.items():
            self.overrides.setdefault(section, {}).update(values)
        self.config_path.write_text(to_toml(self.sections()))
        return self.config_path

    def config(self, **overrides: Mapping[str, Any]) -> Any:
        """A ``logpipe.config.Config`` for in-process use (same content as the file)."""
        from logpipe import config

        self.write_config(**overrides)
        return config.load(self.config_path, environ={})

    # -- the CLI ---------------------------------------------------------------------------------

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOGPIPE_")}
        env["LOGPIPE_CONFIG"] = str(self.config_path)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra or {})
        return env

    def principal_env(self, user: str) -> dict[str, str]:
        """Environment that makes the CLI talk to Kafka as ``user`` ({} when plaintext)."""
        if not self.kafka.secure:
            return {}
        return {"LOGPIPE_KAFKA_SASL_USERNAME": user,
                "LOGPIPE_KAFKA_SASL_PASSWORD_FILE": str(self.kafka.password_file(user))}

    def argv(self, *args: str) -> list[str]:
        # The config file reaches the CLI through LOGPIPE_CONFIG (see env()).
        return [sys.executable, "-c", _CLI, *args]

    def cli(self, *args: str, timeout: float = 300.0, check: bool = True,
            env: Mapping[str, str] | None = None) -> Completed:
        """Run ``logpipe <args>`` to completion; with ``check`` a non-zero exit fails the test."""
        argv = self.argv(*args)
        began = time.monotonic()
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                  env=self.env(env), cwd=self.workdir, check=False)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(
                f"`logpipe {' '.join(args)}` still running after {timeout:.0f}s\n--- stderr:\n"
                f"{(exc.stderr or b'')[-4000:]!r}") from None
        done = Completed(argv, proc.returncode, proc.stdout, proc.stderr,
                         time.monotonic() - began)
        self._keep_log(args, done.stderr)
        if check:
            assert done.returncode == 0, done.describe()
        return done

    def spawn(self, *args: str, env: Mapping[str, str] | None = None,
              log_name: str = "consumer") -> Spawned:
        """Start ``logpipe <args>`` in the background (its own process group), stderr to a file."""
        log_path = self.workdir / f"{log_name}-{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:4]}.log"
        fh = log_path.open("w")
        proc = subprocess.Popen(self.argv(*args), stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=self.env(env), cwd=self.workdir,
                                start_new_session=True)
        fh.close()
        return Spawned(proc, log_path)

    def _keep_log(self, args: Sequence[str], stderr: str) -> None:
        path = self.workdir / f"cli-{args[0] if args else 'x'}-{uuid.uuid4().hex[:4]}.log"
        path.write_text(stderr)

    # -- setup shortcuts -------------------------------------------------------------------------

    def bootstrap(self) -> Completed:
        return self.cli("bootstrap", timeout=120, env=self.principal_env(ADMIN_USER))

    def produce(self, count: int, *, seed: int | None = None) -> Completed:
        args = ["produce", "--count", str(count)]
        if seed is not None:
            args += ["--seed", str(seed)]
        return self.cli(*args, timeout=300, env=self.principal_env(PRODUCER_USER))

    def consume_all(self, *, batch_size: int = 500, max_batches: int = 10_000,
                    timeout: float = 300.0) -> Completed:
        """Run-once consume until the partitions' ends (``--max-batches`` is only a ceiling)."""
        return self.cli("consume", "--max-batches", str(max_batches),
                        "--batch-size", str(batch_size), timeout=timeout)

    # -- ground truth: Kafka ---------------------------------------------------------------------

    def _consumer(self, group: str | None = None) -> Any:
        from confluent_kafka import Consumer

        return Consumer({
            "bootstrap.servers": self.kafka.bootstrap_servers,
            "group.id": group or f"truth-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "logger": QUIET_RDKAFKA,
            **self.kafka.client_conf(),
        })

    @property
    def admin(self) -> Any:
        """One AdminClient kept alive (its futures never resolve once the client is gone)."""
        if self._admin is None:
            self._admin = self.kafka.admin()
        return self._admin

    def partition_ids(self, topic: str | None = None) -> list[int]:
        topic = topic or self.topic
        md = self.admin.list_topics(topic, timeout=10)
        info = md.topics.get(topic)
        assert info is not None and info.error is None, f"topic {topic} missing: {info}"
        return sorted(info.partitions)

    def end_offsets(self, topic: str | None = None) -> dict[int, int]:
        from confluent_kafka import TopicPartition

        topic = topic or self.topic
        c = self._consumer()
        try:
            return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                    for p in self.partition_ids(topic)}
        finally:
            c.close()

    def committed(self, group: str | None = None) -> dict[int, int]:
        """Committed offset per partition of the main topic (negative = nothing committed)."""
        from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition

        group = group or self.group_id
        tps = [TopicPartition(self.topic, p) for p in self.partition_ids()]
        fut = self.admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group, tps)])
        out = fut[group].result(timeout=15)
        return {tp.partition: tp.offset for tp in out.topic_partitions}

    def reset_group(self, offset: int = 0) -> None:
        """Move the (empty) group's committed offsets of the main topic back to ``offset``."""
        from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition

        tps = [TopicPartition(self.topic, p, offset) for p in self.partition_ids()]
        fut = self.admin.alter_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(self.group_id, tps)])
        fut[self.group_id].result(timeout=30)
        after = self.committed()
        assert all(v == offset for v in after.values()), f"reset to {offset} failed: {after}"

    def read_topic(self, topic: str | None = None) -> list[Message]:
        """Every message of the topic, from the start to the current end (one pass)."""
        from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

        topic = topic or self.topic
        ends = self.end_offsets(topic)
        c = self._consumer()
        out: list[Message] = []
        try:
            c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
            pending = {p for p, end in ends.items() if end > 0}
            got: Counter[int] = Counter()
            deadline = time.monotonic() + 120
            while pending and time.monotonic() < deadline:
                for msg in c.consume(1000, 1.0):
                    err = msg.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            pending.discard(msg.partition())
                            continue
                        raise AssertionError(f"reading {topic}: {err}")
                    p = msg.partition()
                    if msg.offset() >= ends[p]:
                        pending.discard(p)
                        continue
                    out.append(Message(p, msg.offset(), msg.key(), msg.value(),
                                       dict(msg.headers() or [])))
                    got[p] += 1
                    if msg.offset() + 1 >= ends[p]:
                        pending.discard(p)
            assert not pending, f"could not read {topic} to its end in time: {sorted(pending)}"
        finally:
            c.close()
        return out

    def topic_keys(self) -> list[str]:
        return [m.key.decode() for m in self.read_topic() if m.key is not None]

    # -- ground truth: Elasticsearch -------------------------------------------------------------

    @property
    def es(self) -> Any:
        if self._es is None:
            self._es = self.es_node.client()
        return self._es

    def refresh(self) -> None:
        self.es.indices.refresh(index=f"{self.index}-*", allow_no_indices=True,
                                ignore_unavailable=True)

    def doc_count(self) -> int:
        self.refresh()
        r = self.es.count(index=f"{self.index}-*", allow_no_indices=True,
                          ignore_unavailable=True)
        return int(r["count"])

    def es_ids(self) -> list[str]:
        """Every document ``_id`` in the test's daily indices (a list: duplicates show)."""
        self.refresh()
        ids: list[str] = []
        resp = self.es.search(index=f"{self.index}-*", scroll="2m", size=5000,
                              sort=["_doc"], source=False, allow_no_indices=True,
                              ignore_unavailable=True)
        scroll_id = resp.get("_scroll_id")
        try:
            while resp["hits"]["hits"]:
                ids.extend(h["_id"] for h in resp["hits"]["hits"])
                resp = self.es.scroll(scroll_id=scroll_id, scroll="2m")
                scroll_id = resp.get("_scroll_id")
        finally:
            if scroll_id:
                self.es.clear_scroll(scroll_id=scroll_id)
        return ids

    def duplicate_log_ids(self) -> dict[str, int]:
        """``log_id`` values held by more than one document (terms aggregation, across indices)."""
        self.refresh()
        r = self.es.search(index=f"{self.index}-*", size=0, allow_no_indices=True,
                           ignore_unavailable=True,
                           aggs={"dups": {"terms": {"field": "log_id", "min_doc_count": 2,
                                                    "size": 1000}}})
        return {b["key"]: b["doc_count"] for b in r["aggregations"]["dups"]["buckets"]}

    def compare(self, expected: Iterable[str]) -> Comparison:
        """Elasticsearch's ids against the ids that should be there (exactly once each)."""
        ids = self.es_ids()
        want = set(expected)
        have = Counter(ids)
        return Comparison(
            expected=len(want), documents=len(ids),
            missing=sorted(want - set(have)), unexpected=sorted(set(have) - want),
            duplicates={k: n for k, n in have.items() if n > 1})

    def wait_caught_up(self, expected: int, consumer: Spawned | None = None,
                       timeout: float = 180.0) -> None:
        """Wait until ``expected`` documents are indexed and the group committed every end
        offset; fails at once, with its log, if ``consumer`` exits meanwhile."""
        deadline = time.monotonic() + timeout
        n, committed, ends = -1, {}, {}
        while time.monotonic() < deadline:
            n = self.doc_count()
            committed, ends = self.committed(), self.end_offsets()
            if n >= expected and committed == ends:
                return
            assert consumer is None or consumer.proc.poll() is None, \
                f"consumer exited:\n{consumer.log()[-4000:]}"
            time.sleep(1.0)
        tail = consumer.log()[-4000:] if consumer is not None else ""
        raise AssertionError(f"not caught up after {timeout:.0f}s: {n} of {expected} documents, "
                             f"committed {committed}, end {ends}\n{tail}")

    def wait_doc_count(self, expected: int, timeout: float = 120.0) -> int:
        deadline = time.monotonic() + timeout
        n = -1
        while time.monotonic() < deadline:
            n = self.doc_count()
            if n >= expected:
                return n
            time.sleep(0.5)
        return n

    def assert_committed_only_indexed(self, messages: Sequence[Message] | None = None,
                                      dlq_keys: Iterable[str] = ()) -> dict[int, int]:
        """Every message below the committed position is in Elasticsearch (or dead-lettered)."""
        messages = list(messages) if messages is not None else self.read_topic()
        committed = self.committed()
        present = set(self.es_ids()) | set(dlq_keys)
        missing = [(m.partition, m.offset, m.key) for m in messages
                   if m.offset < committed.get(m.partition, -1)
                   and (m.key is None or m.key.decode() not in present)]
        assert not missing, (f"{len(missing)} message(s) below the committed offsets "
                             f"{committed} are not in Elasticsearch, e.g. {missing[:5]}")
        return committed


@dataclass
class Comparison:
    expected: int
    documents: int
    missing: list[str]
    unexpected: list[str]
    duplicates: dict[str, int]

    @property
    def exact(self) -> bool:
        return not self.missing and not self.unexpected and not self.duplicates

    def describe(self) -> str:
        return (f"expected {self.expected} ids, Elasticsearch holds {self.documents} documents: "
                f"{len(self.missing)} missing (e.g. {self.missing[:3]}), "
                f"{len(self.unexpected)} unexpected (e.g. {self.unexpected[:3]}), "
                f"{len(self.duplicates)} duplicated (e.g. {list(self.duplicates.items())[:3]})")


@dataclass
class Message:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes | None]


@dataclass
class Spawned:
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, name: str | None = None) -> list[dict[str, str]]:
        return parse_events(self.log(), name)

    def signal(self, sig: int) -> None:
        """Signal the process itself (not its group: like systemd's KillMode=mixed first step)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def wait_for_event(self, name: str, timeout: float, count: int = 1) -> list[dict[str, str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            evs = self.events(name)
            if len(evs) >= count:
                return evs
            if self.proc.poll() is not None:
                raise AssertionError(f"process exited ({self.proc.returncode}) before "
                                     f"{count} `{name}` event(s); log tail:\n{self.log()[-4000:]}")
            time.sleep(0.1)
        raise AssertionError(f"no {count} `{name}` event(s) within {timeout:.0f}s; log tail:\n"
                             f"{self.log()[-4000:]}")

    def terminate_and_wait(self, timeout: float = 30.0) -> int | None:
        self.signal(signal.SIGTERM)
        code = self.wait(timeout)
        if code is None:
            self.kill()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
