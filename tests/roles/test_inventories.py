"""Inventories checked without their hosts: layouts the roles must refuse, and the committed
example inventory rendered and validated the way a converge would see it.

`tests/roles/render-inventory.yml` runs each role's layout checks and argument spec for every host
and renders its configuration templates on this machine; Kafka's own StorageTool then formats a
scratch directory with each rendered server.properties (that is where a broken listener map
fails on a real host), and logpipe's config loader reads each rendered logpipe.toml.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from harness.playbook import ANSIBLE_PLAYBOOK, run_playbook

from logpipe import config as logpipe_config

TOP = Path(__file__).resolve().parents[2]
RENDER = TOP / "tests" / "roles" / "render-inventory.yml"
VALIDATE = TOP / "playbooks" / "validate.yml"

pytestmark = pytest.mark.skipif(
    ANSIBLE_PLAYBOOK is None, reason="ansible-playbook is not installed"
)


# --- layouts the roles refuse before any host is changed ----------------------------------------

def _layout(controllers: dict[str, dict], brokers: dict[str, dict],
            logpipe: dict[str, dict] | None = None) -> dict:
    return {"all": {
        "vars": {"kafka_install_method": "jars", "kafka_jars_src": "/nowhere",
                 "logpipe_elasticsearch_password": "es-password",
                 **{f"logpipe_kafka_{who}_password": f"{who}-password"
                    for who in ("producer", "consumer", "admin")}},
        "children": {
            "kafka_controller": {"hosts": controllers},
            "kafka_broker": {"hosts": brokers},
            "elasticsearch": {"hosts": {"es-1": {}}},
            "logpipe": {"hosts": logpipe or {"lp-1": {}}},
        },
    }}


GOOD_CONTROLLERS = {f"ctl-{i}": {"kafka_node_id": i} for i in (1, 2, 3)}
GOOD_BROKERS = {"broker-1": {"kafka_node_id": 101}, "broker-2": {"kafka_node_id": 102}}

BAD_LAYOUTS = {
    "no controller": (
        _layout({}, GOOD_BROKERS),
        r"0 controllers \(none in group kafka_controller\).*odd number of voters"),
    "even quorum": (
        _layout({"ctl-1": {"kafka_node_id": 1}, "ctl-2": {"kafka_node_id": 2}}, GOOD_BROKERS),
        r"2 controllers \(ctl-1, ctl-2 in group kafka_controller\)"),
    "node id reused": (
        _layout(GOOD_CONTROLLERS, {"broker-1": {"kafka_node_id": 2},
                                   "broker-2": {"kafka_node_id": 102}}),
        r"node ids shared by several hosts:\s+2 on ctl-2, broker-1;"),
    "broker cannot reach the controllers": (
        _layout(GOOD_CONTROLLERS, {
            "broker-1": {"kafka_node_id": 101},
            "broker-2": {"kafka_node_id": 102, "kafka_controller_listener_protocol": "PLAINTEXT"}}),
        r"brokers could not reach the quorum.*differ\s+from CONTROLLER/SSL:\s+broker-2\."),
    "no broker": (
        _layout(GOOD_CONTROLLERS, {}),
        r"group kafka_broker is empty"),
    "more topic replicas than brokers": (
        _layout(GOOD_CONTROLLERS, GOOD_BROKERS,
                {"lp-1": {"logpipe_kafka_replication_factor": 3}}),
        r"topic replication factor 3 / min ISR 2 \(2 brokers\)"),
}


@pytest.mark.parametrize("case", list(BAD_LAYOUTS))
def test_validate_refuses_bad_layout_naming_the_hosts(tmp_path: Path, case: str) -> None:
    inventory, message = BAD_LAYOUTS[case]
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory))
    proc = run_playbook(tmp_path, tmp_path / "hosts.yml", VALIDATE)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"{case}: validate.yml accepted it:\n{out[-3000:]}"
    assert re.search(message, out, re.S), f"{case}: no {message!r} in:\n{out[-3000:]}"


def test_validate_accepts_the_dedicated_layout(tmp_path: Path) -> None:
    (tmp_path / "hosts.yml").write_text(
        yaml.safe_dump(_layout(GOOD_CONTROLLERS, GOOD_BROKERS)))
    proc = run_playbook(tmp_path, tmp_path / "hosts.yml", VALIDATE)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


# --- the example inventory, rendered --------------------------------------------------------------

def _properties(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines()
                if line and not line.startswith("#") and "=" in line)


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example inventory rendered: <dir>/<host>/<file> for every Kafka and logpipe host."""
    tmp = tmp_path_factory.mktemp("example")
    out = tmp / "render"
    proc = run_playbook(tmp, TOP / "inventories" / "example", RENDER, "-e", f"render_dir={out}")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out


