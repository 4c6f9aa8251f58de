"""Which cores the benchmark's processes run on.

The pipeline is deployed with Elasticsearch on hosts of its own (inventories/), while the bench
runs everything on one small machine. Sharing its cores, the comparison "consumer against the
raw ``_bulk`` ceiling" measures two different Elasticsearch nodes: during the ceiling it has every
core, during a consumer run it gives some of them to the broker serving the fetches and to the
consumer, neither of which the pre-serialized ceiling runs. On this 2-core machine the consumer
stays near 0.65x that way whatever it does (0.64x on 2026-11-30 with the change that took it from
0.75-0.85x to 0.91x against an Elasticsearch with a core of its own), and a busy loop taking 0.4
of a core beside the ceiling alone cost it ~20 %.

``isolate`` gives Elasticsearch (every thread of its process group) the upper half of the cores
and everything else (the broker, this process and the processes it starts afterwards: consumers,
producers, rsyslog) the lower half, so every run of a comparison meets the same Elasticsearch.
``share`` undoes it. Both use sched_setaffinity on each thread (no external tool); threads
started later inherit their creator's set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bench.core import ServerGroups, group_pids


@dataclass(frozen=True)
class Placement:
    name: str  # "isolated" or "shared"
    es_cpus: tuple[int, ...]
    other_cpus: tuple[int, ...]

    def describe(self) -> str:
        if self.name == "shared":
            return f"all processes share cores {_fmt(self.es_cpus)}"
        return (f"Elasticsearch on core(s) {_fmt(self.es_cpus)}; broker, consumers, producers, "
                f"rsyslog and the bench on {_fmt(self.other_cpus)}")


def _fmt(cpus: tuple[int, ...]) -> str:
    return ",".join(map(str, cpus))


def _cores() -> list[int]:
    return sorted(os.sched_getaffinity(0) | _allowed())


def _allowed() -> set[int]:
    """Every core this machine lets us use (our own set may already be narrowed)."""
    try:
        text = Path("/sys/fs/cgroup/cpuset.cpus.effective").read_text().strip()
    except OSError:
        text = ""
    if not text:
        return set(range(os.cpu_count() or 1))
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def pin_process(pid: int, cpus: tuple[int, ...]) -> None:
    """Every thread of ``pid`` to ``cpus`` (a thread that exits meanwhile is skipped)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except (ProcessLookupError, PermissionError):
            continue


def pin_group(pgid: int, cpus: tuple[int, ...]) -> None:
    for pid in group_pids(pgid):
        pin_process(pid, cpus)


def place(name: str, groups: ServerGroups) -> Placement:
    """``isolated`` or ``shared`` (the bench's ``--placement``); without an Elasticsearch process
    to give cores to, shared."""
    if name == "isolated" and groups.es:
        return isolate(groups.es, groups.kafka)
    return share(groups.all)


def isolate(es_pgids: list[int], other_pgids: list[int]) -> Placement:
    """Elasticsearch's process groups on the upper half of the cores, the ``other_pgids`` and
    this process on the lower half. On one core there is nothing to split: shared."""
    cores = _cores()
    if len(cores) < 2:
        return share(es_pgids + other_pgids)
    half = len(cores) // 2
    other, es = tuple(cores[:half]), tuple(cores[half:])
    for pgid in es_pgids:
        pin_group(pgid, es)
    for pgid in other_pgids:
        pin_group(pgid, other)
    pin_process(os.getpid(), other)
    return Placement("isolated", es, other)


def share(pgids: list[int]) -> Placement:
    """Every process group and this process on every core again."""
    cores = tuple(_cores())
    for pgid in pgids:
        pin_group(pgid, cores)
    pin_process(os.getpid(), cores)
    return Placement("shared", cores, cores)
