"""Real Kafka (KRaft) and Elasticsearch servers on loopback for the integration and chaos suites.

Both classes start the pinned server versions (``[tool.logpipe.versions]`` in pyproject.toml,
fetched by ``scripts/fetch-*.sh``) as child processes bound to 127.0.0.1 on free ports picked at
runtime, each in its own directory under ``.cache/run/<unique>/`` with every log in a file there.
Other people run servers on the same machine at the same time: nothing here uses a fixed port or
a shared writable directory.

Typical use::

    with KafkaCluster(brokers=2) as kafka, ElasticsearchNode() as es:
        kafka.bootstrap_servers   # "127.0.0.1:41233,127.0.0.1:41877"
        es.url                    # "http://127.0.0.1:39211"
        kafka.restart(node=1)     # one broker goes away and comes back; the other serves
        es.stop(); es.start()     # same data directory: the documents are still there

Test-only conveniences (relaxed disk watermarks, tiny heaps, security off) live only here.

``secure=True`` gives the same servers with security on, the way issue 9 wants production:
Kafka with a ``SASL_SSL`` client listener (SCRAM-SHA-512 users made at format time), mutual TLS
with certificate principals on the controller listener, ``StandardAuthorizer`` denying whatever
no ACL allows, and least-privilege ACLs for logpipe's producer, consumer and admin principals
(``grant_logpipe``); Elasticsearch with security on, TLS on HTTP and transport, the bootstrap
password in its keystore, file-realm users and a ``logpipe_writer`` role limited to
``web-logs-topic*``. Certificates come from a throwaway CA (``tls.TestCA``). Passwords are
random per server set and written to 0600 files (``password_file(user)``), which is how the
package reads them too. The harness's own ground-truth clients use a super user
(``client_conf()`` / ``client()``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import urllib3

from .tls import TestCA

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("LOGPIPE_CACHE", REPO / ".cache"))
RUN_ROOT = CACHE / "run"
LOOPBACK = "127.0.0.1"

KAFKA_HEAP = "-Xms256m -Xmx256m"
ES_HEAP = "-Xms512m -Xmx512m"
KAFKA_START_TIMEOUT_S = 120.0
ES_START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0


# librdkafka's "Connection refused" lines while a server boots are expected, not news.
QUIET_RDKAFKA = logging.getLogger("harness.rdkafka")
QUIET_RDKAFKA.addHandler(logging.NullHandler())
QUIET_RDKAFKA.propagate = False


class HarnessError(RuntimeError):
    """A server could not be fetched, started or stopped; the message says why and where to look."""


# -- helpers --------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    # Printed (not logged) so `pytest -s` and the captured output of a failing test show it.
    print(f"[harness] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel's pick on 127.0.0.1)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (held open together while picking so they differ)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def java_home() -> Path:
    """The JDK to run the servers with: $JAVA_HOME, else the ``java`` on PATH."""
    env_home = os.environ.get("JAVA_HOME")
    if env_home:
        java = Path(env_home) / "bin" / "java"
        if not os.access(java, os.X_OK):
            raise HarnessError(f"JAVA_HOME={env_home} has no executable bin/java; "
                               "install a JDK 17+ (openjdk-17-jre-headless) or fix JAVA_HOME")
        return Path(env_home)
    found = shutil.which("java")
    if not found:
        raise HarnessError("Java is required to run Kafka and Elasticsearch: `java` is not on PATH "
                           "and JAVA_HOME is not set (Debian: apt-get install "
                           "openjdk-17-jre-headless)")
    return Path(found).resolve().parent.parent


def _fetch(script: str) -> Path:
    path = REPO / "scripts" / script
    try:
        out = subprocess.run([str(path)], check=True, capture_output=True, text=True,
                             timeout=1800)
    except subprocess.CalledProcessError as exc:
        raise HarnessError(f"{script} failed (exit {exc.returncode}); it needs Maven (mvn) and "
                           f"network access to the Maven repository:\n{exc.stderr.strip()}"
                           ) from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HarnessError(f"{script} could not run: {exc}") from None
    result = Path(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else None
    if result is None or not result.exists():
        raise HarnessError(f"{script} printed {out.stdout.strip()!r}, which does not exist")
    return result


def kafka_home() -> Path:
    """Directory whose ``libs/`` holds the pinned Kafka jars (fetched on first use)."""
    return _fetch("fetch-kafka.sh")


def elasticsearch_home() -> Path:
    """A pristine extracted Elasticsearch integ-test distribution, unzipped once into the cache.

    Never written to by a run: every node copies ``config/`` and uses its own data/log paths.
    """
    zip_path = _fetch("fetch-elasticsearch.sh")
    dest_root = CACHE / "elasticsearch" / "dist"
    dest = dest_root / zip_path.stem  # elasticsearch-<version>
    if (dest / ".complete").exists():
        return dest
    dest_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest_root))
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for info in zf.infolist():
                zf.extract(info, tmp)
                mode = (info.external_attr >> 16) & 0o777
                if mode:
                    os.chmod(tmp / info.filename, mode)
        (extracted,) = [p for p in tmp.iterdir() if p.is_dir()]
        for p in [extracted, *extracted.rglob("*")]:
            # Readable (and dirs/bin traversable) by the unprivileged user ES runs as under root.
            p.chmod(p.stat().st_mode | 0o444 | (0o111 if p.is_dir() or "bin" in p.parts else 0))
        (extracted / ".complete").touch()
        try:
            extracted.rename(dest)
        except OSError:
            if not (dest / ".complete").exists():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def new_run_dir(kind: str) -> Path:
    RUN_ROOT.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{kind}-{time.strftime('%H%M%S')}-", dir=RUN_ROOT))
    path.chmod(0o755)
    return path


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} not readable)"
    return "\n".join(text[-lines:])


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _wait_port(port: int, deadline: float, check: Any = None) -> None:
    """Until something accepts TCP connections on 127.0.0.1:port (cheap pre-check)."""
    while time.monotonic() < deadline:
        if check is not None:
            check()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            if s.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.2)


def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    try:
        proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    """True once no process of the group is left (the ES launcher and server are two JVMs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        time.sleep(0.1)
    return False


class _Proc:
    """One server process in its own process group, output to a file."""

    def __init__(self, name: str, argv: list[str], cwd: Path, env: Mapping[str, str],
                 out_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.cwd = cwd
        self.env = dict(env)
        self.out_path = out_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        if self.running:
            raise HarnessError(f"{self.name} is already running (pid {self.pid})")
        self._out = self.out_path.open("ab")
        self._out.write(f"\n==== start {time.strftime('%H:%M:%S')} ====\n".encode())
        self._out.flush()
        self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdout=self._out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM the whole group, wait; SIGKILL if it does not go in time."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            _signal_group(self.proc, signal.SIGTERM)
            if not _wait_exit(self.proc, timeout):
                _log(f"{self.name}: no exit {timeout:.0f}s after SIGTERM, killing")
                _signal_group(self.proc, signal.SIGKILL)
                self.proc.wait(timeout=30)
        _wait_group_gone(self.proc.pid, 30)
        self._close_out()

    def kill(self) -> None:
        if self.proc is None:
            return
        _signal_group(self.proc, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        _wait_group_gone(self.proc.pid, 30)
        self._close_out()

    def _close_out(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


# -- Kafka ----------------------------------------------------------------------------------------

_KAFKA_LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.state.name = state.change.logger
logger.state.level = WARN
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.apache.name = org.apache.kafka
logger.apache.level = INFO
logger.raft.name = org.apache.kafka.raft
logger.raft.level = WARN
"""


SCRAM = "SCRAM-SHA-512"
# Principals of the secure cluster: the brokers (also their certificate CN), the harness's
# super user for ground truth, and logpipe's three least-privilege principals.
BROKER_USER = "kafka-broker"
HARNESS_ADMIN = "harness-admin"
PRODUCER_USER = "logpipe-producer"
CONSUMER_USER = "logpipe-consumer"
ADMIN_USER = "logpipe-admin"
KAFKA_USERS = (BROKER_USER, HARNESS_ADMIN, PRODUCER_USER, CONSUMER_USER, ADMIN_USER)


def _kafka_cluster_id() -> str:
    """A random Kafka Uuid (16 bytes, URL-safe base64 without padding) without a JVM start."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


class _KafkaNode:
    def __init__(self, index: int, node_id: int, roles: str, root: Path) -> None:
        self.index = index
        self.node_id = node_id
        self.roles = roles
        self.dir = root / f"node{node_id}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data = self.dir / "data"
        self.props = self.dir / "server.properties"
        self.port = 0  # client (PLAINTEXT) listener, 0 for a controller-only node
        self.controller_port = 0
        self.proc: _Proc | None = None
        self.wanted = False  # started by the harness and not stopped/killed on purpose since

    @property
    def is_broker(self) -> bool:
        return "broker" in self.roles

    @property
    def is_controller(self) -> bool:
        return "controller" in self.roles


class KafkaCluster:
    """A KRaft cluster on loopback.

    ``brokers=1``: one combined broker+controller node (the fast path for most tests).
    ``brokers=N>1``: one dedicated controller plus N broker-only nodes, so any broker can be
    stopped, killed or restarted while the others keep serving (the quorum never depends on a
    broker). ``node=i`` in the control methods counts brokers from 0 in ``bootstrap_servers``
    order; ports stay the same across restarts.
    """

    def __init__(self, brokers: int = 1, *, extra_props: Mapping[str, str] | None = None,
                 start: bool = True, secure: bool = False) -> None:
        if brokers < 1:
            raise ValueError("brokers must be >= 1")
        self.broker_count = brokers
        self.extra_props = dict(extra_props or {})
        self.secure = secure
        self.root = new_run_dir(f"kafka{brokers}{'-secure' if secure else ''}")
        self.cluster_id = _kafka_cluster_id()
        self.passwords: dict[str, str] = {}
        self.ca: TestCA | None = None
        if secure:
            self._make_security()
        self.start_seconds: float | None = None
        self._home = kafka_home()
        self._java = java_home() / "bin" / "java"
        self._nodes: list[_KafkaNode] = []
        if brokers == 1:
            self._nodes.append(_KafkaNode(0, 1, "broker,controller", self.root))
        else:
            self._nodes.append(_KafkaNode(-1, 100, "controller", self.root))
            self._nodes += [_KafkaNode(i, i + 1, "broker", self.root) for i in range(brokers)]
        ports = free_ports(2 * len(self._nodes))
        for node in self._nodes:
            if node.is_broker:
                node.port = ports.pop()
            if node.is_controller:
                node.controller_port = ports.pop()
        self._write_configs()
        self._format()
        if start:
            try:
                self.start_all()
            except BaseException:
                self._stop_nodes()  # leave nothing running; keep the directory to look at
                raise

    # -- public API ----------------------------------------------------------------------------

    @property
    def brokers(self) -> list[_KafkaNode]:
        return [n for n in self._nodes if n.is_broker]

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(f"{LOOPBACK}:{n.port}" for n in self.brokers)

    def broker_address(self, node: int = 0) -> str:
        return f"{LOOPBACK}:{self._broker(node).port}"

    def log_path(self, node: int = 0) -> Path:
        return self._broker(node).dir / "server.log"

    def start_all(self) -> None:
        began = time.monotonic()
        for node in self._nodes:
            self._launch(node)
        self.wait_ready(expected_brokers=self.broker_count)
        self.start_seconds = time.monotonic() - began
        _log(f"kafka: {self.broker_count} broker(s) ready at {self.bootstrap_servers} in "
             f"{self.start_seconds:.1f}s (dir {self.root})")

    def start(self, node: int = 0) -> None:
        """Start one stopped broker; returns once it serves requests again (unfenced)."""
        began = time.monotonic()
        b = self._broker(node)
        self._launch(b)
        self._wait_broker(b)
        _log(f"kafka: broker {node} up again in {time.monotonic() - began:.1f}s")

    def stop(self, node: int = 0, timeout: float = STOP_TIMEOUT_S) -> None:
        """Controlled shutdown (SIGTERM) of one broker; returns once its process has exited."""
        b = self._broker(node)
        b.wanted = False
        if b.proc is not None:
            b.proc.stop(timeout)

    def kill(self, node: int = 0) -> None:
        """SIGKILL one broker (no controlled shutdown, unflushed log tail may be lost)."""
        b = self._broker(node)
        b.wanted = False
        if b.proc is not None:
            b.proc.kill()

    def restart(self, node: int = 0) -> None:
        self.stop(node)
        self.start(node)

    def is_running(self, node: int = 0) -> bool:
        b = self._broker(node)
        return b.proc is not None and b.proc.running

    def close(self) -> None:
        self._stop_nodes()
        if os.environ.get("LOGPIPE_KEEP_RUN_DIRS") != "1":
            shutil.rmtree(self.root, ignore_errors=True)

    def _stop_nodes(self) -> None:
        # Brokers first (controlled shutdown needs the controller), then the controller.
        for node in sorted(self._nodes, key=lambda n: n.is_controller and not n.is_broker):
            node.wanted = False
            if node.proc is not None:
                try:
                    node.proc.stop(timeout=30)
                except Exception as exc:  # keep closing the others
                    _log(f"kafka: stopping node {node.node_id} failed: {exc}")

    def admin(self, **conf: Any) -> Any:
        from confluent_kafka.admin import AdminClient

        return AdminClient({"bootstrap.servers": self.bootstrap_servers,
                            "logger": QUIET_RDKAFKA, "reconnect.backoff.max.ms": 500,
                            **self.client_conf(), **conf})

    # -- security (secure=True) ----------------------------------------------------------------

    @property
    def ca_path(self) -> Path:
        if self.ca is None:
            raise HarnessError("this Kafka cluster was started without secure=True")
        return self.ca.cert_path

    def client_conf(self, user: str = HARNESS_ADMIN) -> dict[str, str]:
        """librdkafka security properties for ``user`` ({} on a plaintext cluster). The
        default is the harness's super user, for ground truth and test setup."""
        if not self.secure:
            return {}
        return {"security.protocol": "sasl_ssl", "sasl.mechanism": SCRAM,
                "sasl.username": user, "sasl.password": self.passwords[user],
                "ssl.ca.location": str(self.ca_path)}

    def password_file(self, user: str) -> Path:
        """A 0600 file holding ``user``'s SCRAM password (what logpipe's *_file keys read)."""
        return _secret_file(self.root, user, self.passwords[user])

    def grant_logpipe(self, topic: str = "web-logs-topic", dlq_topic: str = "web-logs-topic.dlq",
                      group: str = "elasticsearch-consumer-group") -> None:
        """Least-privilege ACLs (literal names) for logpipe's three principals:

        * producer: write ``topic`` (+ IdempotentWrite on the cluster);
        * consumer: read ``topic`` and ``group``, write ``dlq_topic`` (its DLQ producer is
          idempotent too); ``status``/``check`` run as this principal;
        * admin (``bootstrap``): create, describe, alter and (describe/alter) configs of both
          topics.

        Nobody else gets anything (``allow.everyone.if.no.acl.found=false``).
        """
        from confluent_kafka.admin import (
            AclBinding,
            AclOperation,
            AclPermissionType,
            ResourcePatternType,
            ResourceType,
        )

        def allow(user: str, rtype: ResourceType, name: str, op: AclOperation) -> AclBinding:
            return AclBinding(rtype, name, ResourcePatternType.LITERAL, f"User:{user}", "*",
                              op, AclPermissionType.ALLOW)

        topic_t, group_t, cluster_t = ResourceType.TOPIC, ResourceType.GROUP, ResourceType.BROKER
        bindings = [
            allow(PRODUCER_USER, topic_t, topic, AclOperation.WRITE),
            allow(PRODUCER_USER, cluster_t, "kafka-cluster", AclOperation.IDEMPOTENT_WRITE),
            allow(CONSUMER_USER, topic_t, topic, AclOperation.READ),
            allow(CONSUMER_USER, group_t, group, AclOperation.READ),
            allow(CONSUMER_USER, topic_t, dlq_topic, AclOperation.WRITE),
            allow(CONSUMER_USER, cluster_t, "kafka-cluster", AclOperation.IDEMPOTENT_WRITE),
        ]
        for name in (topic, dlq_topic):
            bindings += [allow(ADMIN_USER, topic_t, name, op) for op in (
                AclOperation.CREATE, AclOperation.DESCRIBE, AclOperation.ALTER,
                AclOperation.DESCRIBE_CONFIGS, AclOperation.ALTER_CONFIGS)]
        admin = self.admin()
        for future in admin.create_acls(bindings, request_timeout=30).values():
            future.result(timeout=30)

    def _make_security(self) -> None:
        tls = self.root / "tls"
        self.ca = TestCA(tls, name="logpipe harness Kafka CA")
        # One certificate for every node: CN kafka-broker is the principal the controller
        # listener maps it to (a super user), and it is also the SCRAM user of the brokers.
        broker = self.ca.issue(BROKER_USER)
        self._keystore_password = secrets.token_urlsafe(18)
        self._keystore = broker.pkcs12(tls / "broker.p12", self._keystore_password, self.ca.cert)
        for user in KAFKA_USERS:
            self.passwords[user] = secrets.token_urlsafe(18)

    def _security_props(self, node: _KafkaNode) -> dict[str, str]:
        assert self.ca is not None
        props = {
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "allow.everyone.if.no.acl.found": "false",
            "super.users": f"User:{BROKER_USER};User:{HARNESS_ADMIN}",
            # Certificate principals: CN=kafka-broker,O=... -> User:kafka-broker.
            "ssl.principal.mapping.rules": "RULE:^CN=([^,]+),.*$/$1/,DEFAULT",
            "ssl.keystore.type": "PKCS12",
            "ssl.keystore.location": str(self._keystore),
            "ssl.keystore.password": self._keystore_password,
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self.ca.cert_path),
            "listener.name.controller.ssl.client.auth": "required",
        }
        if node.is_broker:
            props.update({
                "sasl.enabled.mechanisms": SCRAM,
                "sasl.mechanism.inter.broker.protocol": SCRAM,
                f"listener.name.sasl_ssl.{SCRAM.lower()}.sasl.jaas.config":
                    "org.apache.kafka.common.security.scram.ScramLoginModule required "
                    f'username="{BROKER_USER}" password="{self.passwords[BROKER_USER]}";',
            })
        return props

    def wait_ready(self, expected_brokers: int, timeout: float = KAFKA_START_TIMEOUT_S) -> None:
        """Until a metadata request lists ``expected_brokers`` brokers and each running broker
        answers on its own port; fails fast if a node process died."""
        deadline = time.monotonic() + timeout
        for b in self.brokers:
            if b.wanted:
                self._wait_broker(b, max(1.0, deadline - time.monotonic()))
        from confluent_kafka import KafkaException

        admin = self.admin()
        last = "no answer yet"
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                md = admin.list_topics(timeout=2.0)
                if len(md.brokers) >= expected_brokers:
                    return
                last = f"{len(md.brokers)} of {expected_brokers} brokers registered"
            except KafkaException as exc:
                last = str(exc)
            time.sleep(0.2)
        raise HarnessError(f"kafka not ready after {timeout:.0f}s ({last}); logs under {self.root}")

    def wait_in_sync(self, timeout: float = 60.0) -> None:
        """Until every partition of every topic has its full replica set in sync (after a broker
        came back), so the next fault starts from a healthy cluster."""
        from confluent_kafka import KafkaException

        admin = self.admin()
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            try:
                md = admin.list_topics(timeout=5.0)
                lagging = [f"{t}-{p}" for t, tm in md.topics.items()
                           for p, pm in tm.partitions.items()
                           if pm.leader < 0 or set(pm.isrs) != set(pm.replicas)]
                if not lagging:
                    return
                last = f"not in sync: {', '.join(sorted(lagging)[:10])}"
            except KafkaException as exc:
                last = str(exc)
            time.sleep(0.5)
        raise HarnessError(f"kafka partitions not in sync after {timeout:.0f}s ({last})")

    def __enter__(self) -> KafkaCluster:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------

    def _broker(self, node: int) -> _KafkaNode:
        brokers = self.brokers
        if not 0 <= node < len(brokers):
            raise IndexError(f"broker {node} does not exist (cluster has {len(brokers)})")
        return brokers[node]

    def _controller_nodes(self) -> list[_KafkaNode]:
        return [n for n in self._nodes if n.is_controller]

    def _check_alive(self) -> None:
        for node in self._nodes:
            if node.wanted and node.proc is not None and not node.proc.running:
                code = node.proc.proc.returncode if node.proc.proc is not None else None
                raise HarnessError(
                    f"kafka node {node.node_id} exited with {code}; last lines of "
                    f"{node.dir / 'server.log'}:\n{_tail(node.dir / 'server.log')}"
                    f"\n--- stdout:\n{_tail(node.dir / 'stdout.log')}")

    def _wait_broker(self, b: _KafkaNode, timeout: float = KAFKA_START_TIMEOUT_S) -> None:
        """Until this broker itself answers a metadata request (it only opens its client
        listener once it has caught up with the metadata log and is unfenced)."""
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + timeout
        _wait_port(b.port, deadline, self._check_alive)
        admin = AdminClient({"bootstrap.servers": f"{LOOPBACK}:{b.port}",
                             "logger": QUIET_RDKAFKA, "reconnect.backoff.max.ms": 500,
                             **self.client_conf()})
        last = "no answer yet"
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                md = admin.list_topics(timeout=2.0)
                if md.orig_broker_id == b.node_id and b.node_id in md.brokers:
                    return
                last = f"answered by broker {md.orig_broker_id}, brokers {sorted(md.brokers)}"
            except KafkaException as exc:
                last = str(exc)
            time.sleep(0.2)
        raise HarnessError(f"kafka broker {b.node_id} not serving after {timeout:.0f}s ({last}); "
                           f"see {b.dir / 'server.log'}")

    def _write_configs(self) -> None:
        controllers = self._controller_nodes()
        quorum = ",".join(f"{LOOPBACK}:{c.controller_port}" for c in controllers)
        rf = min(3, self.broker_count)
        min_isr = 1 if rf < 3 else 2
        for node in self._nodes:
            listeners, advertised, protos = [], [], []
            client = "SASL_SSL" if self.secure else "PLAINTEXT"
            controller_proto = "CONTROLLER:SSL" if self.secure else "CONTROLLER:PLAINTEXT"
            if node.is_broker:
                listeners.append(f"{client}://{LOOPBACK}:{node.port}")
                advertised.append(f"{client}://{LOOPBACK}:{node.port}")
                protos.append(f"{client}:{client}")
            if node.is_controller:
                listeners.append(f"CONTROLLER://{LOOPBACK}:{node.controller_port}")
                if node.is_broker:
                    advertised.append(f"CONTROLLER://{LOOPBACK}:{node.controller_port}")
                protos.append(controller_proto)
            props: dict[str, str] = {
                "process.roles": node.roles,
                "node.id": str(node.node_id),
                "controller.quorum.bootstrap.servers": quorum,
                "controller.listener.names": "CONTROLLER",
                "listeners": ",".join(listeners),
                "listener.security.protocol.map": ",".join(
                    [*protos, controller_proto] if not node.is_controller else protos),
                "log.dirs": str(node.data),
                "num.partitions": "1",
                "default.replication.factor": str(rf),
                "auto.create.topics.enable": "false",
                "offsets.topic.replication.factor": str(rf),
                "offsets.topic.num.partitions": "10",
                "transaction.state.log.replication.factor": str(rf),
                "transaction.state.log.min.isr": str(min_isr),
                "transaction.state.log.num.partitions": "4",
                "share.coordinator.state.topic.replication.factor": str(rf),
                "share.coordinator.state.topic.min.isr": str(min_isr),
                "min.insync.replicas": "1",
                "group.initial.rebalance.delay.ms": "0",
                "delete.topic.enable": "true",
                "num.network.threads": "2",
                "num.io.threads": "4",
                "num.recovery.threads.per.data.dir": "1",
                "log.retention.check.interval.ms": "300000",
                "controlled.shutdown.enable": "true",
                # Quicker failure detection and leader moves for the restart/chaos tests.
                "broker.heartbeat.interval.ms": "500",
                "broker.session.timeout.ms": "6000",
                "replica.lag.time.max.ms": "10000",
            }
            if node.is_broker:
                props["advertised.listeners"] = ",".join(advertised)
                props["inter.broker.listener.name"] = client
            if self.secure:
                props.update(self._security_props(node))
            props.update(self.extra_props)
            node.props.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
            node.props.chmod(0o600)  # holds the keystore and broker passwords when secure
            (node.dir / "log4j2.properties").write_text(
                _KAFKA_LOG4J2.format(log=node.dir / "server.log"))

    def _java_cmd(self, node: _KafkaNode, main: str, heap: str) -> list[str]:
        return [str(self._java), *heap.split(), "-XX:+UseSerialGC", "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={node.dir / 'log4j2.properties'}",
                f"-Dkafka.logs.dir={node.dir}",
                "-cp", f"{self._home / 'libs'}/*", main]

    def _format(self) -> None:
        controllers = self._controller_nodes()
        for node in self._nodes:
            argv = self._java_cmd(node, "kafka.tools.StorageTool", "-Xmx128m")
            argv += ["format", "-t", self.cluster_id, "-c", str(node.props)]
            # SCRAM users exist from the first start (the StorageTool only takes them as
            # arguments; a harness-only, loopback-only throwaway password).
            for user, password in self.passwords.items():
                argv += ["--add-scram", f"{SCRAM}=[name={user},password={password}]"]
            if node.is_controller and len(controllers) == 1:
                argv.append("--standalone")
            elif node.is_controller:
                raise HarnessError("several controllers are not supported")  # pragma: no cover
            out = subprocess.run(argv, cwd=node.dir, capture_output=True, text=True,
                                 timeout=120, check=False)
            if out.returncode != 0:
                raise HarnessError(f"kafka storage format failed for node {node.node_id} "
                                   f"(exit {out.returncode}):\n{out.stdout}\n{out.stderr}")

    def _launch(self, node: _KafkaNode) -> None:
        env = {**os.environ, "KAFKA_HEAP_OPTS": KAFKA_HEAP}
        if node.proc is None:
            node.proc = _Proc(f"kafka node {node.node_id}",
                              [*self._java_cmd(node, "kafka.Kafka", KAFKA_HEAP), str(node.props)],
                              node.dir, env, node.dir / "stdout.log")
        node.proc.start()
        node.wanted = True


# -- Elasticsearch --------------------------------------------------------------------------------


class ElasticsearchNode:
    """A single-node Elasticsearch on loopback, with its data kept across ``stop``/``start``.

    ``settings`` are extra ``-E`` settings (e.g. ``{"thread_pool.write.queue_size": "1"}``).
    Under root the server runs as ``nobody`` (Elasticsearch refuses to run as root).
    ``secure=True``: security on, HTTPS (``url``), users ``ES_USERS`` (see the module docstring).
    """

    def __init__(self, settings: Mapping[str, str] | None = None, *, heap: str = ES_HEAP,
                 start: bool = True, secure: bool = False) -> None:
        self.secure = secure
        self.passwords: dict[str, str] = {}
        self.ca: TestCA | None = None
        self.settings = dict(settings or {})
        self.heap = heap
        self.home = elasticsearch_home()
        self.root = new_run_dir("es-secure" if secure else "es")
        self.data = self.root / "data"
        self.logs = self.root / "logs"
        self.conf = self.root / "config"
        self.tmp = self.root / "tmp"
        self.http_port, self.transport_port = free_ports(2)
        self.start_seconds: float | None = None
        self._java_home = java_home()
        self._proc: _Proc | None = None
        shutil.copytree(self.home / "config", self.conf)
        for d in (self.data, self.logs, self.tmp):
            d.mkdir()
        self._headers: dict[str, str] = {}
        if secure:
            self._make_security()
            self._http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(5.0, 30.0),
                                             ca_certs=str(self.ca_path))
            self._headers = urllib3.make_headers(
                basic_auth=f"{HARNESS_ADMIN}:{self.passwords[HARNESS_ADMIN]}")
        else:
            self._http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(5.0, 30.0))
        self._run_as = self._unprivileged_user()
        if self._run_as is not None:
            uid, gid = self._run_as
            for p in (self.root, self.data, self.logs, self.conf, self.tmp,
                      *self.conf.rglob("*")):
                os.chown(p, uid, gid)
        if start:
            try:
                self.start()
            except BaseException:
                self.stop(timeout=10)  # leave nothing running; keep the directory to look at
                raise

    @property
    def url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{LOOPBACK}:{self.http_port}"

    @property
    def ca_path(self) -> Path:
        if self.ca is None:
            raise HarnessError("this Elasticsearch node was started without secure=True")
        return self.ca.cert_path

    def password_file(self, user: str) -> Path:
        """A 0600 file holding ``user``'s password (outside the node's config directory)."""
        return _secret_file(self.root, user, self.passwords[user])

    def auth_kwargs(self, user: str = HARNESS_ADMIN) -> dict[str, Any]:
        """elasticsearch-py arguments for ``user`` ({} on a plaintext node)."""
        if not self.secure:
            return {}
        return {"basic_auth": (user, self.passwords[user]), "ca_certs": str(self.ca_path)}

    @property
    def log_path(self) -> Path:
        return self.logs / "logpipe-test.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.running

    def client(self, **kwargs: Any) -> Any:
        from elasticsearch import Elasticsearch

        return Elasticsearch(self.url, request_timeout=30, **{**self.auth_kwargs(), **kwargs})

    def start(self, timeout: float = ES_START_TIMEOUT_S) -> None:
        began = time.monotonic()
        if self._proc is None:
            self._proc = _Proc("elasticsearch", self._argv(), self.root, self._env(),
                               self.root / "stdout.log")
        self._proc.start()
        self.wait_ready(timeout)
        self.start_seconds = time.monotonic() - began
        _log(f"elasticsearch: ready at {self.url} in {self.start_seconds:.1f}s (dir {self.root})")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        if self._proc is not None:
            self._proc.stop(timeout)

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        try:
            self.stop(timeout=30)
        finally:
            self._http.clear()
            if os.environ.get("LOGPIPE_KEEP_RUN_DIRS") != "1":
                shutil.rmtree(self.root, ignore_errors=True)

    def wait_ready(self, timeout: float = ES_START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            assert self._proc is not None and self._proc.proc is not None
            code = self._proc.proc.poll()
            if code is not None:
                raise HarnessError(
                    f"elasticsearch exited with {code} during start; last lines of "
                    f"{self.root / 'stdout.log'}:\n{_tail(self.root / 'stdout.log')}\n"
                    f"--- {self.log_path}:\n{_tail(self.log_path)}")
            try:
                r = self._http.request(
                    "GET", f"{self.url}/_cluster/health?wait_for_status=yellow&timeout=2s",
                    headers=self._headers)
                if r.status == 200:
                    return
                last = f"HTTP {r.status}: {r.data[:200]!r}"
            except urllib3.exceptions.HTTPError as exc:
                last = type(exc).__name__
            time.sleep(0.5)
        raise HarnessError(f"elasticsearch not ready after {timeout:.0f}s ({last}); "
                           f"see {self.root / 'stdout.log'} and {self.log_path}")

    def __enter__(self) -> ElasticsearchNode:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------

    def _make_security(self) -> None:
        """Certificates, keystore, file-realm users and roles inside the node's config dir."""
        certs = self.conf / "certs"
        self.ca = TestCA(certs, name="logpipe harness Elasticsearch CA")
        self.ca.issue("node")
        for user in ES_USERS:
            self.passwords[user] = secrets.token_urlsafe(18)
        self.passwords["elastic"] = secrets.token_urlsafe(18)
        roles = {HARNESS_ADMIN: "superuser", ES_WRITER_USER: ES_WRITER_ROLE}
        (self.conf / "users").write_text("".join(
            f"{user}:{_pbkdf2_hash(self.passwords[user])}\n" for user in ES_USERS))
        (self.conf / "users_roles").write_text("".join(
            f"{role}:{user}\n" for user, role in roles.items()))
        (self.conf / "roles.yml").write_text(ES_ROLES_YML)
        for name in ("users", "users_roles", "roles.yml"):
            (self.conf / name).chmod(0o600)
        # The `elastic` bootstrap password lives in the keystore, never in a settings file.
        tool = self.home / "bin" / "elasticsearch-keystore"
        env = self._env()
        for args, stdin in ((["create"], None),
                            (["add", "-x", "bootstrap.password"], self.passwords["elastic"])):
            out = subprocess.run([str(tool), *args], input=stdin, env=env, text=True,
                                 capture_output=True, timeout=120, check=False)
            if out.returncode != 0:
                raise HarnessError(f"elasticsearch-keystore {args[0]} failed "
                                   f"(exit {out.returncode}):\n{out.stdout}\n{out.stderr}")

    def _security_settings(self) -> dict[str, str]:
        if not self.secure:
            return {"xpack.security.enabled": "false"}
        tls = {"key": "certs/node.key", "certificate": "certs/node.crt",
               "certificate_authorities": "certs/ca.crt"}
        out = {"xpack.security.enabled": "true",
               "xpack.security.http.ssl.enabled": "true",
               "xpack.security.transport.ssl.enabled": "true",
               "xpack.security.transport.ssl.verification_mode": "certificate",
               # Only the file realm: the native realm needs the .security index, which this
               # distribution cannot create (it lacks analysis-common).
               "xpack.security.authc.realms.file.file1.order": "0"}
        for layer in ("http", "transport"):
            out.update({f"xpack.security.{layer}.ssl.{k}": v for k, v in tls.items()})
        return out

    @staticmethod
    def _unprivileged_user() -> tuple[int, int] | None:
        if os.geteuid() != 0:
            return None
        pw = pwd.getpwnam(os.environ.get("LOGPIPE_ES_USER", "nobody"))
        return pw.pw_uid, pw.pw_gid

    def _argv(self) -> list[str]:
        settings = {
            "cluster.name": "logpipe-test",
            "node.name": "node-0",
            "discovery.type": "single-node",
            "network.host": LOOPBACK,
            "http.port": str(self.http_port),
            "transport.port": str(self.transport_port),
            "path.data": str(self.data),
            "path.logs": str(self.logs),
            **self._security_settings(),
            # Test machines have full-ish disks; never let a watermark flip indices read-only.
            "cluster.routing.allocation.disk.watermark.low": "99.9%",
            "cluster.routing.allocation.disk.watermark.high": "99.9%",
            "cluster.routing.allocation.disk.watermark.flood_stage": "99.9%",
            "cluster.routing.allocation.disk.watermark.flood_stage.frozen": "99.9%",
            "action.destructive_requires_name": "false",
            **self.settings,
        }
        argv = [str(self.home / "bin" / "elasticsearch")]
        for k, v in settings.items():
            argv += ["-E", f"{k}={v}"]
        if self._run_as is not None:
            uid, gid = self._run_as
            argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *argv]
        return argv

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("JAVA_HOME", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JAVA_OPTS")}
        env.update({
            "ES_JAVA_HOME": str(self._java_home),
            "ES_PATH_CONF": str(self.conf),
            "ES_TMPDIR": str(self.tmp),
            "ES_JAVA_OPTS": f"{self.heap} -XX:ActiveProcessorCount=2",
            "HOME": str(self.root),
        })
        return env


ES_WRITER_USER = "logpipe-writer"
ES_WRITER_ROLE = "logpipe_writer"
ES_USERS = (HARNESS_ADMIN, ES_WRITER_USER)
# What logpipe needs and nothing more: its daily indices and alias (`web-logs-topic*`), its
# index template, and cluster health (readiness). `read` on its own indices is for `status`.
ES_ROLES_YML = """\
logpipe_writer:
  cluster: ["monitor", "manage_index_templates"]
  indices:
    - names: ["web-logs-topic*"]
      privileges: ["create_index", "create_doc", "view_index_metadata", "manage",
                   "delete_index", "read"]
"""


def _secret_file(root: Path, user: str, password: str) -> Path:
    """<root>/secrets/<user>.password (0600 in a 0700 directory), written once."""
    path = root / "secrets" / f"{user}.password"
    if not path.exists():
        path.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(password + "\n")
    return path


def _pbkdf2_hash(password: str, cost: int = 10_000) -> str:
    """A file-realm password hash in Elasticsearch's ``{PBKDF2}`` format (PBKDF2-HMAC-SHA512,
    32-byte salt and key), so no JVM tool has to be started (or given the password) per user."""
    salt = secrets.token_bytes(32)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, cost, dklen=32)
    return (f"{{PBKDF2}}{cost}${base64.b64encode(salt).decode()}$"
            f"{base64.b64encode(digest).decode()}")


@dataclass(frozen=True)
class SecureServers:
    """The secure pair the ``secure_servers`` fixture starts (security on, see the top)."""

    kafka: KafkaCluster
    elasticsearch: ElasticsearchNode


@contextlib.contextmanager
def start_servers(brokers: int = 1, secure: bool = False,
                  ) -> Iterator[tuple[KafkaCluster, ElasticsearchNode]]:
    """Kafka and Elasticsearch started in parallel (both take a while), closed on exit;
    ``secure``: with TLS, SCRAM, ACLs and Elasticsearch users (see the top)."""
    made: dict[str, Any] = {}
    errors: list[BaseException] = []

    def start(name: str, factory: Callable[[], Any]) -> None:
        try:
            made[name] = factory()
        except BaseException as exc:  # re-raised below in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=start, args=("kafka",
                                                    lambda: KafkaCluster(brokers, secure=secure))),
               threading.Thread(target=start, args=("es",
                                                    lambda: ElasticsearchNode(secure=secure)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield made["kafka"], made["es"]
    finally:
        for name in ("es", "kafka"):
            if name in made:
                with contextlib.suppress(Exception):
                    made[name].close()


def wait_for(predicate: Any, timeout: float, interval: float = 0.2, what: str = "condition"
             ) -> Any:
    """Poll ``predicate()`` until truthy; return its value or raise AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
