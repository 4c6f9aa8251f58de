"""Offset bookkeeping: the commit position never passes an unhandled offset."""

from __future__ import annotations

from logpipe.offsets import OffsetTracker, commit_metadata, committed_at

P0 = ("web-logs-topic", 0)
P1 = ("web-logs-topic", 1)


def fetch(tracker: OffsetTracker, key: tuple[str, int], offsets: range | list[int]) -> None:
    for offset in offsets:
        tracker.fetched(key, offset)


def test_nothing_fetched_has_no_position() -> None:
    tracker = OffsetTracker()
    assert tracker.position(P0) is None
    assert tracker.to_commit() == {}


def test_nothing_handled_stays_at_first_fetched() -> None:
    tracker = OffsetTracker()
    fetch(tracker, P0, range(10, 15))
    assert tracker.position(P0) == 10


def test_all_handled_is_last_plus_one() -> None:
    tracker = OffsetTracker()
    fetch(tracker, P0, range(0, 5))
    tracker.handled_many((P0, o) for o in range(5))
    assert tracker.position(P0) == 5
    assert tracker.to_commit() == {P0: 5}


def test_gap_in_handled_offsets_stops_the_position() -> None:
    tracker = OffsetTracker()
    fetch(tracker, P0, range(0, 10))
    for offset in (0, 1, 3, 4, 5, 9):
        tracker.handled(P0, offset)
    assert tracker.position(P0) == 2
    tracker.handled(P0, 2)
    assert tracker.position(P0) == 6
    tracker.handled(P0, 6)
    tracker.handled(P0, 7)
    assert tracker.position(P0) == 8
    tracker.handled(P0, 8)
    assert tracker.position(P0) == 10


def test_out_of_order_completion() -> None:
    tracker = OffsetTracker()
    fetch(tracker, P0, range(100, 106))
    for offset, expected in ((105, 100), (103, 100), (101, 100), (100, 102), (102, 104),
                             (104, 106)):
        tracker.handled(P0, offset)
        assert tracker.position(P0) == expected


def test_offsets_never_fetched_are_passed() -> None:
    # Compacted topics and transaction markers leave holes in the offsets we receive.
    tracker = OffsetTracker()
    fetch(tracker, P0, [4, 7, 8, 20])
    tracker.handled_many([(P0, 4), (P0, 7)])
    assert tracker.position(P0) == 8
    tracker.handled_many([(P0, 8), (P0, 20)])
    assert tracker.position(P0) == 21


def test_position_never_passes_an_unhandled_offset_exhaustive() -> None:
    import itertools

    offsets = list(range(6))
    for order in itertools.permutations(offsets):
        tracker = OffsetTracker()
        fetch(tracker, P0, offsets)
        handled: set[int] = set()
        for offset in order:
            tracker.handled(P0, offset)
            handled.add(offset)
            pos = tracker.position(P0)
            assert pos is not None
            assert all(o in handled for o in range(pos)), (order, pos)
            assert pos == len(offsets) or pos not in handled


def test_partitions_are_independent() -> None:
    tracker = OffsetTracker()
    fetch(tracker, P0, range(0, 3))
    fetch(tracker, P1, range(50, 53))
    tracker.handled_many([(P0, 0), (P0, 1), (P0, 2), (P1, 51)])
    assert tracker.to_commit() == {P0: 3, P1: 50}
    assert tracker.unhandled_count() == 2
    assert tracker.unhandled_count(P0) == 0
    assert tracker.to_commit([P1]) == {P1: 50}


def test_to_commit_only_reports_advanced_partitions() -> None:
    tracker = OffsetTracker()
    fetch(tracker, P0, range(0, 3))
    fetch(tracker, P1, range(0, 3))
    tracker.handled_many([(P0, 0), (P1, 0)])
    first = tracker.to_commit()
    assert first == {P0: 1, P1: 1}
    tracker.mark_committed(first)
    assert tracker.to_commit() == {}
    tracker.handled(P1, 1)
    assert tracker.to_commit() == {P1: 2}


def test_first_commit_of_unhandled_batch_is_its_first_offset() -> None:
    # Committing the fetch start is harmless and records the group's position.
    tracker = OffsetTracker()
    fetch(tracker, P0, range(7, 9))
    assert tracker.to_commit() == {P0: 7}
    tracker.mark_committed({P0: 7})
    assert tracker.to_commit() == {}


def test_mark_committed_never_moves_back() -> None:
    tracker = OffsetTracker()
    fetch(tracker, P0, range(0, 5))
    tracker.handled_many((P0, o) for o in range(5))
    tracker.mark_committed({P0: 5})
    tracker.mark_committed({P0: 3})
    fetch(tracker, P0, [5])
    tracker.handled(P0, 5)
    assert tracker.to_commit() == {P0: 6}


def test_forget_clears_revoked_or_lost_partition() -> None:
    tracker = OffsetTracker()
    fetch(tracker, P0, range(0, 5))
    fetch(tracker, P1, range(0, 5))
    tracker.handled(P0, 0)
    tracker.forget([P0])
    assert tracker.position(P0) is None
    assert tracker.to_commit() == {P1: 0}
    assert tracker.partitions() == [P1]
    # A late completion for a forgotten partition belongs to its new owner: ignored.
    tracker.handled(P0, 1)
    assert tracker.position(P0) is None


def test_reassigned_partition_starts_fresh() -> None:
    tracker = OffsetTracker()
    fetch(tracker, P0, range(10, 20))
    tracker.forget([P0])
    # The new owner (us again) re-reads from the committed offset, lower than before.
    fetch(tracker, P0, range(5, 8))
    assert tracker.position(P0) == 5
    tracker.handled_many((P0, o) for o in range(5, 8))
    assert tracker.position(P0) == 8


def test_redelivered_offsets_below_commit_are_ignored() -> None:
    tracker = OffsetTracker()
    fetch(tracker, P0, range(0, 4))
    tracker.handled_many((P0, o) for o in range(4))
    tracker.mark_committed(tracker.to_commit())
    fetch(tracker, P0, [2, 3, 4])
    assert tracker.position(P0) == 4
    tracker.handled(P0, 4)
    assert tracker.position(P0) == 5


def test_duplicate_fetch_and_handle_are_idempotent() -> None:
    tracker = OffsetTracker()
    fetch(tracker, P0, [0, 0, 1])
    tracker.handled(P0, 0)
    tracker.handled(P0, 0)
    assert tracker.position(P0) == 1
    assert tracker.unhandled_count(P0) == 1


def test_commit_metadata_round_trips_the_time() -> None:
    assert committed_at(commit_metadata(1764480000.123)) == 1764480000.123
    assert committed_at("") is None and committed_at(None) is None
    assert committed_at("set by another tool") is None


def test_caught_up_only_when_everything_fetched_is_handled_and_committed() -> None:
    t = OffsetTracker()
    assert t.caught_up(P0) is None
    t.fetched(P0, 0)
    t.fetched(P0, 1)
    t.handled(P0, 0)
    assert t.caught_up(P0) is None  # 1 still in hand
    t.handled(P0, 1)
    assert t.caught_up(P0) is None  # handled, not committed yet
    t.mark_committed({P0: 2})
    assert t.caught_up(P0) == 2
    t.fetched(P0, 2)
    assert t.caught_up(P0) is None
