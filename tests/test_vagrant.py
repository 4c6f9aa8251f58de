"""The Vagrantfile and its inventories agree, and `vagrant validate` accepts the Vagrantfile.

inventories/vagrant (5 VMs) is the default; LOGPIPE_VAGRANT_INVENTORY=vagrant-smoke selects the
all-in-one VM of `make vagrant-smoke`, with LOGPIPE_VAGRANT_LIBVIRT_DRIVER=qemu for emulation.

No VM is created and no box is downloaded: `vagrant validate` and `vagrant status` only read the
configuration. When `vagrant` is missing, the test installs Debian's `vagrant` package itself if it
runs as root with apt-get available (as on CI, where .ci/run is root); otherwise it skips with the
reason. Vagrant's state goes to .cache/vagrant/ so the checkout stays clean.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

TOP = Path(__file__).resolve().parents[1]
INVENTORY = TOP / "inventories" / "vagrant"
SMOKE_INVENTORY = TOP / "inventories" / "vagrant-smoke"
NETWORK = ipaddress.ip_network("192.168.56.0/24")
GROUPS = {"kafka_controller", "kafka_broker", "elasticsearch", "kibana", "logpipe"}


@dataclass
class Host:
    ip: str | None = None
    groups: set[str] = field(default_factory=set)
    hostvars: dict[str, Any] = field(default_factory=dict)


def _inventory_hosts(inventory: Path = INVENTORY) -> dict[str, Host]:
    """The hosts of <inventory>/hosts.yml with their address, groups and variables."""
    data = yaml.safe_load((inventory / "hosts.yml").read_text())
    hosts: dict[str, Host] = {}

    def walk(name: str, group: dict[str, Any]) -> None:
        for host, hvars in (group.get("hosts") or {}).items():
            entry = hosts.setdefault(host, Host())
            entry.groups.add(name)
            entry.hostvars.update(hvars or {})
            entry.ip = entry.ip or (hvars or {}).get("ansible_host")
        for child, sub in (group.get("children") or {}).items():
            walk(child, sub or {})

    walk("all", data["all"])
    return hosts


def _vagrant() -> str:
    found = shutil.which("vagrant")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("vagrant is not installed and this test installs Debian's `vagrant` package "
                    "only when running as root with apt-get (sudo apt-get install vagrant)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-qq", "vagrant"]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=False)
        proc = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            pytest.skip(f"apt-get install vagrant failed (rc={proc.returncode}): "
                        f"{proc.stderr.strip()[-300:]}")
    found = shutil.which("vagrant")
    if not found:
        pytest.skip("apt-get installed vagrant but it is not on PATH")
    return found


def _run_vagrant(*args: str, kibana: bool = False,
                 **env_overrides: str) -> subprocess.CompletedProcess[str]:
    state = TOP / ".cache" / "vagrant"
    state.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ,
               VAGRANT_HOME=str(state / "home"),
               VAGRANT_DOTFILE_PATH=str(state / "dotfile"),
               VAGRANT_CHECKPOINT_DISABLE="1",
               LOGPIPE_VAGRANT_KIBANA="1" if kibana else "0")
    # The caller's selection only: never the environment the tests happen to run in.
    for name in ("LOGPIPE_VAGRANT_INVENTORY", "LOGPIPE_VAGRANT_LIBVIRT_DRIVER",
                 "LOGPIPE_VAGRANT_BOX"):
        env.pop(name, None)
    env.update(env_overrides)
    return subprocess.run([_vagrant(), *args], cwd=TOP, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def test_inventory_follows_the_contract() -> None:
    hosts = _inventory_hosts()
    groups: set[str] = set().union(*(h.groups for h in hosts.values()))
    assert groups >= GROUPS, f"missing groups: {GROUPS - groups}"
    ips = [h.ip for h in hosts.values()]
    assert all(ips), "every host needs ansible_host (the Vagrantfile uses it as the VM's address)"
    assert len(set(ips)) == len(ips), "two hosts share an address"
    assert all(ipaddress.ip_address(ip) in NETWORK for ip in ips if ip)
    kafka = [h for h in hosts.values() if {"kafka_controller", "kafka_broker"} & h.groups]
    node_ids = [h.hostvars.get("kafka_node_id") for h in kafka]
    assert all(isinstance(i, int) for i in node_ids), "every Kafka host needs an int kafka_node_id"
    assert len(set(node_ids)) == len(node_ids), "kafka_node_id must be unique"
    controllers = [h for h in hosts.values() if "kafka_controller" in h.groups]
    assert len(controllers) % 2 == 1, "a KRaft quorum needs an odd number of controllers"


def test_vagrant_validate() -> None:
    for kibana in (False, True):
        proc = _run_vagrant("validate", kibana=kibana)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "validated successfully" in proc.stdout


def test_vagrant_machines_match_the_inventory() -> None:
    hosts = _inventory_hosts()
    for kibana in (False, True):
        proc = _run_vagrant("status", "--machine-readable", kibana=kibana)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        machines = {line.split(",")[1] for line in proc.stdout.splitlines()
                    if line.count(",") >= 3 and line.split(",")[2] == "state"}
        expected = {n for n, h in hosts.items() if kibana or "kibana" not in h.groups}
        assert machines == expected


def test_provisioner_paths_exist() -> None:
    text = (TOP / "Vagrantfile").read_text()
    assert 'ansible.playbook = "site.yml"' in text and (TOP / "site.yml").is_file()
    assert 'ENV.fetch("LOGPIPE_VAGRANT_INVENTORY", "vagrant")' in text
    assert 'ansible.inventory_path = "inventories/#{INVENTORY_NAME}"' in text
    assert (TOP / "ansible.cfg").is_file()


def test_smoke_inventory_is_one_all_in_one_host() -> None:
    """inventories/vagrant-smoke: one VM carrying a combined KRaft node, Elasticsearch and
    logpipe (no Kibana), sized by its own vagrant_cpus/vagrant_memory."""
    hosts = _inventory_hosts(SMOKE_INVENTORY)
    assert list(hosts) == ["aio-1"], hosts
    host = hosts["aio-1"]
    assert host.groups >= {"kafka_controller", "kafka_broker", "elasticsearch", "logpipe"}
    assert "kibana" not in host.groups
    assert host.ip and ipaddress.ip_address(host.ip) in NETWORK
    assert isinstance(host.hostvars.get("kafka_node_id"), int)
    assert host.hostvars.get("vagrant_memory", 0) >= 3072, "three tiers need the memory"
    # Installs from this machine's artifacts, no downloads but Debian's archive.
    group_vars = {p.stem: yaml.safe_load(p.read_text())
                  for p in (SMOKE_INVENTORY / "group_vars").glob("*.yml")}
    assert group_vars["all"]["kafka_install_method"] == "jars"
    assert group_vars["elasticsearch"]["elasticsearch_install_method"] == "archive"
    # Production mode: no single-node discovery (it skips the bootstrap checks), mmap on.
    assert "elasticsearch_discovery_type" not in group_vars["elasticsearch"]
    assert "node.store.allow_mmap" not in group_vars["elasticsearch"].get(
        "elasticsearch_extra_config", {})
    assert group_vars["all"].get("common_sysctl_apply", True) is True


def test_vagrantfile_selects_the_smoke_inventory() -> None:
    env = {"LOGPIPE_VAGRANT_INVENTORY": "vagrant-smoke", "LOGPIPE_VAGRANT_LIBVIRT_DRIVER": "qemu",
           "LOGPIPE_VAGRANT_BOX": "local/logpipe-bookworm"}
    proc = _run_vagrant("validate", **env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = _run_vagrant("status", "--machine-readable", **env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    machines = {line.split(",")[1] for line in proc.stdout.splitlines()
                if line.count(",") >= 3 and line.split(",")[2] == "state"}
    assert machines == set(_inventory_hosts(SMOKE_INVENTORY))


@pytest.mark.parametrize(("name", "value", "message"), [
    ("LOGPIPE_VAGRANT_INVENTORY", "nonexistent", "no inventories/nonexistent/hosts.yml"),
    ("LOGPIPE_VAGRANT_INVENTORY", "../inventories/vagrant",
     "no inventories/../inventories/vagrant"),
    ("LOGPIPE_VAGRANT_LIBVIRT_DRIVER", "tcg", "must be kvm or qemu"),
])
def test_vagrantfile_refuses_bad_settings(name: str, value: str, message: str) -> None:
    proc = _run_vagrant("validate", **{name: value})
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
