"""roles/kafka's health wait ends within kafka_health_timeout whatever the admin tool does.

The controller here is a loopback port that accepts connections and never answers: the real
MetadataQuorumCommand (from the pinned Kafka jars) then blocks on its own client timeout, over a
minute per call. The role's wait must still give up by its deadline and say what it waited for.
Runs the role's own tasks (include_role tasks_from verify/health.yml) against localhost.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from harness.playbook import ANSIBLE_PLAYBOOK, run_playbook

pytestmark = pytest.mark.skipif(
    ANSIBLE_PLAYBOOK is None, reason="ansible-playbook is not installed"
)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections and never sends a byte."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except (TimeoutError, OSError):
                continue
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=2)
        for conn in held:
            conn.close()
        server.close()


def test_quorum_wait_gives_up_at_its_deadline(tmp_path: Path, silent_port: int) -> None:
    from harness.servers import java_home, kafka_home

    # The role runs its tools as <prefix>/kafka/libs/*: point a scratch prefix at the pinned jars.
    prefix = tmp_path / "opt"
    prefix.mkdir()
    (prefix / "kafka").symlink_to(kafka_home())
    timeout_s, attempt_s = 20, 8
    inventory = {"all": {"children": {
        "kafka_controller": {"hosts": {"localhost": {
            "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
            "kafka_node_id": 1, "kafka_advertised_host": "127.0.0.1",
            "kafka_controller_port": silent_port}}},
        "kafka_broker": {"hosts": {}},
    }}}
    play = [{
        "name": "Wait for the health of a quorum that never answers",
        "hosts": "localhost",
        "gather_facts": False,
        "tasks": [{
            "name": "Run the role's health wait",
            "ansible.builtin.include_role": {"name": "kafka", "tasks_from": "verify/health.yml"},
            "vars": {
                "kafka_install_prefix": str(prefix),
                "kafka_java_bin": str(java_home() / "bin" / "java"),
                "kafka_health_timeout": timeout_s,
                "kafka_health_attempt_timeout": attempt_s,
                "kafka_health_delay": 2,
            },
        }],
    }]
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory))
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play, sort_keys=False))
    started = time.monotonic()
    proc = run_playbook(tmp_path, tmp_path / "hosts.yml", tmp_path / "play.yml", timeout=600)
    elapsed = time.monotonic() - started
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "waited kafka_health_timeout=20 s for the metadata quorum" in out, out[-3000:]
    assert f"127.0.0.1:{silent_port}" in out
    # The deadline, plus Ansible's own start-up and task overhead; one blocked call alone would
    # take over a minute.
    assert elapsed < timeout_s + 25, f"health wait took {elapsed:.0f} s (timeout {timeout_s} s)"
