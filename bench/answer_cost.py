"""``python -m bench.answer_cost``: does the size of the bulk answer slow Elasticsearch down?

The raw ceiling asks for ``filter_path=errors``; the consumer asks for each item's ``_index``,
``_id``, ``status`` and ``error`` (``logpipe.sender.BULK_FILTER_PATH``). This posts the same
pre-built bodies both ways, alternating, on one fresh harness node, and prints docs/s and the
node's CPU per run (docs/BENCHMARKS.md, "Reading the recorded run"). About 3 minutes.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from bench import core, measure
from bench.core import BenchPipeline, log, new_name
from logpipe.producer import produce
from logpipe.sender import BULK_FILTER_PATH


def main(rounds: int = 3, docs: int = 40_000) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="bench-", dir=core.REPO / ".cache"))
    with core.servers(brokers=1) as (kafka, es):
        pipe = BenchPipeline(kafka, es, workdir, "bench", partitions=6)
        pipe.write_config(elasticsearch={"shards": 2, "replicas": 0, "refresh_interval": "1s"})
        cfg = pipe.config()
        topic = new_name("bench-answer")
        measure.ensure_topic(cfg, topic)
        produce(cfg.replace("kafka", topic=topic, dlq_topic=f"{topic}.dlq"), docs, seed=11)
        messages = measure.read_messages(kafka.bootstrap_servers, topic)
        es_pgid = es._proc.pid if es._proc is not None else None
        warm = new_name("bench-warm")
        measure.ensure_index_template(cfg, warm)
        measure.bulk_ceiling(es.http_port, measure.build_bodies(messages[:20_000], warm, 500, 1),
                             es_pgid)
        for n in range(1, rounds + 1):
            for name, path in (("errors only", "errors"), ("the consumer's", BULK_FILTER_PATH)):
                index = new_name("bench-answer")
                measure.ensure_index_template(cfg, index)
                fig = measure.bulk_ceiling(
                    es.http_port, measure.build_bodies(messages, index, 500, 1), es_pgid,
                    filter_path=path)
                log(f"round {n}, answer {name}: {fig.docs / fig.seconds:,.0f} docs/s, "
                    f"Elasticsearch CPU {fig.es_cpu_s:.2f} s, {fig.errors} error(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
