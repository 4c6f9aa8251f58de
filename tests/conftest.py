"""Shared fixtures. The real servers start lazily: only a test that asks for ``kafka`` or
``elasticsearch`` (directly or through ``pipeline``) starts them, so ``pytest tests/unit`` starts
nothing. Tests under tests/integration/ get the ``integration`` marker automatically.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness.pipeline import FIGURES_FILE, Pipeline
from harness.servers import ElasticsearchNode, KafkaCluster, SecureServers, start_servers

_INTEGRATION_DIR = Path(__file__).parent / "integration"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: long-running integration test (tens of seconds or more)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _INTEGRATION_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FIGURES_FILE.exists():
        return
    lines = FIGURES_FILE.read_text().splitlines()
    if not lines:
        return
    terminalreporter.section("integration figures")
    for line in lines:
        fig = json.loads(line)
        test = fig.pop("test")
        terminalreporter.write_line(f"{test}: " + ", ".join(f"{k}={v}" for k, v in fig.items()))
    FIGURES_FILE.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def kafka() -> Iterator[KafkaCluster]:
    """One-broker KRaft cluster on a free loopback port, shared by the whole session."""
    cluster = KafkaCluster(brokers=1)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="session")
def elasticsearch() -> Iterator[ElasticsearchNode]:
    """Single-node Elasticsearch on a free loopback port, shared by the whole session."""
    node = ElasticsearchNode()
    try:
        yield node
    finally:
        node.close()


@pytest.fixture(scope="session")
def secure_servers() -> Iterator[SecureServers]:
    """Kafka (SASL_SSL, SCRAM, ACLs) and Elasticsearch (TLS, users, roles) with security on,
    started in parallel (both take a while), shared by the session. Separate from the
    plaintext ``kafka``/``elasticsearch`` fixtures, which the rest of the suite uses."""
    with start_servers(secure=True) as (kafka, es):
        yield SecureServers(kafka, es)


@pytest.fixture
def pipeline(request: pytest.FixtureRequest, kafka: KafkaCluster,
             elasticsearch: ElasticsearchNode, tmp_path: Path) -> Iterator[Pipeline]:
    """This test's own topic, DLQ topic, group id and index prefix on the shared servers, with
    a config file (``pipeline.config_path``) and the CLI (``pipeline.cli(...)``)."""
    p = Pipeline(kafka, elasticsearch, tmp_path / "pipeline", request.node.name)
    yield p
    if p._es is not None:
        p._es.close()


@pytest.fixture
def make_pipeline(request: pytest.FixtureRequest, tmp_path: Path
                  ) -> Iterator[Callable[..., Pipeline]]:
    """Factory for a ``Pipeline`` on servers of the test's own choosing (e.g. an Elasticsearch
    with a tiny write queue): ``make_pipeline(kafka, es, name=...)``."""
    made: list[Pipeline] = []

    def make(kafka: KafkaCluster, es: ElasticsearchNode, name: str | None = None) -> Pipeline:
        p = Pipeline(kafka, es, tmp_path / f"pipeline{len(made)}", name or request.node.name)
        made.append(p)
        return p

    yield make
    for p in made:
        if p._es is not None:
            p._es.close()
