"""Summaries of py-spy ``--format raw`` profiles (collapsed stacks, ``--threads --idle``)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*?)(?::(?P<line>\d+))?\)$")

# Where the consumer's main thread can be, by the innermost frame of ours that is on the stack.
PHASES: tuple[tuple[str, str], ...] = (
    ("_commit", "commit"),
    ("_dead_letter", "dlq"),
    ("_await_answer", "waiting for ES (nothing else to do)"),
    ("make_doc", "make_doc"),
    ("_build_ahead", "next batch while one is indexed (fetch)"),
    ("_start", "start batch (other)"),
    ("_finish", "handle answer (other)"),
    ("_accept", "fetch: accept"),
    ("_fetch", "fetch: consume()"),
    ("_tick", "tick/status"),
)


# Leaf frames that mean "waiting", not computing.
_BLOCKING = frozenset({
    "Condition.wait", "Event.wait", "SocketIO.readinto", "_worker", "select", "poll",
    "BaseSelector.select", "EpollSelector.select", "sleep", "Thread.join", "wait",
})


def _frames(stack: str) -> list[tuple[str, str]]:
    out = []
    for raw in stack.split(";"):
        m = _FRAME.match(raw.strip())
        if m:
            out.append((m["func"], Path(m["file"]).name))
        else:
            out.append((raw.strip(), ""))
    return out


def load(path: Path) -> list[tuple[list[tuple[str, str]], int]]:
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        rows.append((_frames(stack), int(count)))
    return rows


def summarize(path: Path, top: int = 15) -> dict[str, Any]:
    """Per thread: share of samples; for all threads: inclusive and self shares of functions;
    for the main thread: the phase breakdown (wall clock, idle included)."""
    rows = load(path)
    total = sum(c for _, c in rows) or 1
    threads: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    phases: Counter[str] = Counter()
    main_total = 0
    for frames, count in rows:
        thread = frames[0][0] if frames else "?"
        body = frames[1:] if thread.startswith(("process", "thread", "MainThread", "0x")) \
            or "(0x" in thread else frames
        tname = re.sub(r"\s*\(?0x[0-9a-f]+\)?", "", thread).strip() or thread
        threads[tname] += count
        names = [f"{f} ({m})" if m else f for f, m in body]
        for name in set(names):
            inclusive[name] += count
        if names:
            self_[names[-1]] += count
        if "MainThread" in thread or tname.startswith("process"):
            main_total += count
            funcs = {f.rsplit(".", 1)[-1] for f, _ in body}
            for key, label in PHASES:
                if key in funcs:
                    phases[label] += count
                    break
            else:
                phases["other"] += count
    blocking = {k: v for k, v in self_.items() if k.split(" ")[0] in _BLOCKING}
    busy = total - sum(blocking.values())
    cpu_self = Counter({k: v for k, v in self_.items() if k not in blocking})
    return {
        "samples": total,
        "busy_samples": busy,
        # Self time without the frames that only wait (socket reads, condition waits, sleeps):
        # roughly where the CPU goes, as a share of the busy samples.
        "busy_self_pct": {k: round(100 * v / max(1, busy), 1)
                          for k, v in cpu_self.most_common(top)},
        "threads": {k: round(100 * v / total, 1) for k, v in threads.most_common()},
        "inclusive_pct": {k: round(100 * v / total, 1) for k, v in inclusive.most_common(top)},
        "self_pct": {k: round(100 * v / total, 1) for k, v in self_.most_common(top)},
        "main_phases_pct": {k: round(100 * v / max(1, main_total), 1)
                            for k, v in phases.most_common()},
    }
