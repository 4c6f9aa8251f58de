"""The scaling line: 1, 2, 4 ``logpipe consume`` processes (one host, one group) draining the
same backlog, each against the raw ``_bulk`` ceiling with as many requests in flight.

Per row: ceiling, consumers, ceiling; the consumers' rate is divided by the mean of the two
ceilings around it (the machine's load drifts), as in the main consumer comparison.

- The backlog is the same documents for every row and its ceilings, on a topic of its own with
  12 partitions (a multiple of 1, 2 and 4: on the default 6, four consumers would own 2/2/1/1
  and the two with one partition would idle through the second half of the run).
- The consumers start on that topic while it is empty; once the group is stable with every
  process a member and all partitions assigned, the backlog is written (pre-built messages,
  the package's producer settings), and the rate runs from the end of that write to the last
  commit. So process start-up, the group join and its rebalances, and the producer's CPU are
  not in it (``measure.run_consumer`` with ``fill``).
- The ceiling with N x ``pipeline_depth`` in flight is that many persistent connections, each
  posting the next pre-built 500-document body as soon as its previous one is answered: what N
  independent consumers, each with every batch in hand in flight, could at best do
  (``measure.bulk_ceiling_streams``).
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench import measure
from bench.core import BenchPipeline, log, new_name

PARTITIONS = 12
COUNTS = (1, 2, 4)


@dataclass
class ScalingRow:
    consumers: int
    inflight: int  # requests in flight of the ceiling: pipeline_depth per consumer
    consumer_docs_per_s: float
    ceiling_docs_per_s: float  # mean of the runs before and after
    ratio: float
    ceiling_runs: list[float] = field(default_factory=list)
    consumer_own_docs_per_s: float = 0.0  # from the batch_committed lines, start-up included
    hwm_mib: float = 0.0  # the largest process's
    cpu_s: float = 0.0  # all processes
    docs: int = 0


def row(consumers: int, consumer_docs_per_s: float, ceilings: Sequence[float],
        inflight: int | None = None, **details: Any) -> ScalingRow:
    ceiling = statistics.fmean(ceilings)
    return ScalingRow(consumers, inflight or consumers, consumer_docs_per_s, ceiling,
                      consumer_docs_per_s / ceiling if ceiling > 0 else float("nan"),
                      list(ceilings), **details)


def run(pipe: BenchPipeline, cfg: Any, messages: Sequence[tuple[bytes, bytes]],
        es_pgid: int | None, *, batch_size: int, counts: Sequence[int] = COUNTS,
        ) -> list[ScalingRow]:
    port = pipe.es_node.http_port
    rows: list[ScalingRow] = []

    def ceiling(inflight: int) -> float:
        index = new_name("bench-scale-ceil")
        measure.ensure_index_template(cfg, index)
        bf = measure.consumer_ceiling(port, messages, index, batch_size=batch_size,
                                      concurrency=1, inflight=inflight, es_pgid=es_pgid)
        if bf.errors:
            raise RuntimeError(f"scaling ceiling ({inflight} in flight): {bf.errors} errors")
        return bf.docs_per_s

    depth = cfg.consumer.pipeline_depth
    for n in counts:
        topic = new_name("bench-scale")
        measure.ensure_topic(cfg, topic, partitions=PARTITIONS)
        tcfg = cfg.replace("kafka", topic=topic, dlq_topic=f"{topic}.dlq")
        before = ceiling(n * depth)
        index = new_name("bench-scale")
        measure.ensure_index_template(cfg, index)
        cf = measure.run_consumer(
            pipe, group=new_name("bench-scale"), index=index, expected=len(messages),
            es_pgid=es_pgid, topic=topic, processes=n, partitions=PARTITIONS,
            fill=functools.partial(_fill, tcfg, messages), batch_size=batch_size,
            bulk_concurrency=1)
        after = ceiling(n * depth)
        r = row(n, cf.window_docs_per_s or float("nan"), [before, after], n * depth,
                consumer_own_docs_per_s=cf.steady_docs_per_s, hwm_mib=cf.hwm_mib,
                cpu_s=cf.cpu_s, docs=cf.docs)
        log(f"scaling: {n} consumer(s) {r.consumer_docs_per_s:,.0f} docs/s, ceiling with "
            f"{n * depth} "
            f"in flight {before:,.0f}/{after:,.0f}, ratio {r.ratio:.2f}, "
            f"VmHWM {r.hwm_mib:.0f} MiB")
        rows.append(r)
    return rows


def _fill(cfg: Any, messages: Sequence[tuple[bytes, bytes]]) -> None:
    rate = measure.produce_prebuilt(cfg, messages)
    log(f"scaling: backlog of {len(messages):,} written ({rate:,.0f} msgs/s)")


# ---------------------------------------------------------------------------------------------
# reporting


def flat(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``scaling`` key of bench/results.json: one row per consumer count."""
    return [{"consumers": r["consumers"], "inflight": r["inflight"],
             "consumer_docs_per_s": _r(r["consumer_docs_per_s"], 1),
             "ceiling_docs_per_s": _r(r["ceiling_docs_per_s"], 1), "ratio": _r(r["ratio"], 3),
             "hwm_mib": _r(r["hwm_mib"], 1)} for r in rows]


def _r(x: float, nd: int) -> float | None:
    return None if x != x else round(x, nd)  # NaN -> null (JSON has no NaN)


def lines(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str, str, str, str]]:
    """(consumers, docs/s, ceiling, ratio, detail) per row, for the table and the markdown."""
    out = []
    for r in rows:
        runs = " / ".join(f"{c:,.0f}" for c in r.get("ceiling_runs", []))
        out.append((str(r["consumers"]), _num(r["consumer_docs_per_s"]),
                    f"{_num(r['ceiling_docs_per_s'])} ({r['inflight']} in flight)",
                    "?" if r["ratio"] != r["ratio"] else f"{r['ratio']:.2f}x",
                    f"ceiling runs {runs}; VmHWM {r.get('hwm_mib', 0):.0f} MiB per process"))
    return out


def _num(x: float) -> str:
    return "?" if x != x else f"{x:,.0f}"


def table(rows: Sequence[dict[str, Any]]) -> str:
    head = ("consumers", "docs/s", "ceiling docs/s", "ratio", "detail")
    data = [head, *lines(rows)]
    widths = [max(len(r[i]) for r in data) for i in range(len(head))]
    text = ["scaling (one host, one group, " f"{PARTITIONS} partitions):"]
    for n, r in enumerate(data):
        text.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip())
        if n == 0:
            text.append("  ".join("-" * w for w in widths))
    return "\n".join(text)


def markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
    out = ["", f"Scaling (one host; N `logpipe consume` processes in one group on a "
               f"{PARTITIONS}-partition topic, against the raw ceiling with as many requests in "
               "flight as they have batches in hand):",
           "", "| consumers | docs/s | ceiling docs/s | ratio | detail |",
           "|---|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in lines(rows)]
    return out
