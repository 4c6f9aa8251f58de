"""The Elasticsearch client major must equal the server major pinned for the tests."""

from __future__ import annotations

import tomllib
from pathlib import Path

import elasticsearch

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_client_major_matches_server_major() -> None:
    pinned = tomllib.loads(PYPROJECT.read_text())["tool"]["logpipe"]["versions"]["elasticsearch"]
    server_major = int(pinned.split(".")[0])
    client_major = int(elasticsearch.__versionstr__.split(".")[0])
    assert client_major == server_major, (
        f"elasticsearch client {elasticsearch.__versionstr__} vs server {pinned}: "
        f"a client of another major sends incompatible headers")
