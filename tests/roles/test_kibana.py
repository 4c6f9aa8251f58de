"""roles/kibana without the Kibana binary: templates, argument spec, asserts; a real converge
only when LOGPIPE_KIBANA_ARCHIVE points at a Kibana tarball.

Templates are rendered by Ansible itself (`ansible-playbook` against localhost with
`connection: local`, into a temporary directory), so the filters and lookups are the real ones.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

TOP = Path(__file__).resolve().parents[2]
ROLE = TOP / "roles" / "kibana"
BIN = Path(sys.executable).parent
ANSIBLE_PLAYBOOK = shutil.which("ansible-playbook", path=str(BIN)) or shutil.which(
    "ansible-playbook"
)

KEY = "k" * 32  # valid length
VARS = {
    "kibana_encrypted_saved_objects_key": KEY + "eso",
    "kibana_reporting_key": KEY + "rep",
    "kibana_security_key": KEY + "sec",
    "kibana_elasticsearch_service_account_token": "AAEAAWVsYXN0aWMva2liYW5hL3Rva2VuOnNlY3JldA",
    "kibana_server_public_base_url": "https://kibana.example.test",
    "kibana_elasticsearch_ca_path": "/etc/kibana/certs/http_ca.crt",
    "kibana_max_old_space_size": 768,
    "kibana_extra_config": {"telemetry.optIn": False},
}
INVENTORY = """\
[elasticsearch]
es-1 ansible_host=10.0.0.11
es-2 elasticsearch_node_address=10.0.0.12 elasticsearch_http_port=9201
es-3

[kibana]
localhost ansible_connection=local ansible_python_interpreter={python}
"""

pytestmark = pytest.mark.skipif(
    ANSIBLE_PLAYBOOK is None, reason="ansible-playbook is not installed"
)


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        ANSIBLE_ROLES_PATH=str(TOP / "roles"),
        ANSIBLE_LOCAL_TEMP=str(tmp / "ansible-tmp"),
        ANSIBLE_HOME=str(tmp / "ansible-home"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_RETRY_FILES_ENABLED="0",
    )
    return env


def _playbook(
    tmp: Path, plays: list[dict], extra_vars: dict | None = None
) -> subprocess.CompletedProcess[str]:
    (tmp / "inventory").write_text(INVENTORY.format(python=sys.executable))
    (tmp / "play.yml").write_text(yaml.safe_dump(plays, sort_keys=False))
    cmd = [ANSIBLE_PLAYBOOK, "-i", str(tmp / "inventory"), str(tmp / "play.yml")]
    if extra_vars is not None:
        (tmp / "vars.json").write_text(json.dumps(extra_vars))
        cmd += ["-e", f"@{tmp / 'vars.json'}"]
    return subprocess.run(
        cmd, cwd=TOP, env=_env(tmp), capture_output=True, text=True, timeout=300, check=False
    )


def _render(tmp: Path, overrides: dict, unit_facts: dict | None = None) -> dict[str, str]:
    """Render every template of the role with the role's defaults plus overrides."""
    out = tmp / "out"
    out.mkdir()
    facts = {"_kibana_home": "/opt/kibana", "_kibana_unit_managed_by_role": True} | (
        unit_facts or {}
    )
    templates = ["kibana.yml.j2", "node.options.j2", "kibana.service.j2", "override.conf.j2"]
    play = {
        "name": "Render the kibana role's templates",
        "hosts": "kibana",
        "gather_facts": False,
        "vars_files": [str(ROLE / "defaults" / "main.yml")],
        "tasks": [
            {"name": "Set the role's internal facts", "ansible.builtin.set_fact": facts},
            {
                "name": "Render",
                "ansible.builtin.template": {
                    "src": str(ROLE / "templates" / "{{ item }}"),
                    "dest": str(out) + "/{{ item | regex_replace('\\.j2$', '') }}",
                    "mode": "0600",
                },
                "loop": templates,
            },
        ],
    }
    proc = _playbook(tmp, [play], overrides)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {t.removesuffix(".j2"): (out / t.removesuffix(".j2")).read_text() for t in templates}


