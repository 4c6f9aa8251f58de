"""Chaos: the pipeline under kills, an Elasticsearch outage, a broker restart, rebalances and
poison, then an exact account: every produced log_id in Elasticsearch exactly once, every poison
message in the dead-letter topic, nothing else anywhere.

``make chaos`` runs the full variant; ``LOGPIPE_CHAOS_SCALE=ci`` the CI-sized one (see
conftest.py). The summary line is ``lost=0 duplicated=0 dlq=<n> (expected <n>)``.
"""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from chaoskit import (
    MAX_MESSAGE_BYTES,
    POISON_PREFIX,
    SCALES,
    TARGETS,
    Fleet,
    PacedProducer,
    Scale,
    duplicate_log_ids,
    es_documents,
    poison_round,
    say,
)
from harness.pipeline import Pipeline, record
from harness.servers import ElasticsearchNode, HarnessError, KafkaCluster


def _servers() -> tuple[KafkaCluster, ElasticsearchNode]:
    """Two brokers (topic RF 2, min ISR 1: one may restart) and one Elasticsearch node of our own
    (the shared session node must not be stopped under other tests), started in parallel."""
    made: dict[str, Any] = {}
    errors: list[BaseException] = []

    def start(name: str, factory: Any) -> None:
        # One retry: on a machine this loaded a start can miss the harness's deadline.
        for attempt in (1, 2):
            try:
                made[name] = factory()
                return
            except HarnessError as exc:
                say(f"{name} did not start (attempt {attempt}): {exc}")
                if attempt == 2:
                    errors.append(exc)
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=start, args=("kafka", lambda: KafkaCluster(brokers=2))),
               threading.Thread(target=start, args=("es", ElasticsearchNode))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for server in made.values():
            server.close()
        raise errors[0]
    return made["kafka"], made["es"]


