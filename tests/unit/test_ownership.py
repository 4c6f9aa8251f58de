"""Ownership: generations tell a message fetched under an earlier ownership from a current one."""

from __future__ import annotations

from logpipe.ownership import Ownership

P0, P1 = ("t", 0), ("t", 1)


def test_a_reassigned_partition_is_a_new_generation() -> None:
    own = Ownership()
    own.assign([P0, P1])
    first = own.generation(P0)
    assert own.owns(P0, first) and len(own) == 2
    own.drop([P0])
    assert P0 not in own and not own.owns(P0, first)
    own.assign([P0])
    # Ours again, but a message fetched before the revoke belongs to whoever read it since.
    assert not own.owns(P0, first) and own.owns(P0, own.generation(P0))


def test_read_to_end_needs_every_owned_partition() -> None:
    own = Ownership()
    assert not own.read_to_end()
    own.assign([P0, P1])
    own.reached_end(P0)
    assert not own.read_to_end()
    own.reached_end(P1)
    assert own.read_to_end()
    own.reached_end(P1, False)  # a new message arrived
    assert not own.read_to_end()


def test_repause_and_refresh_clock() -> None:
    own = Ownership()
    own.assign([P0, P1])
    assert own.repause({P0, ("t", 9)}) == ({P0}, set())
    assert own.repause({P1}) == ({P1}, {P0})
    own.drop([P1])
    assert own.paused == set()
    assert own.not_committed_for(60, now=100.0) == []
    own.committed([P0], now=100.0)
    assert own.not_committed_for(60, now=159.0) == []
    assert own.not_committed_for(60, now=160.0) == [P0]
