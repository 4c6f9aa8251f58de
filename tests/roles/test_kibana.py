"""roles/kibana without the Kibana binary: templates, argument spec, asserts; a real converge
only when LOGPIPE_KIBANA_ARCHIVE points at a Kibana tarball. The saved objects' API calls have
their own contract test (test_kibana_contract.py).

Templates are rendered by Ansible itself (`ansible-playbook` against localhost with
`connection: local`, into a temporary directory), so the filters and lookups are the real ones.
"""

from __future__ import annotations

import base64
import datetime
import http.server
import ipaddress
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness.playbook import ANSIBLE_PLAYBOOK, ansible_env
from harness.tls import HttpsServer

TOP = Path(__file__).resolve().parents[2]
ROLE = TOP / "roles" / "kibana"
# How a systemd host runs in a container, stated once (Molecule, the lab and this test).
SYSTEMD_CONTAINERS = TOP / "molecule" / "shared" / "tasks" / "systemd-containers.yml"
# What the fake Kibana reports: the version the role pins.
KIBANA_VERSION = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())["kibana_version"]

KEY = "k" * 32  # valid length
# What roles/elasticsearch publishes on its hosts (set_fact elasticsearch_kibana_service_token);
# here inventory variables stand in for the facts.
TOKEN_ES1 = "AAEAAWVsYXN0aWMva2liYW5hL2VzMTpzZWNyZXQtb25l"
TOKEN_ES2 = "AAEAAWVsYXN0aWMva2liYW5hL2VzMjpzZWNyZXQtdHdv"
API_PASSWORD = "api-password-from-vault"
ES_PASSWORD = "kibana-system-password-from-vault"
VARS = {
    "kibana_encrypted_saved_objects_key": KEY + "eso",
    "kibana_reporting_key": KEY + "rep",
    "kibana_security_key": KEY + "sec",
    "kibana_api_password": API_PASSWORD,
    "kibana_server_public_base_url": "https://kibana.example.test",
    "kibana_max_old_space_size": 768,
    "kibana_extra_config": {"telemetry.optIn": False},
}
SECRETS = [
    TOKEN_ES1,
    TOKEN_ES2,
    API_PASSWORD,
    ES_PASSWORD,
    *(str(v) for k, v in VARS.items() if k.endswith("_key")),
]
INVENTORY = """\
[elasticsearch]
es-1 ansible_host=10.0.0.11 {es1}
es-2 elasticsearch_node_address=10.0.0.12 elasticsearch_http_port=9201 {es2}
es-3

[kibana]
localhost ansible_connection=local ansible_python_interpreter={python}
"""
PUBLISHED_BOTH = {"es1": TOKEN_ES1, "es2": TOKEN_ES2}

pytestmark = pytest.mark.skipif(
    ANSIBLE_PLAYBOOK is None, reason="ansible-playbook is not installed"
)


def _inventory(published: dict[str, str]) -> str:
    tokens = {
        h: f"elasticsearch_kibana_service_token={published[h]}" if h in published else ""
        for h in ("es1", "es2")
    }
    return INVENTORY.format(python=sys.executable, **tokens)


def _playbook(
    tmp: Path,
    plays: list[dict],
    extra_vars: dict | None = None,
    published: dict[str, str] | None = None,
    inventory: str | None = None,
) -> subprocess.CompletedProcess[str]:
    if inventory is None:
        inventory = _inventory(PUBLISHED_BOTH if published is None else published)
    (tmp / "inventory").write_text(inventory)
    (tmp / "play.yml").write_text(yaml.safe_dump(plays, sort_keys=False))
    cmd = [ANSIBLE_PLAYBOOK, "-i", str(tmp / "inventory"), str(tmp / "play.yml")]
    if extra_vars is not None:
        (tmp / "vars.json").write_text(json.dumps(extra_vars))
        cmd += ["-e", f"@{tmp / 'vars.json'}"]
    return subprocess.run(
        cmd, cwd=TOP, env=ansible_env(tmp), capture_output=True, text=True, timeout=300, check=False
    )


