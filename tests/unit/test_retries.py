"""RetryQueue: per-partition holding of messages waiting for another attempt."""

from __future__ import annotations

from dataclasses import dataclass

from logpipe.retries import RetryQueue


@dataclass
class Msg:
    key: tuple[str, int]
    offset: int


def test_partitions_are_due_on_their_own_and_in_offset_order() -> None:
    q: RetryQueue[Msg] = RetryQueue()
    q.add([Msg(("t", 0), 5), Msg(("t", 0), 3)], due=10.0)
    q.add([Msg(("t", 1), 7)], due=20.0)
    assert q.partitions() == {("t", 0), ("t", 1)} and q.next_due() == 10.0
    assert q.take_due(9.0) == []
    taken = q.take_due(10.0)
    assert [m.offset for m in taken] == [3, 5]
    # Out, not settled: partition 0 stays held (paused) until its answer is in.
    assert q.release() == set() and ("t", 0) in q.partitions()
    q.settle(taken)
    assert q.release() == {("t", 0)}
    assert q.partitions() == {("t", 1)} and len(q) == 1


def test_attempts_grow_per_partition_and_reset_once_released() -> None:
    q: RetryQueue[Msg] = RetryQueue()
    m = Msg(("t", 0), 1)
    q.add([m], due=1.0)
    assert q.attempt([("t", 0)]) == 1
    q.settle(q.take_due(1.0))
    q.add([m], due=2.0)
    assert q.attempt([("t", 0), ("t", 9)]) == 2
    q.settle(q.take_due(2.0))
    q.release()
    assert q.attempt([("t", 0)]) == 0 and not q


def test_a_late_message_of_a_held_partition_waits_with_it_and_drop_forgets() -> None:
    q: RetryQueue[Msg] = RetryQueue()
    assert not q.hold(Msg(("t", 0), 9), now=0.0)  # not held: goes into a normal batch
    q.add([Msg(("t", 0), 4)], due=3.0)
    assert q.hold(Msg(("t", 0), 9), now=0.0)
    assert [m.offset for m in q.take_due(3.0)] == [4, 9]
    q.add([Msg(("t", 1), 2)], due=1.0)
    assert q.drop([("t", 1), ("t", 2)]) == 1 and q.partitions() == {("t", 0)}
