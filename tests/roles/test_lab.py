"""The lab and the Molecule scenarios share one way of running a systemd host in a container, and
the lab's topology is the committed inventory inventories/lab/hosts.yml. Checked without Docker:
the files themselves, and site.yml's validation play against the lab inventory."""

from __future__ import annotations

import ipaddress
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness.playbook import ANSIBLE_PLAYBOOK, run_playbook

TOP = Path(__file__).resolve().parents[2]
SHARED = TOP / "molecule" / "shared"
SYSTEMD_CONTAINERS = SHARED / "tasks" / "systemd-containers.yml"
LAB = TOP / "inventories" / "lab"
SCENARIOS = sorted(p.parent.name for p in (TOP / "molecule").glob("*/molecule.yml"))
# What a scenario's platform may say: the per-host fields molecule/shared/create.yml reads.
PLATFORM_KEYS = {"name", "image", "groups", "networks", "network_mode", "tmpfs"}


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "-C", str(TOP), "ls-files", "-z", *patterns],
                         capture_output=True, check=True).stdout.decode().split("\0")
    return [TOP / name for name in out if name]


def test_the_systemd_container_flags_are_stated_once() -> None:
    """No scenario, script or test repeats what systemd-containers.yml says."""
    if not (TOP / ".git").exists():
        pytest.skip("not a git checkout")
    # (The base image's own CMD is /lib/systemd/systemd too: that is the image, not the flags.)
    flags = re.compile(r"cgroupns|SIGRTMIN|seccomp=unconfined")
    found = [f"{path.relative_to(TOP)}: {line.strip()}"
             for path in _tracked("*.yml", "*.yaml", "*.sh", "*.py", "Makefile", "Vagrantfile")
             if path not in (SYSTEMD_CONTAINERS, Path(__file__)) and path.is_file()
             for line in path.read_text().splitlines()
             if flags.search(line) and not line.lstrip().startswith("#")]
    assert not found, "\n".join(found)
    assert len(flags.findall(SYSTEMD_CONTAINERS.read_text())) >= 3


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_each_scenario_creates_its_hosts_with_the_shared_playbooks(scenario: str) -> None:
    here = TOP / "molecule" / scenario
    config = yaml.safe_load((here / "molecule.yml").read_text())
    playbooks = config["provisioner"]["playbooks"]
    assert (here / playbooks["create"]).resolve() == SHARED / "create.yml"
    assert (here / playbooks["destroy"]).resolve() == SHARED / "destroy.yml"
    assert not (TOP / "molecule" / scenario / "create.yml").exists()
    assert not (TOP / "molecule" / scenario / "destroy.yml").exists()
    seen: list[str] = []
    for platform in config["platforms"]:
        extra = set(platform) - PLATFORM_KEYS
        assert not extra, f"{platform['name']}: {sorted(extra)} belong in {SYSTEMD_CONTAINERS.name}"
        # Created in platform order: a shared network namespace must already exist.
        mode = platform.get("network_mode", "")
        if mode.startswith("container:"):
            assert mode.removeprefix("container:") in seen, platform["name"]
        assert "networks" in platform or mode, platform["name"]
        seen.append(platform["name"])


def _lab() -> dict[str, Any]:
    return yaml.safe_load((LAB / "hosts.yml").read_text())["all"]


def _lab_hosts() -> dict[str, dict[str, Any]]:
    hosts: dict[str, dict[str, Any]] = {}
    for group in _lab()["children"].values():
        for name, hostvars in (group.get("hosts") or {}).items():
            hosts.setdefault(name, {}).update(hostvars or {})
    return hosts


def test_the_lab_inventory_gives_each_host_its_own_address_in_the_lab_subnet() -> None:
    subnet = ipaddress.ip_network(_lab()["vars"]["lab_subnet"])
    addresses = {name: ipaddress.ip_address(h["ansible_host"]) for name, h in _lab_hosts().items()}
    assert all(a in subnet for a in addresses.values()), addresses
    assert len(set(addresses.values())) == len(addresses), addresses
    # Docker's gateway takes the first address.
    assert next(subnet.hosts()) not in addresses.values()


def test_the_lab_inventory_is_the_guides_topology() -> None:
    groups = {g: sorted(v.get("hosts") or {}) for g, v in _lab()["children"].items()}
    assert groups == {
        "kafka_controller": ["kafka-ctl-1", "kafka-ctl-2", "kafka-ctl-3"],
        "kafka_broker": ["kafka-broker-1", "kafka-broker-2"],
        "elasticsearch": ["es-1"],
        "kibana": ["kibana-1"],
        "logpipe": ["logpipe-1"],
    }
    ids = {n: h["kafka_node_id"] for n, h in _lab_hosts().items() if "kafka_node_id" in h}
    assert ids == {"kafka-ctl-1": 1, "kafka-ctl-2": 2, "kafka-ctl-3": 3,
                   "kafka-broker-1": 101, "kafka-broker-2": 102}


def test_the_machine_paths_are_not_committed_in_the_lab_inventory() -> None:
    """The lab state and artifact paths of this machine come from generated/lab.yml (git-ignored),
    which scripts/lab-hosts.yml writes: no committed file of the inventory defines them."""
    if not (TOP / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "-C", str(TOP), "check-ignore", "-q",
                              "inventories/lab/generated/lab.yml"], check=False)
    assert ignored.returncode == 0
    machine = {"lab_state_dir", "lab_kafka_dist_dir", "lab_elasticsearch_zip", "lab_kibana_archive"}
    for path in _tracked("inventories/lab/*.yml"):
        data = yaml.safe_load(path.read_text()) or {}
        defined = set(data) | set(data.get("all", {}).get("vars", {}))
        assert not defined & machine, f"{path.relative_to(TOP)}: {sorted(defined & machine)}"


@pytest.mark.skipif(ANSIBLE_PLAYBOOK is None, reason="ansible-playbook is not installed")
def test_site_validation_accepts_the_lab_inventory(tmp_path: Path) -> None:
    """site.yml's validation play (each role's layout checks) passes on the lab's topology, with
    made-up machine paths in place of generated/lab.yml's."""
    inventory = tmp_path / "lab"
    inventory.mkdir()
    for item in ("hosts.yml", "group_vars"):
        (inventory / item).symlink_to(LAB / item)
    machine = {"lab_state_dir": str(tmp_path / "state"), "lab_kafka_dist_dir": "/nowhere",
               "lab_elasticsearch_zip": "/nowhere.zip", "lab_kibana_archive": ""}
    (inventory / "generated.yml").write_text(yaml.safe_dump({"all": {"vars": machine}}))
    proc = run_playbook(tmp_path, inventory, TOP / "playbooks" / "validate.yml")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