ROLE_VARS_FILES = [str(ROLE / "defaults" / "main.yml"), str(ROLE / "vars" / "main.yml")]


def _render(
    tmp: Path,
    overrides: dict,
    unit_facts: dict | None = None,
    published: dict[str, str] | None = None,
) -> dict[str, str]:
    """Render every template of the role with the role's defaults plus overrides."""
    out = tmp / "out"
    out.mkdir()
    facts = {"__kibana_home": "/opt/kibana", "__kibana_unit_managed_by_role": True} | (
        unit_facts or {}
    )
    templates = ["kibana.yml.j2", "node.options.j2", "kibana.service.j2", "override.conf.j2"]
    play = {
        "name": "Render the kibana role's templates",
        "hosts": "kibana",
        "gather_facts": False,
        "vars_files": ROLE_VARS_FILES,
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
    proc = _playbook(tmp, [play], overrides, published)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for secret in SECRETS:
        assert secret not in proc.stdout + proc.stderr, "a secret was printed"
    return {t.removesuffix(".j2"): (out / t.removesuffix(".j2")).read_text() for t in templates}


def test_kibana_yml_secure_defaults(tmp_path: Path) -> None:
    """Nothing but the Vault values set: HTTPS to every Elasticsearch node, verified against the
    deployment CA from roles/pki, the token the Elasticsearch role published, and server.ssl."""
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
    # The first Elasticsearch host's published token.
    assert cfg["elasticsearch.serviceAccountToken"] == TOKEN_ES1
    assert "elasticsearch.username" not in cfg and "elasticsearch.password" not in cfg
    # roles/pki's files in <conf>/certs.
    assert cfg["elasticsearch.ssl.certificateAuthorities"] == ["/etc/kibana/certs/ca.crt"]
    assert cfg["elasticsearch.ssl.verificationMode"] == "full"
    assert cfg["server.ssl.enabled"] is True
    assert cfg["server.ssl.certificate"] == "/etc/kibana/certs/kibana.crt"
    assert cfg["server.ssl.key"] == "/etc/kibana/certs/kibana.key"
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
    # The role's API password is for its own calls, never for Kibana's configuration.
    assert API_PASSWORD not in files["kibana.yml"]


def test_secrets_stay_out_of_the_other_files(tmp_path: Path) -> None:
    """kibana.yml (root:kibana 0640, no_log) is the only rendered file that holds secrets."""
    overrides = VARS | {
        "kibana_elasticsearch_username": "kibana_system",
        "kibana_elasticsearch_password": ES_PASSWORD,
    }
    for name, text in _render(tmp_path, overrides).items():
        if name == "kibana.yml":
            assert ES_PASSWORD in text
            continue
        for secret in SECRETS:
            assert secret not in text, f"a secret is in {name}"
    tasks = (ROLE / "tasks" / "config.yml").read_text()
    kibana_yml_task = yaml.safe_load(tasks)[0]
    assert kibana_yml_task["ansible.builtin.template"]["mode"] == "0640"
    assert kibana_yml_task["no_log"] is True and kibana_yml_task["diff"] is False


def test_token_from_the_first_elasticsearch_host_that_published_one(tmp_path: Path) -> None:
    # es-1 was not in the Elasticsearch play (e.g. --limit): es-2's fact is used.
    cfg = yaml.safe_load(_render(tmp_path, VARS, published={"es2": TOKEN_ES2})["kibana.yml"])
    assert cfg["elasticsearch.serviceAccountToken"] == TOKEN_ES2


def test_operator_token_wins_over_the_published_one(tmp_path: Path) -> None:
    overrides = VARS | {"kibana_elasticsearch_service_account_token": "operator-token-from-vault"}
    cfg = yaml.safe_load(_render(tmp_path, overrides)["kibana.yml"])
    assert cfg["elasticsearch.serviceAccountToken"] == "operator-token-from-vault"


def test_username_instead_of_the_token(tmp_path: Path) -> None:
    overrides = VARS | {
        "kibana_elasticsearch_username": "kibana_system",
        "kibana_elasticsearch_password": ES_PASSWORD,
    }
    cfg = yaml.safe_load(_render(tmp_path, overrides)["kibana.yml"])
    assert cfg["elasticsearch.username"] == "kibana_system"
    assert cfg["elasticsearch.password"] == ES_PASSWORD
    assert "elasticsearch.serviceAccountToken" not in cfg


def test_server_ssl_off_and_operator_tls_files(tmp_path: Path) -> None:
    overrides = VARS | {
        "kibana_server_ssl_enabled": False,
        "kibana_pki_enabled": False,
        "kibana_elasticsearch_ca_path": "/etc/ssl/corp/ca.pem",
        "kibana_elasticsearch_ssl_verification_mode": "certificate",
    }
    cfg = yaml.safe_load(_render(tmp_path, overrides)["kibana.yml"])
    assert not [k for k in cfg if k.startswith("server.ssl")]
    assert cfg["elasticsearch.ssl.certificateAuthorities"] == ["/etc/ssl/corp/ca.pem"]
    assert cfg["elasticsearch.ssl.verificationMode"] == "certificate"
    second = tmp_path / "operator-cert"
    second.mkdir()
    overrides = VARS | {
        "kibana_pki_enabled": False,
        "kibana_server_ssl_certificate_path": "/etc/ssl/corp/kibana.pem",
        "kibana_server_ssl_key_path": "/etc/ssl/corp/kibana.key",
    }
    cfg = yaml.safe_load(_render(second, overrides)["kibana.yml"])
    assert cfg["server.ssl.certificate"] == "/etc/ssl/corp/kibana.pem"
    assert cfg["server.ssl.key"] == "/etc/ssl/corp/kibana.key"
    # Without roles/pki and without a CA path: Node.js's trust store, verification still full.
    assert "elasticsearch.ssl.certificateAuthorities" not in cfg
    assert cfg["elasticsearch.ssl.verificationMode"] == "full"


def test_kibana_yml_explicit_plain_http_hosts(tmp_path: Path) -> None:
    """Only an explicit http:// list (Elasticsearch's HTTP TLS switched off on purpose) drops the
    TLS client settings; the credentials stay."""
    overrides = VARS | {
        "kibana_elasticsearch_hosts": ["http://127.0.0.1:9200"],
        "kibana_server_public_base_url": "",
    }
    cfg = yaml.safe_load(_render(tmp_path, overrides)["kibana.yml"])
    assert cfg["elasticsearch.hosts"] == ["http://127.0.0.1:9200"]
    assert cfg["elasticsearch.serviceAccountToken"] == TOKEN_ES1
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


def _validate(
    tmp: Path, overrides: dict, published: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The role's argument spec (ansible's validate_argument_spec), then its assert tasks."""
    spec = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())["argument_specs"][
        "main"
    ]
    # Every default is checked against the spec too, not only the overrides.
    given = set(yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())) | set(overrides)
    play = {
        "name": "Validate kibana role variables",
        "hosts": "kibana",
        "gather_facts": False,
        "vars_files": ROLE_VARS_FILES,
        "tasks": [
            {
                "name": "Argument spec",
                "ansible.builtin.validate_argument_spec": {
                    "argument_spec": spec["options"],
                    "provided_arguments": {k: f"{{{{ {k} }}}}" for k in sorted(given)},
                },
            },
            {
                "name": "Role asserts",
                "ansible.builtin.include_tasks": str(ROLE / "tasks" / "assert.yml"),
            },
        ],
    }
    return _playbook(tmp, [play], overrides, published)


def _assert_secrets_not_printed(proc: subprocess.CompletedProcess[str]) -> None:
    for secret in SECRETS:
        assert secret not in proc.stdout + proc.stderr, "a secret was printed"


def test_valid_variables_pass(tmp_path: Path) -> None:
    proc = _validate(tmp_path, VARS)
    assert proc.returncode == 0, proc.stdout[-3000:]
    _assert_secrets_not_printed(proc)


def test_no_token_anywhere_fails_with_a_clear_message(tmp_path: Path) -> None:
    """No operator token, no username, and no Elasticsearch host published a token."""
    proc = _validate(tmp_path, VARS, published={})
    assert proc.returncode != 0
    out = " ".join(proc.stdout.split())  # fail_msg is folded over lines
    assert "Kibana has no credentials for Elasticsearch" in out, proc.stdout[-3000:]
    assert "group 'elasticsearch' has the fact elasticsearch_kibana_service_token" in out
    assert "set kibana_elasticsearch_service_account_token from Vault" in out
    _assert_secrets_not_printed(proc)


def test_published_token_satisfies_the_credentials_check(tmp_path: Path) -> None:
    proc = _validate(tmp_path, VARS, published={"es2": TOKEN_ES2})
    assert proc.returncode == 0, proc.stdout[-3000:]
    _assert_secrets_not_printed(proc)


def test_username_without_password_is_rejected(tmp_path: Path) -> None:
    proc = _validate(tmp_path, VARS | {"kibana_elasticsearch_username": "kibana_system"}, {})
    assert proc.returncode != 0
    assert "Kibana has no credentials for Elasticsearch" in " ".join(proc.stdout.split())


def test_token_and_username_together_are_rejected_without_printing_the_token(
    tmp_path: Path,
) -> None:
    overrides = VARS | {
        "kibana_elasticsearch_service_account_token": TOKEN_ES2,
        "kibana_elasticsearch_username": "kibana_system",
        "kibana_elasticsearch_password": ES_PASSWORD,
    }
    proc = _validate(tmp_path, overrides)
    assert proc.returncode != 0
    assert "a service account token OR a username" in " ".join(proc.stdout.split())
    _assert_secrets_not_printed(proc)


def test_api_calls_need_a_password(tmp_path: Path) -> None:
    proc = _validate(tmp_path, VARS | {"kibana_api_password": ""})
    assert proc.returncode != 0
    assert "kibana_api_username and kibana_api_password are required" in " ".join(
        proc.stdout.split()
    )


def test_server_ssl_without_tls_files_is_rejected(tmp_path: Path) -> None:
    proc = _validate(tmp_path, VARS | {"kibana_pki_enabled": False})
    assert proc.returncode != 0
    assert "kibana_server_ssl_enabled needs a certificate and a key" in " ".join(
        proc.stdout.split()
    )
    second = tmp_path / "ssl-off"
    second.mkdir()
    proc = _validate(
        second, VARS | {"kibana_pki_enabled": False, "kibana_server_ssl_enabled": False}
    )
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_short_encryption_key_is_rejected(tmp_path: Path) -> None:
    proc = _validate(tmp_path, VARS | {"kibana_security_key": "too-short"})
    assert proc.returncode != 0
    assert "Check the encryption keys" in proc.stdout  # the failing task; its message is no_log
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


def test_saved_objects_need_kibana_8_9_and_plain_ids(tmp_path: Path) -> None:
    """The Lens objects claim migration version 8.9.0, which an older Kibana refuses."""
    proc = _validate(tmp_path, VARS | {"kibana_version": "8.8.2"})
    assert proc.returncode != 0
    assert "they need Kibana 8.9 or later" in " ".join(proc.stdout.split())
    for n, bad in enumerate(({"kibana_saved_objects_id_prefix": "Logpipe"},
                             {"kibana_saved_objects_space": "Ops Team"},
                             {"kibana_saved_objects_index": "web-logs-*"})):
        run = tmp_path / f"bad-{n}"
        run.mkdir()
        proc = _validate(run, VARS | bad)
        assert proc.returncode != 0, bad
        assert "Invalid saved objects settings" in " ".join(proc.stdout.split())
    off = tmp_path / "off"
    off.mkdir()
    proc = _validate(off, VARS | {"kibana_version": "8.8.2", "kibana_saved_objects_enabled": False})
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_elastic_superuser_is_rejected(tmp_path: Path) -> None:
    overrides = VARS | {
        "kibana_elasticsearch_username": "elastic",
        "kibana_elasticsearch_password": ES_PASSWORD,
    }
    proc = _validate(tmp_path, overrides)
    assert proc.returncode != 0
    assert "never `elastic`" in " ".join(proc.stdout.split())
    _assert_secrets_not_printed(proc)


def test_missing_encryption_key_fails_argument_spec(tmp_path: Path) -> None:
    overrides = {k: v for k, v in VARS.items() if k != "kibana_reporting_key"}
    proc = _validate(tmp_path, overrides | {"kibana_reporting_key": None})
    assert proc.returncode != 0


def _tls_files(certs: Path) -> None:
    """A CA (certs/ca.crt) and a certificate for 127.0.0.1 signed by it (server.crt/.key)."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test deployment CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kibana")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    certs.mkdir()
    (certs / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (certs / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (certs / "server.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


class _FakeKibana:
    """Kibana's status and data view API over HTTPS, answering 401 to anything without the
    right basic-auth credentials, and recording every request."""

    def __init__(self, certs: Path, username: str, password: str) -> None:
        expected = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
        self.requests: list[tuple[str, str, bool]] = []
        self.views: list[dict[str, Any]] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                ok = self.headers.get("Authorization") == expected
                fake.requests.append((self.command, self.path, ok))
                if not ok:
                    self._reply(401, {"statusCode": 401, "error": "Unauthorized"})
                return ok

            def do_GET(self) -> None:
                if not self._authorized():
                    return
                if self.path == "/api/status":
                    self._reply(
                        200,
                        {
                            "version": {"number": KIBANA_VERSION},
                            "status": {"overall": {"level": "available", "summary": "ok"}},
                        },
                    )
                elif self.path == "/api/data_views":
                    self._reply(200, {"data_view": fake.views})
                else:
                    self._reply(404, {})

            def do_POST(self) -> None:
                if not self._authorized():
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/api/data_views/data_view" or self.headers.get("kbn-xsrf") is None:
                    self._reply(400, {})
                    return
                view = body["data_view"] | {"id": f"view-{len(fake.views)}"}
                fake.views.append(view)
                self._reply(200, {"data_view": view})

        self._https = HttpsServer(Handler, certs / "server.crt", certs / "server.key")
        self.port = self._https.port

    def close(self) -> None:
        self._https.close()


def test_status_and_data_views_use_https_with_the_ca_and_basic_auth(tmp_path: Path) -> None:
    """tasks/status.yml and tasks/data-views.yml against an HTTPS fake of Kibana's API whose
    certificate only the test CA (in kibana_cert_dir, where roles/pki puts it) vouches for: every
    call authenticates, a second run creates nothing, a wrong password stops with a message."""
    certs = tmp_path / "certs"
    _tls_files(certs)
    fake = _FakeKibana(certs, "elastic", API_PASSWORD)
    play = {
        "name": "The kibana role's API tasks",
        "hosts": "kibana",
        "gather_facts": False,
        "vars_files": ROLE_VARS_FILES,
        "tasks": [
            {"name": "Status", "ansible.builtin.include_tasks": str(ROLE / "tasks" / "status.yml")},
            {
                "name": "Data views",
                "ansible.builtin.include_tasks": str(ROLE / "tasks" / "data-views.yml"),
            },
        ],
    }
    overrides = VARS | {
        "kibana_server_port": fake.port,
        "kibana_cert_dir": str(certs),
        "kibana_status_timeout": 10,
        "kibana_data_views": [
            {"title": "web-logs-topic*", "time_field": "indexed_at", "name": "web-logs"}
        ],
    }
    try:
        first = _playbook(tmp_path, [play], overrides)
        assert first.returncode == 0, first.stdout[-3000:]
        assert [v["title"] for v in fake.views] == ["web-logs-topic*"]
        assert fake.views[0]["timeFieldName"] == "indexed_at"
        assert fake.views[0]["name"] == "web-logs"
        second = _playbook(tmp_path, [play], overrides)
        assert second.returncode == 0, second.stdout[-3000:]
        assert re.search(r"localhost\s+:.*changed=0", second.stdout.split("PLAY RECAP")[-1])
        assert len(fake.views) == 1
        # Every call so far carried the credentials: none was anonymous.
        assert fake.requests and all(ok for _, _, ok in fake.requests), fake.requests
        assert ("POST", "/api/data_views/data_view", True) in fake.requests
        wrong = _playbook(tmp_path, [play], overrides | {"kibana_api_password": "wrong-one"})
        assert wrong.returncode != 0
        out = " ".join(wrong.stdout.split())
        assert "Kibana refused kibana_api_username 'elastic' (HTTP 401)" in out, out[-3000:]
        assert "wrong-one" not in wrong.stdout
        for proc in (first, second, wrong):
            _assert_secrets_not_printed(proc)
    finally:
        fake.close()


def test_certs_come_from_pki_and_a_change_restarts_kibana(tmp_path: Path) -> None:
    """tasks/certs.yml for real on localhost, into a temporary kibana_cert_dir: roles/pki makes the
    CA (on the controller, under the inventory directory) and this host's key and certificate;
    the first run notifies `kibana restart`, a second run changes nothing and notifies nothing;
    one more SAN re-issues the certificate and notifies again."""
    certs = tmp_path / "certs"
    play = {
        "name": "The kibana role's certificate tasks",
        "hosts": "kibana",
        "gather_facts": False,
        "vars_files": ROLE_VARS_FILES,
        "tasks": [
            {"name": "Certs", "ansible.builtin.include_tasks": str(ROLE / "tasks" / "certs.yml")}
        ],
        "handlers": [
            {
                "name": "Stand-in for the restart handler",
                "ansible.builtin.debug": {"msg": "KIBANA RESTART NOTIFIED"},
                "listen": "kibana restart",
            }
        ],
    }
    overrides = VARS | {
        "kibana_cert_dir": str(certs),
        "kibana_group": "root",
        "pki_host_packages": [],  # python cryptography is in the test's interpreter already
        "pki_ca_key_type": "ECC",  # quicker than RSA on a busy machine
        "pki_key_type": "ECC",
    }
    first = _playbook(tmp_path, [play], overrides)
    assert first.returncode == 0, first.stdout[-3000:]
    assert "KIBANA RESTART NOTIFIED" in first.stdout
    assert {p.name for p in certs.iterdir()} == {"ca.crt", "kibana.crt", "kibana.key"}
    assert (certs / "kibana.key").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / ".pki" / "ca.crt").read_text() == (certs / "ca.crt").read_text()
    assert not (tmp_path / ".pki" / "kibana.key").exists()
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(certs / "ca.crt"), str(certs / "kibana.crt")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    text = subprocess.run(
        ["openssl", "x509", "-noout", "-text", "-in", str(certs / "kibana.crt")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for san in ("IP Address:127.0.0.1", "DNS:localhost", "DNS:kibana.example.test"):
        assert san in text, san
    second = _playbook(tmp_path, [play], overrides)
    assert second.returncode == 0, second.stdout[-3000:]
    assert "KIBANA RESTART NOTIFIED" not in second.stdout
    assert re.search(r"localhost\s+:.*changed=0", second.stdout.split("PLAY RECAP")[-1])
    third = _playbook(tmp_path, [play], overrides | {"kibana_pki_extra_sans": ["kibana.internal"]})
    assert third.returncode == 0, third.stdout[-3000:]
    assert "KIBANA RESTART NOTIFIED" in third.stdout


KIBANA_ARCHIVE = os.environ.get("LOGPIPE_KIBANA_ARCHIVE", "")
SKIP_REASON = (
    "Kibana artifacts cannot be downloaded on this machine: no Elastic APT repo or artifact host "
    "reachable; converge/verify of roles/kibana not run (set LOGPIPE_KIBANA_ARCHIVE to a Kibana "
    "linux-x86_64 tar.gz to run it)"
)


# The converge also relies on roles/elasticsearch publishing the elastic/kibana token (issue 9
# item 3); without that it cannot pass, and the skip says so as well.
ES_PUBLISHES_TOKEN = "elasticsearch_kibana_service_token" in "".join(
    p.read_text() for p in (TOP / "roles" / "elasticsearch" / "tasks").glob("*.yml")
)
CONVERGE_SKIP = "; ".join(
    reason
    for missing, reason in (
        (not KIBANA_ARCHIVE, SKIP_REASON),
        (
            not ES_PUBLISHES_TOKEN,
            "roles/elasticsearch here does not publish elasticsearch_kibana_service_token",
        ),
    )
    if missing
)


@pytest.mark.molecule
@pytest.mark.skipif(bool(CONVERGE_SKIP), reason=CONVERGE_SKIP)
def test_converge_kibana_for_real(tmp_path: Path) -> None:
    """Converge roles/elasticsearch (integ-test zip, one node, security on) and roles/kibana (the
    given tarball) in one systemd container with the role defaults for TLS and credentials: HTTPS
    to Elasticsearch with the pki CA and the published token, server.ssl, authenticated API calls,
    logpipe's saved objects imported (and not again on the second run). Never run on the
    project's machines (no Kibana artifact there)."""
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
    plays: list[dict[str, Any]] = [
        {
            "name": "Create a systemd container",
            "hosts": "localhost",
            "gather_facts": False,
            "tasks": [
                {"name": "Network", "community.docker.docker_network": {"name": network}},
                {
                    # Run the way every Molecule scenario and the lab run a systemd host.
                    "name": "Container",
                    "ansible.builtin.include_tasks": str(SYSTEMD_CONTAINERS),
                    "vars": {
                        "systemd_containers": [
                            {
                                "name": name,
                                "image": "logpipe-base:bookworm",
                                "networks": [{"name": network}],
                            }
                        ]
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
                "elasticsearch_network_host": ["_local_", "_site_"],
                "elasticsearch_bootstrap_password": API_PASSWORD,
                "elasticsearch_heap_size": "512m",
                "elasticsearch_discovery_type": "single-node",
                "kibana_install_method": "archive",
                "kibana_archive_src": str(archive),
                "kibana_version": version,
                "kibana_api_password": API_PASSWORD,
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
        {
            "name": "Kibana refuses anonymous calls and serves HTTPS with the deployment CA",
            "hosts": name,
            "gather_facts": False,
            "tasks": [
                {
                    "name": "Anonymous status call",
                    "ansible.builtin.uri": {
                        "url": "https://127.0.0.1:5601/api/status",
                        "ca_path": "/etc/kibana/certs/ca.crt",
                        "status_code": 401,
                    },
                },
                {
                    "name": "The dashboard and its visualizations are there",
                    "ansible.builtin.uri": {
                        "url": "https://127.0.0.1:5601/api/saved_objects/_export",
                        "method": "POST",
                        "headers": {"kbn-xsrf": "true"},
                        "body_format": "json",
                        "body": {
                            "objects": [
                                {"type": "dashboard", "id": "logpipe-web-logs-dashboard"}
                            ],
                            "includeReferencesDeep": True,
                        },
                        "url_username": "elastic",
                        "url_password": API_PASSWORD,
                        "force_basic_auth": True,
                        "ca_path": "/etc/kibana/certs/ca.crt",
                        "return_content": True,
                    },
                    "register": "exported",
                    "failed_when": (
                        "exported.content.splitlines() | map('from_json')"
                        " | selectattr('type', 'defined') | selectattr('type', '==', 'lens')"
                        " | list | length != 4"
                    ),
                },
                {
                    "name": "Plain HTTP on the Kibana port",
                    "ansible.builtin.uri": {"url": "http://127.0.0.1:5601/api/status"},
                    "register": "plain",
                    "failed_when": "plain.status | default(-1) in [200, 401]",
                },
            ],
        },
    ]
    # Only the container is in the `elasticsearch` group: its role publishes the token Kibana uses.
    inventory = f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}\n"
    try:
        proc = _playbook(tmp_path, plays, inventory=inventory)
        assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
        # Idempotence: the second run changes nothing on the host.
        second = _playbook(tmp_path, plays, inventory=inventory)
        assert second.returncode == 0, second.stdout[-5000:]
        recap = second.stdout.split("PLAY RECAP")[-1]
        assert re.search(rf"{name}\s+:.*changed=0", recap), recap
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
        subprocess.run(["docker", "network", "rm", network], capture_output=True, check=False)