def test_kibana_yml_renders_every_setting(tmp_path: Path) -> None:
    files = _render(tmp_path, VARS)
    cfg = yaml.safe_load(files["kibana.yml"])
    assert cfg["server.host"] == "0.0.0.0"
    assert cfg["server.port"] == 5601
    assert cfg["server.publicBaseUrl"] == "https://kibana.example.test"
    # Hosts from the `elasticsearch` group: node address > ansible_host > inventory name.
    assert cfg["elasticsearch.hosts"] == [
        "https://10.0.0.11:9200",
        "https://10.0.0.12:9201",
        "https://es-3:9200",
    ]
    assert (
        cfg["elasticsearch.serviceAccountToken"]
        == VARS["kibana_elasticsearch_service_account_token"]
    )
    assert "elasticsearch.username" not in cfg
    assert cfg["elasticsearch.ssl.certificateAuthorities"] == ["/etc/kibana/certs/http_ca.crt"]
    assert cfg["elasticsearch.ssl.verificationMode"] == "full"
    assert (
        cfg["xpack.encryptedSavedObjects.encryptionKey"]
        == VARS["kibana_encrypted_saved_objects_key"]
    )
    assert cfg["xpack.reporting.encryptionKey"] == VARS["kibana_reporting_key"]
    assert cfg["xpack.security.encryptionKey"] == VARS["kibana_security_key"]
    assert cfg["path.data"] == "/var/lib/kibana"
    assert cfg["logging.appenders.file.fileName"] == "/var/log/kibana/kibana.log"
    assert cfg["telemetry.optIn"] is False  # kibana_extra_config merged last
    assert "--max-old-space-size=768" in files["node.options"].splitlines()


def test_kibana_yml_explicit_hosts_plain_http_and_username(tmp_path: Path) -> None:
    overrides = VARS | {
        "kibana_elasticsearch_hosts": ["http://127.0.0.1:9200"],
        "kibana_elasticsearch_service_account_token": "",
        "kibana_elasticsearch_username": "kibana_system",
        "kibana_elasticsearch_password": "pw",
        "kibana_elasticsearch_ca_path": "",
        "kibana_server_public_base_url": "",
    }
    cfg = yaml.safe_load(_render(tmp_path, overrides)["kibana.yml"])
    assert cfg["elasticsearch.hosts"] == ["http://127.0.0.1:9200"]
    assert cfg["elasticsearch.username"] == "kibana_system"
    assert "elasticsearch.serviceAccountToken" not in cfg
    assert "server.publicBaseUrl" not in cfg
    assert "elasticsearch.ssl.verificationMode" not in cfg  # no https host
    assert "elasticsearch.ssl.certificateAuthorities" not in cfg


def test_unit_and_dropin_are_sandboxed(tmp_path: Path) -> None:
    files = _render(tmp_path, VARS)
    unit = files["kibana.service"].splitlines()
    for line in [
        "User=kibana",
        "Environment=KBN_PATH_CONF=/etc/kibana",
        "ExecStart=/opt/kibana/bin/kibana",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/kibana /var/log/kibana",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=",
        "WantedBy=multi-user.target",
    ]:
        assert line in unit, line
    dropin = files["override.conf"].splitlines()
    assert dropin[dropin.index("[Service]") :][:2] == [
        "[Service]",
        "Environment=KBN_PATH_CONF=/etc/kibana",
    ]
    assert "ProtectSystem=strict" in dropin


def _validate(tmp: Path, overrides: dict) -> subprocess.CompletedProcess[str]:
    """The role's argument spec (ansible's validate_argument_spec), then its assert tasks."""
    spec = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())["argument_specs"][
        "main"
    ]
    play = {
        "name": "Validate kibana role variables",
        "hosts": "kibana",
        "gather_facts": False,
        "vars_files": [str(ROLE / "defaults" / "main.yml")],
        "tasks": [
            {
                "name": "Argument spec",
                "ansible.builtin.validate_argument_spec": {
                    "argument_spec": spec["options"],
                    "provided_arguments": {k: f"{{{{ {k} }}}}" for k in overrides},
                },
            },
            {
                "name": "Role asserts",
                "ansible.builtin.include_tasks": str(ROLE / "tasks" / "assert.yml"),
            },
        ],
    }
    return _playbook(tmp, [play], overrides)


def test_valid_variables_pass(tmp_path: Path) -> None:
    proc = _validate(tmp_path, VARS)
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_short_encryption_key_is_rejected(tmp_path: Path) -> None:
    proc = _validate(tmp_path, VARS | {"kibana_security_key": "too-short"})
    assert proc.returncode != 0
    assert "at least 32 characters" in proc.stdout
    assert "too-short" not in proc.stdout  # no_log: the key is never printed


def test_bad_choice_and_type_fail_argument_spec(tmp_path: Path) -> None:
    proc = _validate(tmp_path, VARS | {"kibana_install_method": "snap"})
    assert proc.returncode != 0
    assert "kibana_install_method" in proc.stdout and "snap" in proc.stdout
    second = tmp_path / "port"
    second.mkdir()
    proc = _validate(second, VARS | {"kibana_server_port": "http"})
    assert proc.returncode != 0
    assert "kibana_server_port" in proc.stdout


def test_public_base_url_trailing_slash_is_rejected(tmp_path: Path) -> None:
    proc = _validate(
        tmp_path, VARS | {"kibana_server_public_base_url": "https://kibana.example.test/"}
    )
    assert proc.returncode != 0
    assert "publicBaseUrl" in proc.stdout


