"""The partitions a consumer owns, and what it knows of each besides offsets (``offsets.py``).

Pure data structure, no Kafka calls. Every assign and every drop (revoke, loss) starts a new
*generation* of a partition, so a message fetched under an earlier ownership is recognized and
left to the partition's next owner instead of being counted or committed.
"""

from __future__ import annotations

from collections.abc import Iterable

from logpipe.offsets import PartitionKey


class Ownership:
    def __init__(self) -> None:
        self.owned: set[PartitionKey] = set()
        # Partitions paused by the consumer (held for a retry, or everything at shutdown).
        self.paused: set[PartitionKey] = set()
        self._generation: dict[PartitionKey, int] = {}
        # Read to the end (run-once mode asks librdkafka for end-of-partition events).
        self._at_end: set[PartitionKey] = set()
        # When each partition was last committed (monotonic), for the idle refresh.
        self._committed_at: dict[PartitionKey, float] = {}

    def __len__(self) -> int:
        return len(self.owned)

    def __contains__(self, key: object) -> bool:
        return key in self.owned

    def assign(self, keys: Iterable[PartitionKey]) -> None:
        for key in keys:
            self._generation[key] = self._generation.get(key, 0) + 1
            self.owned.add(key)
            self._at_end.discard(key)

    def drop(self, keys: Iterable[PartitionKey]) -> None:
        for key in keys:
            self._generation[key] = self._generation.get(key, 0) + 1
            self._committed_at.pop(key, None)
            self.owned.discard(key)
            self.paused.discard(key)
            self._at_end.discard(key)

    def generation(self, key: PartitionKey) -> int:
        return self._generation.get(key, 0)

    def owns(self, key: PartitionKey, generation: int) -> bool:
        """Still ours, and under the ownership the message was fetched in."""
        return key in self.owned and self._generation.get(key, 0) == generation

    def reached_end(self, key: PartitionKey, at_end: bool = True) -> None:
        if at_end:
            self._at_end.add(key)
        else:
            self._at_end.discard(key)

    def read_to_end(self) -> bool:
        """Every owned partition has been read to its end (and at least one is owned)."""
        return bool(self.owned) and self._at_end >= self.owned

    def repause(self, want: set[PartitionKey]) -> tuple[set[PartitionKey], set[PartitionKey]]:
        """Record ``want`` (owned ones) as paused: (to pause, to resume)."""
        want = want & self.owned
        pause, resume = want - self.paused, (self.paused - want) & self.owned
        self.paused = want
        return pause, resume

    def committed(self, keys: Iterable[PartitionKey], now: float) -> None:
        self._committed_at.update(dict.fromkeys(keys, now))

    def not_committed_for(self, seconds: float, now: float) -> list[PartitionKey]:
        """Owned partitions whose last commit is at least ``seconds`` old (a partition never
        committed yet starts its clock now)."""
        for key in self.owned:
            self._committed_at.setdefault(key, now)
        return [k for k in self.owned if now - self._committed_at[k] >= seconds]
