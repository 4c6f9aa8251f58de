"""The server versions are pinned in one place: pyproject.toml's [tool.logpipe.versions].

scripts/versions.sh (the fetch scripts, the lab), the test harness and `make bench` read it. The
roles carry the same values as defaults, since a role must work without this checkout; Molecule
reads the roles' variables. These tests fail when a role default differs, when any other file
writes a pinned version down, or when the Elasticsearch client's major differs from the server's.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import elasticsearch
import pytest
import yaml

TOP = Path(__file__).resolve().parents[2]
PYPROJECT = TOP / "pyproject.toml"
VERSIONS: dict[str, str] = tomllib.loads(PYPROJECT.read_text())["tool"]["logpipe"]["versions"]

# Files that may write a pinned version down, and why.
ALLOWED = {
    "pyproject.toml": "the one place",
    "README.md": "the versions table (test_readme_table_shows_the_pinned_versions)",
    # A role works without the checkout, so its defaults carry the values (test below); the specs
    # and README tables repeat the defaults (tests/unit/test_role_facts.py).
    **{f"roles/{role}/{name}": "the role's default"
       for role in ("kafka", "elasticsearch", "kibana")
       for name in ("defaults/main.yml", "meta/argument_specs.yml", "README.md")},
    # Records of what a benchmark run measured, written by `make bench` from pyproject.toml.
    "docs/BENCHMARKS.md": "a measurement record",
    "bench/results.json": "a measurement record",
    "bench/security.json": "a measurement record (python -m bench --security-only)",
}


def _defaults(role: str) -> dict[str, object]:
    data: dict[str, object] = yaml.safe_load((TOP / "roles" / role / "defaults" / "main.yml")
                                             .read_text())
    return data


def test_client_major_matches_server_major() -> None:
    """The Elasticsearch client major must equal the server major pinned for the tests."""
    pinned = VERSIONS["elasticsearch"]
    server_major = int(pinned.split(".")[0])
    client_major = int(elasticsearch.__versionstr__.split(".")[0])
    assert client_major == server_major, (
        f"elasticsearch client {elasticsearch.__versionstr__} vs server {pinned}: "
        f"a client of another major sends incompatible headers")


def test_role_defaults_are_the_pinned_versions() -> None:
    assert _defaults("kafka")["kafka_version"] == VERSIONS["kafka"]
    assert _defaults("kafka")["kafka_scala_version"] == VERSIONS["kafka_scala"]
    assert _defaults("elasticsearch")["elasticsearch_version"] == VERSIONS["elasticsearch"]
    # Kibana must run the Elasticsearch version.
    assert _defaults("kibana")["kibana_version"] == VERSIONS["elasticsearch"]


def test_readme_table_shows_the_pinned_versions() -> None:
    readme = (TOP / "README.md").read_text()
    assert re.search(rf"^\| Apache Kafka \| {re.escape(VERSIONS['kafka'])} ", readme, re.M)
    assert re.search(rf"^\| Elasticsearch \| {re.escape(VERSIONS['elasticsearch'])} ", readme, re.M)


def test_no_other_file_writes_a_pinned_version() -> None:
    if shutil.which("git") is None or not (TOP / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(["git", "-C", str(TOP), "ls-files", "-z"], capture_output=True,
                            check=True).stdout.decode().split("\0")
    pinned = [re.escape(VERSIONS[k]) for k in ("kafka", "elasticsearch")]
    # A full version on its own (not inside a longer one), or Kafka's artifact name.
    pattern = re.compile(r"(?<![\d.])(?:{})(?![\d])|kafka_{}-".format(
        "|".join(pinned), re.escape(VERSIONS["kafka_scala"])))
    found = []
    for name in filter(None, listed):
        path = TOP / name
        if name in ALLOWED or not path.is_file() or path.is_symlink():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        found += [f"{name}:{n}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1)
                  if pattern.search(line)]
    assert not found, (
        "pinned versions are written in pyproject.toml ([tool.logpipe.versions]) and the roles'"
        " defaults only; read them from there:\n" + "\n".join(found))