def test_elastic_superuser_is_rejected(tmp_path: Path) -> None:
    overrides = VARS | {
        "kibana_elasticsearch_service_account_token": "",
        "kibana_elasticsearch_username": "elastic",
    }
    proc = _validate(tmp_path, overrides)
    assert proc.returncode != 0


def test_missing_encryption_key_fails_argument_spec(tmp_path: Path) -> None:
    overrides = {k: v for k, v in VARS.items() if k != "kibana_reporting_key"}
    proc = _validate(tmp_path, overrides | {"kibana_reporting_key": None})
    assert proc.returncode != 0


KIBANA_ARCHIVE = os.environ.get("LOGPIPE_KIBANA_ARCHIVE", "")
SKIP_REASON = (
    "Kibana artifacts cannot be downloaded on this machine: no Elastic APT repo or artifact host "
    "reachable; converge/verify of roles/kibana not run (set LOGPIPE_KIBANA_ARCHIVE to a Kibana "
    "linux-x86_64 tar.gz to run it)"
)


@pytest.mark.molecule
@pytest.mark.skipif(not KIBANA_ARCHIVE, reason=SKIP_REASON)
def test_converge_kibana_for_real(tmp_path: Path) -> None:
    """Converge roles/elasticsearch (integ-test zip, one node) and roles/kibana (the given tarball)
    in one systemd container, then check Kibana's status API and the data view."""
    archive = Path(KIBANA_ARCHIVE).resolve()
    assert archive.is_file(), f"LOGPIPE_KIBANA_ARCHIVE={KIBANA_ARCHIVE} is not a file"
    version = archive.name.removeprefix("kibana-").split("-linux")[0]
    es_zip = subprocess.run(
        [str(TOP / "scripts" / "fetch-elasticsearch.sh")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    name = "logpipe-kibana-converge"
    network = "logpipe-kibana-converge"
    plays = [
        {
            "name": "Create a systemd container",
            "hosts": "localhost",
            "gather_facts": False,
            "tasks": [
                {"name": "Network", "community.docker.docker_network": {"name": network}},
                {
                    "name": "Container",
                    "community.docker.docker_container": {
                        "name": name,
                        "hostname": name,
                        "image": "logpipe-base:bookworm",
                        "pull": False,
                        "command": "/lib/systemd/systemd",
                        "capabilities": ["SYS_ADMIN", "NET_ADMIN"],
                        "security_opts": ["seccomp=unconfined"],
                        "cgroupns_mode": "host",
                        "volumes": ["/sys/fs/cgroup:/sys/fs/cgroup:rw"],
                        "tmpfs": ["/run", "/run/lock", "/tmp"],
                        "stop_signal": "SIGRTMIN+3",
                        "env": {"container": "docker"},
                        "networks": [{"name": network}],
                        "state": "started",
                    },
                },
                {
                    "name": "Add it",
                    "ansible.builtin.add_host": {
                        "name": name,
                        "groups": ["elasticsearch", "kibana_hosts"],
                        "ansible_connection": "community.docker.docker",
                    },
                },
            ],
        },
        {
            "name": "Java",
            "hosts": name,
            "tasks": [
                {
                    "name": "JRE",
                    "ansible.builtin.apt": {
                        "name": "openjdk-17-jre-headless",
                        "update_cache": True,
                    },
                }
            ],
        },
        {
            "name": "Elasticsearch and Kibana",
            "hosts": name,
            "vars": {
                "elasticsearch_install_method": "archive",
                "elasticsearch_archive_src": es_zip,
                "elasticsearch_network_host": ["_local_"],
                "elasticsearch_heap_size": "512m",
                "elasticsearch_discovery_type": "single-node",
                "kibana_install_method": "archive",
                "kibana_archive_src": str(archive),
                "kibana_version": version,
                "kibana_elasticsearch_hosts": ["http://127.0.0.1:9200"],
                "kibana_data_views": [{"title": "web-logs-topic*", "time_field": "indexed_at"}],
            }
            | {
                k: VARS[k]
                for k in (
                    "kibana_encrypted_saved_objects_key",
                    "kibana_reporting_key",
                    "kibana_security_key",
                )
            },
            "roles": ["elasticsearch", "kibana"],
        },
    ]
    try:
        proc = _playbook(tmp_path, plays)
        assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
        # Idempotence: the second run changes nothing on the host.
        second = _playbook(tmp_path, plays)
        assert second.returncode == 0, second.stdout[-5000:]
        recap = second.stdout.split("PLAY RECAP")[-1]
        assert re.search(rf"{name}\s+:.*changed=0", recap), recap
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
        subprocess.run(["docker", "network", "rm", network], capture_output=True, check=False)