class Chaos:
    """One run: the schedule of faults while the producer paces the load."""

    def __init__(self, scale: Scale, kafka: KafkaCluster, es: ElasticsearchNode,
                 workdir: Path) -> None:
        self.scale = scale
        self.kafka = kafka
        self.es = es
        self.started = time.monotonic()
        self.rng = random.Random(20261124)
        self.pipe = Pipeline(kafka, es, workdir, f"chaos-{scale.name}", partitions=6)
        self.pipe.write_config(
            kafka={"replication_factor": 2, "min_insync_replicas": 1},
            elasticsearch={"shards": 1, "replicas": 0, "refresh_interval": "1s"},
            consumer={"batch_size": 500, "max_message_bytes": MAX_MESSAGE_BYTES,
                      # The broker's minimum: a killed member's partitions move after ~6 s.
                      "session_timeout_ms": 6000, "poll_timeout_s": 0.5,
                      "retry_initial_backoff_s": 0.2, "retry_max_backoff_s": 2.0,
                      "shutdown_timeout_s": 10.0})
        self.fleet = Fleet(self.pipe, self.rng, self.started)
        self.timeline: list[str] = []
        self.es_outage_s = 0.0  # stop -> answering again
        self.es_stopped_s = 0.0  # stop -> start issued
        self.broker_restart_s = 0.0
        self.poison: list[tuple[str, bytes | None]] = []

    def note(self, what: str) -> None:
        line = f"{time.monotonic() - self.started:7.1f}s {what}"
        self.timeline.append(line)
        say(what)

    # -- faults ----------------------------------------------------------------------------

    def kills(self, n: int) -> None:
        for _ in range(n):
            self.fleet.check_main()
            self.fleet.wait_working(timeout=30)
            time.sleep(self.rng.uniform(0.2, 2.0))
            target = TARGETS[len(self.fleet.kills) % len(TARGETS)]
            self.fleet.kill_main(target)

    def rebalance_graceful(self, kills: int) -> None:
        extras = [self.fleet.add_extra() for _ in range(self.scale.extra_consumers)]
        self.note(f"added {len(extras)} consumer(s)")
        for s in extras:
            try:
                s.wait_for_event("assigned", timeout=60)
            except AssertionError:
                self.note(f"{s.log_path.name} got no partitions in 60 s")
        self.kills(kills)
        time.sleep(self.rng.uniform(2.0, 5.0))
        for s in extras:
            code = s.terminate_and_wait(40)
            self.note(f"removed {s.log_path.name} (SIGTERM, exit {code})")

    def rebalance_lost_member(self) -> None:
        extra = self.fleet.add_extra()
        try:
            extra.wait_for_event("assigned", timeout=60)
            extra.wait_for_event("batch_committed", timeout=30)
        except AssertionError:
            pass
        extra.kill()
        self.note(f"added {extra.log_path.name}, then kill -9 (its partitions move after the "
                  f"session timeout)")

    def es_outage(self, kills: int) -> None:
        began = time.monotonic()
        self.es.stop()
        self.note("elasticsearch stopped")
        half = self.scale.es_outage_s / 2
        time.sleep(half)
        for _ in range(kills):
            self.fleet.check_main()
            time.sleep(self.rng.uniform(0.5, 2.0))
            # It can only be waiting or retrying now: take the phase as it comes.
            self.fleet.kill_main("any")
        time.sleep(max(0.0, self.scale.es_outage_s - (time.monotonic() - began)))
        self.es_stopped_s = time.monotonic() - began
        self.note(f"starting elasticsearch after {self.es_stopped_s:.0f} s stopped")
        self.es.start()
        self.es_outage_s = time.monotonic() - began
        self.note(f"elasticsearch answers again after {self.es_outage_s:.0f} s (same data dir)")

    def broker_restart(self) -> None:
        began = time.monotonic()
        self.note("restarting kafka broker 1 (of 2)")
        self.kafka.restart(node=1)
        self.kafka.wait_in_sync(timeout=120)
        self.broker_restart_s = time.monotonic() - began
        self.note(f"broker 1 back and in sync after {self.broker_restart_s:.0f} s")

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        sc = self.scale
        self.pipe.bootstrap()
        cfg = self.pipe.config()
        from logpipe.generator import LogGenerator

        template = LogGenerator(1).batch(1)[0]
        self.poison = [p for r in range(sc.poison_rounds) for p in poison_round(template, r)]
        producer = PacedProducer(cfg, sc.logs, sc.rate, self.poison, seed=sc.logs)
        self.fleet.start_main().wait_for_event("ready", timeout=120)
        producer.start()
        self.note(f"producing {sc.logs:,} logs at {sc.rate:.0f}/s plus {len(self.poison)} poison")
        k = sc.kills
        # Kills spread over the schedule: [before, during rebalance, during ES outage,
        # after ES, after broker restart, rest].
        plan = [max(1, k // 5), 1, 1, max(1, k // 5), max(1, k // 5)]
        plan.append(max(0, k - sum(plan)))
        try:
            self.kills(plan[0])
            self.rebalance_graceful(plan[1])
            self.es_outage(plan[2])
            self.kills(plan[3])
            self.broker_restart()
            self.kills(plan[4])
            self.rebalance_lost_member()
            self.kills(plan[5])
            producer.hurry.set()
            self.note(f"faults done ({len(self.fleet.kills)} kills, {producer.sent:,} logs sent "
                      f"so far); sending the rest at full speed")
            producer.join(timeout=max(60.0, sc.logs / sc.rate * 2))
            if producer.is_alive():
                producer.stop.set()
                producer.join(timeout=300)
            assert producer.error is None, f"producer failed: {producer.error!r}"
            self.note(f"producer done: {producer.sent:,} logs, {producer.acked_count:,} acked, "
                      f"{len(producer.failed)} failed")
            drained = self.drain()
            codes = self.fleet.stop_all()
            self.note(f"consumers stopped: {codes}")
        finally:
            producer.stop.set()
            self.fleet.kill_all()
        return self.account(producer, drained)

    def drain(self) -> bool:
        """Until the group's committed offsets reach the end of every partition (bounded)."""
        deadline = time.monotonic() + self.scale.drain_timeout_s
        last = ""
        while time.monotonic() < deadline:
            self.fleet.check_main()
            try:
                ends = self.pipe.end_offsets()
                committed = self.pipe.committed()
            except Exception as exc:  # a coordinator move: try again
                last = str(exc)
                time.sleep(2)
                continue
            lag = sum(max(0, end - max(0, committed.get(p, 0))) for p, end in ends.items())
            last = f"lag {lag}"
            if lag == 0:
                self.note("drained: committed == end offsets on every partition")
                return True
            time.sleep(2)
        self.note(f"not drained after {self.scale.drain_timeout_s:.0f} s ({last})")
        return False

    def account(self, producer: PacedProducer, drained: bool) -> dict[str, Any]:
        topic = self.pipe.read_topic()
        topic_keys = [m.key.decode("utf-8", "replace") for m in topic if m.key is not None]
        valid = {k for k in topic_keys if not k.startswith(POISON_PREFIX)}
        poison_keys = {k for k, _ in self.poison}
        docs = es_documents(self.pipe)
        in_es = set(docs.ids)
        lost = sorted(valid - in_es)
        unexpected = sorted(in_es - valid)
        dup_ids = {k: n for k, n in docs.ids.items() if n > 1}
        dup_agg = duplicate_log_ids(self.pipe)
        duplicated = set(dup_ids) | set(dup_agg) | set(docs.versions_over_1)
        dlq = self.pipe.read_topic(self.pipe.dlq_topic)
        dlq_keys = [m.key.decode("utf-8", "replace") for m in dlq if m.key is not None]
        dlq_poison = set(dlq_keys) & poison_keys
        dlq_wrong = sorted(set(dlq_keys) - poison_keys)
        totals = self.fleet.event_totals()
        phases: dict[str, int] = {}
        for kill in self.fleet.kills:
            phases[kill.phase] = phases.get(kill.phase, 0) + 1
        summary: dict[str, Any] = {
            "scale": self.scale.name,
            "seconds": round(time.monotonic() - self.started, 1),
            "produced_valid": len(valid), "produced_poison": len(poison_keys),
            "acked_by_producer": len(producer.acked), "producer_failed": producer.failed[:5],
            "acked_not_in_topic": len(producer.acked - set(topic_keys)),
            "topic_messages": len(topic), "topic_duplicate_keys": len(topic_keys)
            - len(set(topic_keys)),
            "es_documents": sum(docs.ids.values()), "lost": len(lost),
            "unexpected_in_es": len(unexpected), "duplicated": len(duplicated),
            "duplicate_ids": len(dup_ids), "duplicate_log_ids_agg": len(dup_agg),
            "version_over_1": len(docs.versions_over_1),
            "log_id_mismatch": len(docs.log_id_mismatch),
            "dlq": len(dlq_poison), "dlq_expected": len(poison_keys),
            "dlq_records": len(dlq), "dlq_not_poison": len(dlq_wrong),
            "kills": len(self.fleet.kills), "kill_phases": phases,
            "es_outage_s": round(self.es_outage_s, 1),
            "es_stopped_s": round(self.es_stopped_s, 1),
            "broker_restart_s": round(self.broker_restart_s, 1),
            "consumers_started": len(self.fleet.all), "crashes": self.fleet.crashes,
            "rebalances_assigned_events": totals["events:assigned"],
            "revoked_events": totals["events:revoked"] + totals["events:lost"],
            "created": totals["created"], "already_present_replays": totals["already_present"],
            "retried_items": totals["retried"], "drained": drained,
            "examples": {"lost": lost[:5], "unexpected": unexpected[:5],
                         "duplicated": sorted(duplicated)[:5], "dlq_not_poison": dlq_wrong[:5],
                         "dlq_missing": sorted(poison_keys - dlq_poison)[:5]},
            "kill_log": [vars(k) for k in self.fleet.kills],
            "timeline": self.timeline,
        }
        return summary


def _run(scale_name: str, tmp_path: Path) -> None:
    scale = SCALES[scale_name]
    began = time.monotonic()
    kafka, es = _servers()
    try:
        chaos = Chaos(scale, kafka, es, tmp_path / "pipeline")
        try:
            summary = chaos.run()
        except BaseException:
            say("failed; consumer logs under " + str(tmp_path / "pipeline"))
            raise
    finally:
        es.close()
        kafka.close()
    summary["seconds_with_servers"] = round(time.monotonic() - began, 1)
    out = tmp_path / f"chaos-{scale.name}.json"
    out.write_text(json.dumps(summary, indent=2))
    print("\n".join(summary["timeline"]))
    print(json.dumps({k: v for k, v in summary.items()
                      if k not in ("timeline", "kill_log")}, indent=1))
    line = (f"lost={summary['lost']} duplicated={summary['duplicated']} dlq={summary['dlq']} "
            f"(expected {summary['dlq_expected']})")
    print(line)
    say(f"{scale.name}: {line}; {summary['kills']} kills, ES stopped {summary['es_stopped_s']} s "
        f"(answering again after {summary['es_outage_s']} s), "
        f"{summary['seconds_with_servers']} s in total; summary in {out}")
    record(f"chaos_{scale.name}", **{k: v for k, v in summary.items()
                                     if k not in ("timeline", "kill_log", "examples")})
    problems = [f"{k}={summary[k]}" for k in (
        "lost", "duplicated", "unexpected_in_es", "dlq_not_poison", "acked_not_in_topic",
        "log_id_mismatch") if summary[k]]
    if summary["dlq"] != summary["dlq_expected"]:
        problems.append(f"dlq={summary['dlq']} expected {summary['dlq_expected']}")
    if not summary["drained"]:
        problems.append("the consumers did not catch up in time")
    if summary["kills"] < scale.kills:
        problems.append(f"only {summary['kills']} kills")
    if summary["es_stopped_s"] < scale.es_outage_s:
        problems.append(f"Elasticsearch was stopped only {summary['es_stopped_s']} s")
    assert not problems, f"{line}: {'; '.join(problems)}; examples {summary['examples']}"


@pytest.mark.chaos
@pytest.mark.timeout(3600)
def test_chaos_full(tmp_path: Path) -> None:
    _run("full", tmp_path)


@pytest.mark.chaos_ci
@pytest.mark.timeout(1500)
def test_chaos_ci(tmp_path: Path) -> None:
    _run("ci", tmp_path)
