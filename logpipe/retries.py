"""Per-partition retry bookkeeping: which messages wait for another attempt, and until when.

Pure data structure, no Kafka calls. A partition with messages waiting (or a retry of them in
flight) is *held*: the consumer pauses it, so its later messages are not fetched, and every other
partition keeps moving. That is what stops one document that keeps failing from stalling every
partition the consumer owns; its own partition waits, because a commit never passes it.

Backoff grows per partition (``attempt``) and resets once nothing of the partition waits any more.
Messages are taken back in offset order when their partition is due.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from logpipe.offsets import PartitionKey


class _Message(Protocol):
    @property
    def key(self) -> PartitionKey: ...

    @property
    def offset(self) -> int: ...


M = TypeVar("M", bound=_Message)


@dataclass(slots=True)
class _Held(Generic[M]):
    waiting: list[M] = field(default_factory=list)
    due: float = 0.0
    attempt: int = 0
    # Messages taken for a retry whose answer has not been settled yet.
    out: int = 0


class RetryQueue(Generic[M]):
    def __init__(self) -> None:
        self._held: dict[PartitionKey, _Held[M]] = {}

    def __bool__(self) -> bool:
        return bool(self._held)

    def __len__(self) -> int:
        return sum(len(h.waiting) + h.out for h in self._held.values())

    def attempt(self, keys: Iterable[PartitionKey]) -> int:
        """The highest attempt count among ``keys`` (0 for partitions not held)."""
        return max((self._held[k].attempt for k in keys if k in self._held), default=0)

    def add(self, messages: Iterable[M], due: float) -> None:
        """Messages to try again at ``due``; counts one more attempt for each partition."""
        counted: set[PartitionKey] = set()
        for m in messages:
            held = self._held.setdefault(m.key, _Held())
            held.waiting.append(m)
            if m.key not in counted:
                counted.add(m.key)
                held.attempt += 1
                held.due = max(held.due, due)

    def hold(self, message: M, now: float) -> bool:
        """Keep a message of a held partition (it arrived after the pause took effect) for its
        partition's next retry; False if the partition is not held."""
        held = self._held.get(message.key)
        if held is None:
            return False
        held.waiting.append(message)
        if not held.due:
            held.due = now
        return True

    def take_due(self, now: float) -> list[M]:
        """Every waiting message of the partitions due by ``now``, in offset order per partition;
        they count as out until ``settle``."""
        out: list[M] = []
        for held in self._held.values():
            if held.waiting and held.due <= now:
                batch = sorted(held.waiting, key=lambda m: m.offset)
                held.waiting = []
                held.out += len(batch)
                out.extend(batch)
        return out

    def settle(self, messages: Iterable[M]) -> None:
        """Retried messages whose answer is in (whatever it was: failures are ``add``ed again)."""
        for m in messages:
            held = self._held.get(m.key)
            if held is not None and held.out:
                held.out -= 1

    def release(self) -> set[PartitionKey]:
        """Forget partitions with nothing waiting or out: they may be resumed."""
        free = {k for k, h in self._held.items() if not h.waiting and not h.out}
        for key in free:
            del self._held[key]
        return free

    def next_due(self) -> float | None:
        dues = [h.due for h in self._held.values() if h.waiting]
        return min(dues) if dues else None

    def partitions(self) -> set[PartitionKey]:
        return set(self._held)

    def drop(self, keys: Iterable[PartitionKey]) -> int:
        """Forget partitions we no longer own; the number of waiting messages dropped."""
        dropped = 0
        for key in keys:
            held = self._held.pop(key, None)
            if held is not None:
                dropped += len(held.waiting)
        return dropped
