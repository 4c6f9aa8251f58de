"""The rsyslog peer of the benchmark (bench/peer.py): its configuration is complete and accepted
by rsyslogd, its rate and its results.json keys are computed as documented."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from bench import peer


@pytest.mark.skipif(shutil.which("rsyslogd") is None and not Path("/usr/sbin/rsyslogd").exists(),
                    reason="rsyslog not installed (scripts/install-host-packages.sh)")
def test_the_config_template_renders_to_a_config_rsyslogd_accepts(tmp_path: Path) -> None:
    conf = peer.render_config(tmp_path / "run", topic="t", broker="127.0.0.1:9092", group="g",
                              index_prefix="bench-x", es_port=9200)
    text = conf.read_text()
    # The settings the comparison's fairness rests on (docs/BENCHMARKS.md "Peer: rsyslog").
    for setting in ('queue.dequeueBatchSize="500"', 'queue.workerThreads="1"',
                    'writeoperation="create"', 'bulkid="logpipe_id" dynbulkid="on"',
                    'bulkmode="on"', 'esVersion.major="8"', '"auto.offset.reset=earliest"',
                    'consumergroup="g"', 'constant(value="bench-x-")', 'serverport="9200"',
                    f'workDirectory="{(tmp_path / "run").resolve()}"'):
        assert setting in text, setting
    assert "@" not in "".join(line.split("#", 1)[0] for line in text.splitlines())


def test_a_placeholder_left_unfilled_is_refused(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    template = tmp_path / "rsyslog.conf.template"
    template.write_text(peer.TEMPLATE.read_text() + 'input(type="imkafka" topic="@OTHER@")\n')
    monkeypatch.setattr(peer, "TEMPLATE", template)
    with pytest.raises(ValueError, match="placeholder"):
        peer.render_config(tmp_path / "run", topic="t", broker="b", group="g",
                           index_prefix="x", es_port=1)


def test_steady_rate_runs_from_the_first_documents_to_the_last() -> None:
    samples = [(0.0, 0), (1.0, 0), (2.0, 500), (3.0, 10_500), (4.0, 20_000), (5.0, 20_000)]
    assert peer.steady_rate(samples, 20_000) == pytest.approx(19_500 / 2.0)
    assert math.isnan(peer.steady_rate(samples, 30_000))
    assert math.isnan(peer.steady_rate([(0.0, 0)], 1))


def test_results_keys() -> None:
    figures = {"rsyslog_docs_per_s": 21616.46, "consumer_docs_per_s": 17793.01,
               "consumer_vs_rsyslog": 0.82612, "backlog": 100_000,
               "kills": [{"sink": "rsyslog", "lost": 34501, "duplicated": 0},
                         {"sink": "logpipe", "lost": 0, "duplicated": 0}]}
    assert peer.flat(figures) == {
        "rsyslog_docs_per_s": 21616.5, "peer_consumer_docs_per_s": 17793.0,
        "consumer_vs_rsyslog": 0.826, "peer_backlog_docs": 100_000,
        "rsyslog_lost": 34501, "rsyslog_duplicated": 0,
        "consumer_lost": 0, "consumer_duplicated": 0}