def _example_hosts(group: str) -> list[str]:
    hosts = yaml.safe_load((TOP / "inventories" / "example" / "hosts.yml").read_text())
    return list(hosts["all"]["children"][group]["hosts"])


def test_example_kafka_listeners_follow_each_node_role(example: Path) -> None:
    controllers, brokers = _example_hosts("kafka_controller"), _example_hosts("kafka_broker")
    assert set(controllers).isdisjoint(brokers), "the example keeps controllers dedicated"
    for host in controllers + brokers:
        props = _properties((example / host / "server.properties").read_text())
        roles = props["process.roles"]
        protocols = dict(p.split(":") for p in props["listener.security.protocol.map"].split(","))
        listeners = props["listeners"]
        # Every node maps the controller listener (brokers connect to the quorum through it).
        assert props["controller.listener.names"] in protocols, (host, props)
        assert props["controller.quorum.voters"].count("@") == len(controllers)
        # Secure by default: TLS on every listener, SCRAM for clients, every node a super user.
        assert protocols["CONTROLLER"] == "SSL"
        assert props["allow.everyone.if.no.acl.found"] == "false"
        assert props["super.users"].split(";") == [f"User:{h}" for h in controllers + brokers]
        if host in controllers:
            assert roles == "controller"
            assert listeners == "CONTROLLER://:9093", (host, listeners)
            assert "inter.broker.listener.name" not in props
        else:
            assert roles == "broker"
            assert listeners == "CLIENT://:9092,INTERNAL://:9091", (host, listeners)
            assert protocols["CLIENT"] == "SASL_SSL" and protocols["INTERNAL"] == "SSL"
            assert props["inter.broker.listener.name"] == "INTERNAL"
            assert ":9093" not in props["advertised.listeners"]
            # Three brokers: RF 3, min ISR 2.
            assert props["default.replication.factor"] == "3"
            assert props["min.insync.replicas"] == "2"


def test_example_kafka_configs_pass_kafkas_own_checks(example: Path, tmp_path: Path) -> None:
    """StorageTool parses the whole KafkaConfig before formatting: a listener, quorum or role
    mistake fails here as it would on the host (the ConfigException of a broker-only node with
    no protocol for the controller listener did)."""
    from harness.servers import java_home, kafka_home

    java = java_home() / "bin" / "java"
    classpath = f"{kafka_home() / 'libs'}/*"
    cluster_id = subprocess.run(
        [str(java), "-cp", classpath, "kafka.tools.StorageTool", "random-uuid"],
        capture_output=True, text=True, check=True, timeout=120).stdout.strip()
    for host in _example_hosts("kafka_controller") + _example_hosts("kafka_broker"):
        text = (example / host / "server.properties").read_text()
        data = tmp_path / host
        text = re.sub(r"(?m)^(log\.dirs|metadata\.log\.dir)=.*$", rf"\1={data}", text)
        conf = tmp_path / f"{host}.properties"
        conf.write_text(text)
        proc = subprocess.run(
            [str(java), "-cp", classpath, "kafka.tools.StorageTool", "format",
             f"--cluster-id={cluster_id}", f"--config={conf}"],
            capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, f"{host}: {proc.stdout}{proc.stderr}"
        assert (data / "meta.properties").exists(), host


def test_example_logpipe_config_loads(example: Path) -> None:
    for host in _example_hosts("logpipe"):
        cfg = logpipe_config.load(example / host / "logpipe.toml", environ={})
        assert cfg.kafka.bootstrap_servers.count(":9092") == len(_example_hosts("kafka_broker"))
        assert cfg.kafka.replication_factor == 3
        assert cfg.kafka.min_insync_replicas == 2
        assert all(h.startswith("https://") for h in cfg.elasticsearch.hosts)
        # Secure by default: the consumer principal over SASL_SSL, secrets only as file paths.
        assert cfg.kafka.security_protocol == "SASL_SSL"
        assert cfg.kafka.sasl_mechanism == "SCRAM-SHA-512"
        assert cfg.kafka.sasl_username == "logpipe-consumer"
        assert cfg.kafka.sasl_password_file == "/etc/logpipe/kafka-consumer-password"
        assert cfg.kafka.ssl_ca_location == "/etc/logpipe/tls/ca.crt"
        assert cfg.elasticsearch.ca_certs == "/etc/logpipe/tls/ca.crt"
        assert "CHANGE-ME" not in (example / host / "logpipe.toml").read_text()
