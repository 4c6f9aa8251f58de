"""Per-partition offset bookkeeping: which offsets may be committed.

Pure data structure, no Kafka calls. A partition's commit position is the first fetched offset
that is not yet handled (indexed, already present, or acknowledged by the dead-letter topic); when
everything fetched is handled it is the last fetched offset + 1. Offsets that were never fetched
(compacted away, transaction markers) are gaps the position may pass, like a Kafka consumer does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

# (topic, partition)
PartitionKey = tuple[str, int]

# Every commit carries the wall-clock time it was made as its metadata, so `logpipe check`, from
# any host, can tell a partition whose consumer stopped making progress (lag > 0, an old commit)
# from one that is merely busy (lag > 0, fresh commits).
_COMMITTED_AT = re.compile(r"committed_at_ms=(\d+)")


def commit_metadata(epoch_s: float) -> str:
    """The metadata string stored with a commit made at ``epoch_s``."""
    return f"logpipe committed_at_ms={int(epoch_s * 1000)}"


def committed_at(metadata: str | None) -> float | None:
    """The commit time (epoch seconds) from a commit's metadata; None if it has none (a commit
    by another client or an older logpipe)."""
    found = _COMMITTED_AT.search(metadata or "")
    return int(found.group(1)) / 1000 if found else None


@dataclass(slots=True)
class _Partition:
    # Fetched offsets not handled yet.
    unhandled: set[int] = field(default_factory=set)
    # Last fetched offset + 1 (None until the first fetch).
    next_offset: int | None = None
    # Position last committed (or reported committed by mark_committed).
    committed: int | None = None
    # Position of the last asynchronous commit sent, confirmed or not (mark_sent).
    sent: int | None = None


class OffsetTracker:
    """Tracks fetched and handled offsets per partition; never yields a position past an
    unhandled offset."""

    def __init__(self) -> None:
        self._partitions: dict[PartitionKey, _Partition] = {}

    def fetched(self, key: PartitionKey, offset: int) -> None:
        """Record an offset handed to us by the consumer (not handled yet)."""
        part = self._partitions.get(key)
        if part is None:
            part = self._partitions[key] = _Partition()
        if part.committed is not None and offset < part.committed:
            # Redelivery of something already committed (e.g. after a seek); nothing to track.
            return
        part.unhandled.add(offset)
        if part.next_offset is None or offset >= part.next_offset:
            part.next_offset = offset + 1

    def handled(self, key: PartitionKey, offset: int) -> None:
        """Mark a fetched offset as done. Unknown partitions/offsets are ignored: the partition
        was revoked in the meantime and the message belongs to its new owner."""
        part = self._partitions.get(key)
        if part is not None:
            part.unhandled.discard(offset)

    def handled_many(self, items: Iterable[tuple[PartitionKey, int]]) -> None:
        for key, offset in items:
            self.handled(key, offset)

    def position(self, key: PartitionKey) -> int | None:
        """The offset to commit for this partition: the first one not handled; None if nothing
        was fetched."""
        part = self._partitions.get(key)
        if part is None or part.next_offset is None:
            return None
        if part.unhandled:
            return min(part.unhandled)
        return part.next_offset

    def unhandled_count(self, key: PartitionKey | None = None) -> int:
        if key is not None:
            part = self._partitions.get(key)
            return len(part.unhandled) if part else 0
        return sum(len(p.unhandled) for p in self._partitions.values())

    def to_commit(self, keys: Iterable[PartitionKey] | None = None, *,
                  unsent: bool = False) -> dict[PartitionKey, int]:
        """Positions that advanced since the last commit (optionally only for ``keys``); with
        ``unsent``, also past the last asynchronous commit sent (so one is not sent twice)."""
        selected = self._partitions.keys() if keys is None else keys
        out: dict[PartitionKey, int] = {}
        for key in selected:
            pos = self.position(key)
            if pos is None:
                continue
            part = self._partitions[key]
            if part.committed is not None and pos <= part.committed:
                continue
            if unsent and part.sent is not None and pos <= part.sent:
                continue
            out[key] = pos
        return out

    def mark_sent(self, positions: dict[PartitionKey, int]) -> None:
        """Asynchronous commits of ``positions`` are on their way."""
        for key, pos in positions.items():
            part = self._partitions.get(key)
            if part is not None and (part.sent is None or pos > part.sent):
                part.sent = pos

    def unsend(self, keys: Iterable[PartitionKey]) -> None:
        """An asynchronous commit failed: send these partitions' positions again next time."""
        for key in keys:
            part = self._partitions.get(key)
            if part is not None:
                part.sent = part.committed

    def caught_up(self, key: PartitionKey) -> int | None:
        """The committed position when everything fetched is handled and committed (an idle
        partition), else None."""
        part = self._partitions.get(key)
        if part is None or part.unhandled or part.committed is None:
            return None
        return part.committed if part.committed == part.next_offset else None

    def mark_committed(self, positions: dict[PartitionKey, int]) -> None:
        for key, pos in positions.items():
            part = self._partitions.get(key)
            if part is not None and (part.committed is None or pos > part.committed):
                part.committed = pos

    def forget(self, keys: Iterable[PartitionKey]) -> None:
        """Drop all state for partitions we no longer own (revoked, lost) or just got
        (re)assigned: the broker's committed offset is the truth for a new owner."""
        for key in keys:
            self._partitions.pop(key, None)

    def partitions(self) -> list[PartitionKey]:
        return list(self._partitions)
