"""``python -m bench``: run every benchmark once, print the table, write the report files.

    python -m bench                 # the recorded run (make bench), ~15-20 min on 2 cores
    python -m bench --quick         # small sizes for iterating (numbers are noisier)
    python -m bench --profile       # also py-spy profiles of the consumer and the producer
    python -m bench --no-write      # print only; keep docs/BENCHMARKS.md and results.json
    python -m bench --security-only # only the TLS+SCRAM vs plaintext ratios (own block/file)
    python -m bench --peer-only     # only rsyslog vs logpipe consume: speed, latency and
                                    # kill -9 (own block of docs/BENCHMARKS.md; its keys in
                                    # results.json)
    python -m bench --skip peer --skip security --skip scaling   # the quick loop of the rest
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import core, measure, peer, placement, report, scaling, security
from bench.core import BenchPipeline, log, new_name
from logpipe.config import ConsumerConfig
from logpipe.generator import LogGenerator
from logpipe.producer import produce


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (iteration, not records)")
    p.add_argument("--producer-msgs", type=int, help="messages per producer run")
    p.add_argument("--consumer-docs", type=int, help="backlog the consumer drains")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--bulk-concurrency", type=int, default=1)
    p.add_argument("--poll-timeout", type=float,
                   help="consumer poll_timeout_s (default: the package default)")
    p.add_argument("--rounds", type=int, default=3, help="consumer runs (each between ceilings)")
    p.add_argument("--shared-rounds", type=int, default=2,
                   help="consumer runs of the same comparison with every process sharing every "
                        "core (consumer_ratio_shared; 0: none)")
    p.add_argument("--placement", choices=["isolated", "shared"], default="isolated",
                   help="isolated (default): Elasticsearch on cores of its own, as deployed, "
                        "everything else on the others (bench/placement.py); shared: no pinning")
    p.add_argument("--latency-rate", type=float, default=1000.0,
                   help="produce rate of the end-to-end latency run (and rsyslog's beside it)")
    p.add_argument("--latency-rate-high", type=float, default=5000.0,
                   help="produce rate of the second latency run (the e2e_*_5k_s keys; 0: none)")
    p.add_argument("--latency-duration", type=float,
                   help="seconds of paced production per latency run (default 40, --quick 20)")
    p.add_argument("--scaling-docs", type=int,
                   help="backlog of the scaling line, 1/2/4 consumers (default 60,000; "
                        "--quick 30,000)")
    p.add_argument("--profile", action="store_true", help="py-spy the consumer and producer")
    p.add_argument("--sweep", action="store_true",
                   help="only the consumer-vs-ceiling comparison over several settings "
                        "(batch size, bulk concurrency, consumers, refresh interval, "
                        "streaming_bulk); writes bench/sweep.json")
    p.add_argument("--skip", action="append", default=[],
                   choices=["producer", "consumer", "scaling", "seed", "latency", "security",
                            "peer"])
    p.add_argument("--security-only", action="store_true",
                   help="only the producer/consumer cost of TLS+SCRAM+HTTPS against plaintext "
                        "(writes bench/security.json and its own block of docs/BENCHMARKS.md)")
    p.add_argument("--security-rounds", type=int, default=2,
                   help="alternating plaintext/secure rounds of the security comparison")
    p.add_argument("--peer-only", action="store_true",
                   help="only the peer comparison: rsyslog (imkafka -> omelasticsearch, "
                        "bench/rsyslog.conf.template) against logpipe consume, docs/s and one "
                        "kill -9 of each (its keys merged into bench/results.json)")
    p.add_argument("--peer-docs", type=int,
                   help="backlog of the peer comparison (default 100,000; --quick 50,000: "
                        "smaller ends before rsyslog's first commit, no mid-stream kill)")
    p.add_argument("--peer-rounds", type=int, default=3,
                   help="alternating rsyslog/logpipe rounds of the peer comparison")
    p.add_argument("--peer-kill-docs", type=int,
                   help="backlog of the peer kill test (default 300,000; --quick 100,000: "
                        "rsyslog must still be reading after its first commit, 5 s in; "
                        "0: no kill test)")
    p.add_argument("--peer-kill-only", action="store_true",
                   help="with --peer-only: only the kill test; its keys replace the kill "
                        "figures of the last peer run in bench/results.json")
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # SIGTERM unwinds like Ctrl-C, so the harness servers are stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))
    quick = args.quick
    producer_msgs = args.producer_msgs or (30_000 if quick else 50_000)
    consumer_docs = args.consumer_docs or (40_000 if quick else 100_000)
    security_docs = 20_000 if quick else 40_000
    latency_duration = args.latency_duration or (20.0 if quick else 40.0)
    args.latency_duration = latency_duration
    scaling_docs = args.scaling_docs or (30_000 if quick else 60_000)
    began = time.monotonic()
    sections: dict[str, float] = {}  # seconds per part (in the run's meta: what costs time)
    lap_at = [began]

    def lap(name: str) -> None:
        now = time.monotonic()
        sections[name] = round(now - lap_at[0], 1)
        lap_at[0] = now

    started_at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load_before = measure.loadavg()
    command = "make bench" if argv is None and len(sys.argv) == 1 else \
        "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    results: dict[str, Any] = {}
    workdir = Path(tempfile.mkdtemp(prefix="bench-", dir=core.REPO / ".cache"))
    if args.security_only:
        return security_only(args, workdir, producer_msgs, security_docs, command, started_at,
                             began, load_before)
    peer_docs = args.peer_docs or (50_000 if quick else 100_000)
    if args.peer_kill_docs is None:
        args.peer_kill_docs = 100_000 if quick else 300_000
    if args.peer_only:
        return peer_only(args, workdir, peer_docs, command, started_at, began, load_before)
    with core.servers(brokers=1) as (kafka, es):
        log(f"servers up: kafka {kafka.bootstrap_servers}, es {es.url}")
        lap("servers")
        pipe = BenchPipeline(kafka, es, workdir, "bench", partitions=6)
        # The package defaults for what matters here (shards, refresh, batch, prefetch), the
        # harness's names and addresses. One node: replicas could not be allocated anyway.
        pipe.write_config(
            elasticsearch={"shards": 2, "replicas": 0, "refresh_interval": "1s"},
            producer={"linger_ms": 20},
            consumer={"batch_size": args.batch_size, "bulk_concurrency": args.bulk_concurrency,
                      "poll_timeout_s": args.poll_timeout or ConsumerConfig.poll_timeout_s,
                      "session_timeout_ms": 45000})
        cfg = pipe.config()
        measure.ensure_topic(cfg, pipe.topic)
        es_pgid = es._proc.pid if es._proc is not None else None
        server_pgids = core.server_pgids(kafka, es)
        versions = report.versions(es.url)
        results["settings"] = {
            "batch_size": args.batch_size, "bulk_concurrency": args.bulk_concurrency,
            "partitions": cfg.kafka.partitions, "shards": cfg.elasticsearch.shards,
            "replicas": cfg.elasticsearch.replicas,
            "refresh_interval": cfg.elasticsearch.refresh_interval,
            "compression": cfg.producer.compression, "linger_ms": cfg.producer.linger_ms}

        # -- producer ------------------------------------------------------------------------
        if "producer" not in args.skip:
            log(f"producer: {producer_msgs:,} messages per run, ceiling and real alternating")
            pf = measure.producer_bench(cfg, producer_msgs)
            results["producer"] = dataclasses.asdict(pf)
            if args.profile:
                results["producer"]["profile"] = profile_producer(pipe, workdir, producer_msgs)
        lap("producer")

        # -- consumer vs. raw _bulk ----------------------------------------------------------
        # Its own topic, filled by the real producer, read back: the ceiling posts exactly the
        # documents the consumer indexes.
        backlog_topic = new_name("bench-backlog")
        measure.ensure_topic(cfg, backlog_topic)
        bcfg = cfg.replace("kafka", topic=backlog_topic, dlq_topic=f"{backlog_topic}.dlq")
        produce(bcfg, consumer_docs, seed=11)
        messages = measure.read_messages(kafka.bootstrap_servers, backlog_topic)
        backlog = len(messages)
        # Warm Elasticsearch up until its rate settles (JIT) before anything is timed, on every
        # core; then place the processes and let it settle there.
        results["warmup"] = warm_and_place(cfg, es.http_port, messages, server_pgids, args)
        lap("backlog and warm-up")
        if args.sweep:
            results["sweep"] = sweep(pipe, cfg, messages, es_pgid, backlog_topic)
            (core.REPO / "bench" / "sweep.json").write_text(
                json.dumps(results["sweep"], indent=2, default=str) + "\n")
            for row in results["sweep"]:
                log(f"sweep {row['setting']}: consumer {row['consumer_docs_per_s']:,.0f} "
                    f"ceiling {row['ceiling_docs_per_s']:,.0f} ratio {row['ratio']:.2f} "
                    f"VmHWM {row.get('hwm_mib', 0):.0f} MiB")
            return 0
        if "consumer" not in args.skip:
            log(f"consumer: backlog {backlog:,} messages, {args.rounds} round(s)")
            results["consumer"] = consumer_bench(pipe, cfg, messages, es_pgid, args,
                                                 backlog_topic, rounds=args.rounds)
            results["consumer"]["placement"] = results["warmup"]["placement"]
            if args.placement == "isolated" and args.shared_rounds > 0:
                # The same comparison with every process on every core: what this machine's
                # sharing costs the consumer (see bench/placement.py).
                shared = placement.share(server_pgids.all)
                log(f"consumer, {shared.describe()}: {args.shared_rounds} round(s)")
                results["consumer_shared"] = consumer_bench(
                    pipe, cfg, messages, es_pgid, args, backlog_topic, rounds=args.shared_rounds)
                results["consumer_shared"]["placement"] = dataclasses.asdict(shared)
                placement.place(args.placement, server_pgids)
            if args.profile:
                results["consumer"]["profile"] = {}
                for kind in ("wall", "cpu"):
                    prof = workdir / f"consumer-{kind}.pyspy.txt"
                    pf2 = measure.run_consumer(
                        pipe, group=new_name("bench-prof"), index=new_name("bench-prof"),
                        expected=backlog, es_pgid=es_pgid, profile_to=prof,
                        profile_idle=kind == "wall", topic=backlog_topic,
                        batch_size=args.batch_size, bulk_concurrency=args.bulk_concurrency)
                    results["consumer"]["profile"][kind] = pf2.profile
                    results["consumer"][f"profiled_{kind}_docs_per_s"] = pf2.steady_docs_per_s
                    log(f"profile ({kind}) written: {prof}")
        del messages
        lap("consumer")

        # -- scaling: 1, 2, 4 consumers ------------------------------------------------------
        if "scaling" not in args.skip:
            log(f"scaling: {'/'.join(map(str, scaling.COUNTS))} consumers, backlog "
                f"{scaling_docs:,} documents")
            results["scaling"] = [dataclasses.asdict(r) for r in scaling.run(
                pipe, cfg, LogGenerator(seed=17).messages(scaling_docs), es_pgid,
                batch_size=args.batch_size)]
        lap("scaling")

        # -- the seed's design ----------------------------------------------------------------
        if "seed" not in args.skip:
            seed_index = new_name("bench-seed")
            measure.ensure_index_template(cfg, seed_index)
            sf = measure.run_seed_design(pipe, group=new_name("bench-seed"), index=seed_index,
                                         topic=backlog_topic)
            log(f"seed design: {sf.docs} docs in {sf.run_s:.1f}s -> {sf.docs_per_s:.1f} docs/s")
            results["seed"] = dataclasses.asdict(sf)
        lap("seed")

        # -- end-to-end latency --------------------------------------------------------------
        # logpipe at 1,000 logs/s, rsyslog at the same rate right after it (the peer's figure,
        # next to logpipe's in time), then logpipe at 5,000 logs/s.
        peer_latency: dict[str, dict[str, Any]] | None = None
        if "latency" not in args.skip:
            log(f"latency: {args.latency_rate:,.0f} logs/s for {latency_duration:.0f}s")
            lf = peer.logpipe_latency(pipe, cfg, rate=args.latency_rate,
                                      duration=latency_duration)
            peer.log_latency("logpipe", lf)
            results["latency"] = dataclasses.asdict(lf)
            if "peer" not in args.skip:
                rl = peer.rsyslog_latency(pipe, cfg, workdir, rate=args.latency_rate,
                                          duration=latency_duration)
                peer.log_latency("rsyslog", rl)
                peer_latency = {"rsyslog": dataclasses.asdict(rl), "logpipe": results["latency"]}
            if args.latency_rate_high > 0:
                lf = peer.logpipe_latency(pipe, cfg, rate=args.latency_rate_high,
                                          duration=latency_duration)
                peer.log_latency("logpipe", lf)
                results["latency_5k"] = dataclasses.asdict(lf)
        lap("latency")

        # -- what security costs -------------------------------------------------------------
        if "security" not in args.skip:
            # Its own servers, started now, compared with these: every process on every core,
            # so neither pair is favoured by where it was started.
            placement.share(server_pgids.all)
            results["security"] = dataclasses.asdict(
                security_part(pipe, workdir, args, producer_msgs, security_docs))
            placement.place(args.placement, server_pgids)
        lap("security")

        # -- a peer: rsyslog -------------------------------------------------------------------
        if "peer" not in args.skip:
            results["peer"] = dataclasses.asdict(peer.run(
                pipe, cfg, workdir, backlog=peer_docs, rounds=args.peer_rounds,
                batch_size=args.batch_size, kill_backlog=args.peer_kill_docs,
                latency_rate=args.latency_rate, latency_duration=latency_duration,
                latency=peer_latency))
        lap("peer")

    results["meta"] = {
        "date": started_at, "command": command, "seconds": round(time.monotonic() - began, 1),
        "sections_s": sections,
        "loadavg_before": load_before, "loadavg_after": measure.loadavg(),
        "machine": report.machine(), "versions": versions, "python": platform.python_version(),
        "quick": quick, "workdir": str(workdir)}
    if "peer" in results:
        results["peer"]["meta"] = results["peer"]["kill_meta"] = results["meta"]
    flat = report.flatten(results)
    print(report.table(flat, results))
    if "scaling" in results:
        print("\n" + scaling.table(results["scaling"]))
    if "security" in results:
        print_security(results["security"])
    if "peer" in results:
        print_peer(results["peer"])
    print("\n" + report.targets_text(flat))
    log("seconds per part: " + ", ".join(f"{k} {v:.0f}" for k, v in sections.items())
        + f"; {results['meta']['seconds']:.0f} in total")
    if not args.no_write:
        (core.REPO / "bench" / "results.json").write_text(
            record_json({**flat, "details": results}))
        report.write_markdown(core.REPO / "docs" / "BENCHMARKS.md", flat, results)
        if "security" in results:
            write_security(results["security"], results["meta"])
        if "peer" in results:
            peer.write_markdown(core.REPO / "docs" / "BENCHMARKS.md", results["peer"])
        log("wrote bench/results.json and docs/BENCHMARKS.md")
    return 0


def _pipe_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"elasticsearch": {"shards": 2, "replicas": 0, "refresh_interval": "1s"},
            "producer": {"linger_ms": 20},
            "consumer": {"batch_size": args.batch_size,
                         "bulk_concurrency": args.bulk_concurrency,
                         "poll_timeout_s": args.poll_timeout or ConsumerConfig.poll_timeout_s,
                         "session_timeout_ms": 45000}}


def security_part(plain: BenchPipeline, workdir: Path, args: argparse.Namespace,
                  producer_msgs: int, consumer_docs: int) -> security.SecurityFigures:
    """Start the secure servers beside the running plaintext ones and compare."""
    with core.servers(brokers=1, secure=True) as (skafka, ses):
        log(f"secure servers up: kafka {skafka.bootstrap_servers}, es {ses.url}")
        spipe = BenchPipeline(skafka, ses, workdir / "secure", "bench-secure", partitions=6)
        spipe.write_config(**_pipe_settings(args))
        return security.run(plain, spipe, producer_msgs=producer_msgs,
                            consumer_docs=consumer_docs, rounds=args.security_rounds,
                            batch_size=args.batch_size, bulk_concurrency=args.bulk_concurrency)


def security_only(args: argparse.Namespace, workdir: Path, producer_msgs: int,
                  consumer_docs: int, command: str, started_at: str, began: float,
                  load_before: str) -> int:
    with core.servers(brokers=1) as (kafka, es):
        log(f"servers up: kafka {kafka.bootstrap_servers}, es {es.url}")
        pipe = BenchPipeline(kafka, es, workdir / "plain", "bench", partitions=6)
        pipe.write_config(**_pipe_settings(args))
        figures = dataclasses.asdict(security_part(pipe, workdir, args, producer_msgs,
                                                   consumer_docs))
    meta = {"date": started_at, "command": command,
            "seconds": round(time.monotonic() - began, 1), "loadavg_before": load_before,
            "loadavg_after": measure.loadavg()}
    print_security(figures)
    if not args.no_write:
        write_security(figures, meta)
        log("wrote bench/security.json and the security block of docs/BENCHMARKS.md")
    return 0


def peer_only(args: argparse.Namespace, workdir: Path, peer_docs: int, command: str,
              started_at: str, began: float, load_before: str) -> int:
    with core.servers(brokers=1) as (kafka, es):
        log(f"servers up: kafka {kafka.bootstrap_servers}, es {es.url}")
        pipe = BenchPipeline(kafka, es, workdir / "plain", "bench", partitions=6)
        pipe.write_config(**_pipe_settings(args))
        cfg = pipe.config()
        # Warm Elasticsearch up and place the processes before anything is timed, as the full
        # run does.
        warm_topic = new_name("bench-warm")
        measure.ensure_topic(cfg, warm_topic)
        produce(cfg.replace("kafka", topic=warm_topic, dlq_topic=f"{warm_topic}.dlq"), 50_000,
                seed=5)
        warm_and_place(cfg, es.http_port,
                       measure.read_messages(kafka.bootstrap_servers, warm_topic),
                       core.server_pgids(kafka, es), args)
        if args.peer_kill_only:
            kills = [dataclasses.asdict(k) for k in peer.kill_test(
                pipe, cfg, workdir, backlog=args.peer_kill_docs, batch_size=args.batch_size)]
        else:
            figures = dataclasses.asdict(peer.run(
                pipe, cfg, workdir, backlog=peer_docs, rounds=args.peer_rounds,
                batch_size=args.batch_size, kill_backlog=args.peer_kill_docs,
                latency_rate=args.latency_rate, latency_duration=args.latency_duration))
    meta = {"date": started_at, "command": command, "seconds": round(time.monotonic() - began, 1),
            "loadavg_before": load_before, "loadavg_after": measure.loadavg(),
            "quick": args.quick}
    path = core.REPO / "bench" / "results.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    if args.peer_kill_only:
        # The speed figures stay those of the last peer run; the kill test is replaced.
        figures = saved.get("details", {}).get("peer")
        if not figures:
            raise SystemExit("--peer-kill-only: no peer run in bench/results.json to add to")
        figures["kills"], figures["kill_meta"] = kills, meta
    else:
        figures["meta"] = figures["kill_meta"] = meta
    print_peer(figures)
    if not args.no_write:
        # The peer's keys and details join the last full run's results.json (the other keys
        # stay as that run left them).
        saved.update(peer.flat(figures))
        saved.setdefault("details", {})["peer"] = figures
        path.write_text(record_json(saved))
        peer.write_markdown(core.REPO / "docs" / "BENCHMARKS.md", figures)
        log("wrote the peer keys of bench/results.json and the peer block of "
            "docs/BENCHMARKS.md")
    return 0


def print_peer(figures: dict[str, Any]) -> None:
    rows = peer.rows(figures)
    w0, w1 = (max(len(r[i]) for r in rows) for i in (0, 1))
    print()
    for figure, value, detail in rows:
        print(f"{figure:<{w0}}  {value:<{w1}}  {detail}".rstrip())


def print_security(figures: dict[str, Any]) -> None:
    print()
    for figure, value, detail in security.rows(figures):
        print(f"{figure:<44} {value:<14} {detail}")


def record_json(data: Any) -> str:
    """A committed record: paths under the checkout relative to it (no machine's paths)."""
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    return text.replace(json.dumps(str(core.REPO) + "/")[1:-1], "")


def write_security(figures: dict[str, Any], meta: dict[str, Any]) -> None:
    figures = {**figures, "meta": {**figures.get("meta", {}), **meta}}
    (core.REPO / "bench" / "security.json").write_text(record_json(figures))
    security.write_markdown(core.REPO / "docs" / "BENCHMARKS.md", figures)


def warm_and_place(cfg: Any, port: int, messages: list[tuple[bytes, bytes]],
                   server_pgids: core.ServerGroups, args: argparse.Namespace) -> dict[str, Any]:
    """Warm Elasticsearch up on every core (its JIT compiles faster there), then, unless
    ``--placement shared``, give it cores of its own and wait until it settles again."""
    kw = {"batch_size": args.batch_size, "concurrency": args.bulk_concurrency,
          "es_pgid": server_pgids.es[0] if server_pgids.es else None}
    first = measure.warm_up(cfg, port, messages, **kw,
                            min_docs=100_000 if args.quick else 300_000)
    out: dict[str, Any] = {"shared": dataclasses.asdict(first)}
    placed = placement.place(args.placement, server_pgids)
    out["placement"] = dataclasses.asdict(placed)
    if placed.name == "isolated":
        log(f"placement: {placed.describe()}")
        out["placed"] = dataclasses.asdict(measure.warm_up(
            cfg, port, messages, **kw, min_docs=0, max_seconds=60.0, label="warm-up, placed"))
    return out


def consumer_bench(pipe: BenchPipeline, cfg: Any, messages: list[tuple[bytes, bytes]],
                   es_pgid: int | None, args: argparse.Namespace, topic: str, *,
                   rounds: int) -> dict[str, Any]:
    """Ceiling, then (the real consumer, ceiling) per round; each consumer run against the mean
    of the ceilings around it. The ceiling has as many requests in flight as the consumer can
    (a request per part of every batch in hand: bulk_concurrency x pipeline_depth), each taking
    the next body as soon as it is answered."""
    port = pipe.es_node.http_port
    bs, conc = args.batch_size, args.bulk_concurrency
    inflight = cfg.consumer.requests_in_flight
    ceilings: list[dict[str, Any]] = []
    consumers: list[dict[str, Any]] = []

    def ceiling() -> None:
        index = new_name("bench-ceil")
        measure.ensure_index_template(cfg, index)
        bf = measure.consumer_ceiling(port, messages, index, batch_size=bs, concurrency=conc,
                                      inflight=inflight, es_pgid=es_pgid)
        count = measure.es_count(port, f"{index}-*")
        log(f"bulk ceiling: {bf.docs_per_s:,.0f} docs/s ({bf.docs} docs, {bf.errors} errors, "
            f"{count} in ES)")
        ceilings.append({**dataclasses.asdict(bf), "docs_per_s": bf.docs_per_s,
                         "es_count": count})

    def consumer() -> None:
        index = new_name("bench-cons")
        measure.ensure_index_template(cfg, index)
        cf = measure.run_consumer(pipe, group=new_name("bench-cons"), index=index,
                                  expected=len(messages), es_pgid=es_pgid, topic=topic,
                                  batch_size=bs, bulk_concurrency=conc)
        count = measure.es_count(port, f"{index}-*")
        log(f"consumer: {cf.steady_docs_per_s:,.0f} docs/s steady ({cf.wall_docs_per_s:,.0f} "
            f"with start-up), VmHWM {cf.hwm_mib:.1f} MiB, {count} in ES")
        consumers.append({**dataclasses.asdict(cf), "es_count": count})

    # ceiling, (consumer, ceiling) x rounds: each consumer run is compared with the mean of the
    # ceiling runs just before and after it (the machine's load drifts).
    ceiling()
    for _ in range(rounds):
        consumer()
        ceiling()
    ratios = [c["steady_docs_per_s"] / ((ceilings[i]["docs_per_s"]
                                         + ceilings[i + 1]["docs_per_s"]) / 2)
              for i, c in enumerate(consumers)]
    return {
        "consumer_runs": consumers, "ceilings": ceilings, "ratios": ratios,
        "ratio": sum(ratios) / len(ratios),
        "steady_docs_per_s": sum(c["steady_docs_per_s"] for c in consumers) / len(consumers),
        "wall_docs_per_s": sum(c["wall_docs_per_s"] for c in consumers) / len(consumers),
        "ceiling_docs_per_s": sum(c["docs_per_s"] for c in ceilings) / len(ceilings),
        "hwm_mib": max(c["hwm_mib"] for c in consumers),
        "docs": consumers[0]["docs"],
        "inflight": inflight,
        "cpu_s": sum(c["cpu_s"] for c in consumers) / len(consumers),
        "es_cpu_s": sum(c["es_cpu_s"] for c in consumers) / len(consumers),
        "batches": consumers[0]["batches"],
        "batch_seconds_p50": consumers[0]["batch_seconds_p50"],
    }


def sweep(pipe: BenchPipeline, cfg: Any, messages: list[tuple[bytes, bytes]],
          es_pgid: int | None, topic: str) -> list[dict[str, Any]]:
    """Consumer vs. its ceiling (ceiling, consumer, ceiling) for each setting, plus the
    streaming_bulk helper on the same documents."""
    port = pipe.es_node.http_port
    rows: list[dict[str, Any]] = []
    settings: list[dict[str, Any]] = [
        {"batch_size": 500, "bulk_concurrency": 1, "processes": 1, "refresh_interval": "1s"},
        {"batch_size": 500, "bulk_concurrency": 2, "processes": 1, "refresh_interval": "1s"},
        {"batch_size": 500, "bulk_concurrency": 1, "processes": 2, "refresh_interval": "1s"},
        {"batch_size": 2000, "bulk_concurrency": 1, "processes": 1, "refresh_interval": "1s"},
        {"batch_size": 500, "bulk_concurrency": 1, "processes": 1, "refresh_interval": "30s"},
    ]
    for st in settings:
        bs, conc, procs, refresh = (st["batch_size"], st["bulk_concurrency"], st["processes"],
                                    st["refresh_interval"])
        ceil = []
        for _ in range(2):
            index = new_name("bench-ceil")
            measure.ensure_index_template(cfg, index, refresh_interval=refresh)
            ceil.append(measure.consumer_ceiling(
                port, messages, index, batch_size=bs, concurrency=conc,
                inflight=conc * procs * cfg.consumer.pipeline_depth, es_pgid=es_pgid).docs_per_s)
            if len(ceil) == 1:
                index = new_name("bench-cons")
                measure.ensure_index_template(cfg, index, refresh_interval=refresh)
                cf = measure.run_consumer(pipe, group=new_name("bench-cons"), index=index,
                                          expected=len(messages), es_pgid=es_pgid, topic=topic,
                                          processes=procs, batch_size=bs, bulk_concurrency=conc)
        ceiling = sum(ceil) / 2
        log(f"sweep batch {bs} conc {conc} consumers {procs} refresh {refresh}: consumer "
            f"{cf.steady_docs_per_s:,.0f} ceiling {ceil[0]:,.0f}/{ceil[1]:,.0f} docs/s "
            f"ratio {cf.steady_docs_per_s / ceiling:.2f}, VmHWM {cf.hwm_mib:.0f} MiB")
        rows.append({"setting": f"batch {bs}, concurrency {conc}, consumers {procs}, "
                                f"refresh {refresh}", **st,
                     "consumer_docs_per_s": cf.steady_docs_per_s, "ceiling_docs_per_s": ceiling,
                     "ceiling_runs": ceil, "ratio": cf.steady_docs_per_s / ceiling,
                     "hwm_mib": cf.hwm_mib, "consumer_cpu_s": cf.cpu_s})
    for use_orjson in (True,):
        index = new_name("bench-sb")
        measure.ensure_index_template(cfg, index)
        rate = measure.streaming_bulk_rate(pipe.es_node.url, messages, index, 500, use_orjson)
        log(f"sweep streaming_bulk: {rate:,.0f} docs/s")
        index = new_name("bench-ceil")
        measure.ensure_index_template(cfg, index)
        # streaming_bulk has one request in flight.
        ceiling = measure.consumer_ceiling(port, messages, index, batch_size=500, concurrency=1,
                                           inflight=1, es_pgid=es_pgid).docs_per_s
        rows.append({"setting": "helpers.streaming_bulk, batch 500, "
                                + ("orjson" if use_orjson else "default json") + " serializer",
                     "consumer_docs_per_s": rate, "ceiling_docs_per_s": ceiling,
                     "ceiling_runs": [ceiling], "ratio": rate / ceiling})
    return rows


def profile_producer(pipe: BenchPipeline, workdir: Path, count: int) -> dict[str, Any]:
    """py-spy over ``logpipe produce --count N`` in a subprocess."""
    import subprocess

    from bench.profiling import summarize

    out = workdir / "producer.pyspy.txt"
    proc = subprocess.Popen(pipe.argv("produce", "--count", str(count)), env=pipe.env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=pipe.workdir)
    spy = measure.start_py_spy(proc.pid, out)
    proc.wait(timeout=600)
    if spy is not None:
        spy.wait(timeout=60)
    return summarize(out) if out.exists() else {}


if __name__ == "__main__":
    sys.exit(main())
