"""Example-based tests of the pure pool policy (`triopool._policy`).

No trio, no server, no clock: ``now`` is a float passed in, randomness is an
injected constant, and every test asserts the exact actions (and instants)
the policy decides.  The property-based counterpart is
``tests/test_policy_stateful.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import pytest

from triopool._policy import (
    Action,
    Close,
    Counters,
    Expire,
    Grant,
    Open,
    Outcome,
    PolicyClosed,
    PoolPolicy,
    QueueFull,
    ReconnectFailed,
    Reject,
    Reset,
    SlotState,
    Wake,
)

pytestmark = pytest.mark.psycopg_independent

Policy = PoolPolicy[str]
CLEAN, DIRTY, BROKEN = Outcome.CLEAN, Outcome.DIRTY, Outcome.BROKEN


def make(
    min_size: int = 0,
    max_size: int | None = 4,
    *,
    max_waiting: int = 0,
    max_idle: float = 600.0,
    max_lifetime: float = 3600.0,
    reconnect_timeout: float = 300.0,
    keep_idle: bool = True,
    pipeline_depth: int = 16,
    random: Callable[[], float] = lambda: 0.5,
) -> Policy:
    """An opened policy, min_size connected at 0."""
    policy = Policy(
        min_size=min_size,
        max_size=max_size,
        max_waiting=max_waiting,
        max_idle=max_idle,
        max_lifetime=max_lifetime,
        reconnect_timeout=reconnect_timeout,
        keep_idle=keep_idle,
        pipeline_depth=pipeline_depth,
        random=random,
    )
    for action in policy.open():
        if isinstance(action, Open):
            policy.connected(action.slot, 0.0, 0.0)
    policy.next_deadline()  # as the shell does after a Wake
    return policy


def queued(result: int | list[Action[str]]) -> list[Action[str]]:
    """The actions of a request that had to wait."""
    assert isinstance(result, list), f"expected to wait, was lent slot {result}"
    return result


def lent(result: int | list[Action[str]]) -> int:
    """The slot of a request served at once."""
    assert isinstance(result, int), f"expected a slot at once, got {result}"
    return result


def three_idle(
    release_times: Sequence[float], *, min_size: int = 1, max_idle: float = 10.0
) -> Policy:
    """Slots 0, 1, 2 (connected at 0), released clean at `release_times`."""
    policy = make(min_size, 3, max_idle=max_idle)
    assert lent(policy.request("a", 0.0)) == 0
    assert queued(policy.request("b", 0.0)) == [Open(1)]
    assert queued(policy.request("c", 0.0)) == [Open(2)]
    assert policy.connected(1, 0.0, 0.0) == [Grant("b", 1)]
    assert policy.connected(2, 0.0, 0.0) == [Grant("c", 2)]
    for slot, now in zip((0, 1, 2), release_times, strict=True):
        policy.release(slot, now, CLEAN)
    policy.next_deadline()
    assert policy.idle_slots() == [0, 1, 2]
    return policy


# -- start, queueing, fairness -------------------------------------------------


def test_start_opens_min_size_connections() -> None:
    policy = Policy(min_size=2, max_size=4)
    assert policy.open() == [Open(0), Open(1)]
    assert policy.size == 2
    assert policy.count(SlotState.CONNECTING) == 2
    # The first connection to become idle sets a timer (its max_lifetime).
    assert policy.connected(0, 0.0, 0.0) == [Wake()]
    assert policy.next_deadline() == 3420.0  # 3600 * (1 - 0.1 * 0.5)
    assert policy.connected(1, 0.0, 0.0) == []
    assert policy.idle_slots() == [0, 1]


def test_waiters_are_served_in_fifo_order() -> None:
    policy = make(0, 1)
    assert queued(policy.request("a", 0.0)) == [Open(0)]
    for waiter in "bcde":
        assert queued(policy.request(waiter, 0.0)) == []
    assert policy.waiters() == ["a", "b", "c", "d", "e"]
    assert policy.connected(0, 1.0, 1.0) == [Grant("a", 0)]
    assert policy.release(0, 2.0, CLEAN) == [Grant("b", 0)]
    policy.cancel("c", 2.0)  # leaving from the middle keeps the order of the others
    assert policy.release(0, 3.0, CLEAN) == [Grant("d", 0)]
    assert policy.release(0, 4.0, CLEAN) == [Grant("e", 0)]
    assert policy.waiters() == []


def test_idle_connections_are_lent_lifo() -> None:
    policy = three_idle([1.0, 2.0, 3.0])
    assert [lent(policy.request(w, 4.0)) for w in "xyz"] == [2, 1, 0]
    assert policy.available == 0


def test_max_waiting_raises_queue_full_and_changes_no_queue() -> None:
    policy = make(0, 1, max_waiting=2)
    assert queued(policy.request("a", 0.0)) == [Open(0)]
    assert queued(policy.request("b", 0.0)) == []
    with pytest.raises(QueueFull):
        policy.request("c", 0.0)
    assert policy.waiters() == ["a", "b"]
    assert policy.size == 1
    assert policy.counters.requests_errors == 1
    assert policy.counters.requests_num == 2


def test_closed_pool_raises_policy_closed() -> None:
    policy = make(1, 1)
    assert policy.close() == [Close(0)]
    with pytest.raises(PolicyClosed):
        policy.request("a", 0.0)
    assert policy.waiters() == []
    assert policy.counters.requests_errors == 1


def test_past_deadline_expires_at_once_unless_a_connection_is_idle() -> None:
    policy = make(1, 2)
    assert lent(policy.request("a", 5.0, deadline=5.0)) == 0
    # "b" will not wait: it expires at once, but the pool grows for it, so that
    # a next request (a retry of b, say) may be served (issue 15 #6).
    assert policy.request("b", 5.0, deadline=5.0) == [Open(1), Expire("b", 0.0)]
    assert policy.waiters() == []
    assert policy.counters.requests_errors == 1
    assert policy.connected(1, 5.5, 0.5) == [Wake()]  # (its max_idle timer)
    assert lent(policy.request("c", 6.0, deadline=6.0)) == 1


def test_past_deadline_in_a_null_pool_opens_nothing() -> None:
    policy = make(0, None, keep_idle=False)
    assert policy.request("a", 5.0, deadline=5.0) == [Expire("a", 0.0)]
    assert policy.size == 0


def test_waiter_deadline_expires_at_the_exact_instant() -> None:
    policy = make(0, 1)
    assert queued(policy.request("a", 1.0, deadline=6.0)) == [Wake(), Open(0)]
    assert policy.next_deadline() == 6.0
    assert policy.tick(5.999) == []
    assert policy.tick(6.0) == [Expire("a", 5.0)]
    assert policy.waiters() == []
    assert policy.next_deadline() == math.inf
    # The connection opened for it becomes idle; nobody else is served by it.
    assert policy.connected(0, 7.0, 1.0) == [Wake()]
    assert policy.idle_slots() == [0]


# -- growing --------------------------------------------------------------------


def test_grow_opens_one_connection_per_waiter_up_to_max_size() -> None:
    policy = make(0, 3)
    assert queued(policy.request("a", 0.0)) == [Open(0)]
    assert queued(policy.request("b", 0.0)) == [Open(1)]
    assert queued(policy.request("c", 0.0)) == [Open(2)]
    assert queued(policy.request("d", 0.0)) == []
    assert policy.size == 3
    assert policy.connected(1, 1.0, 1.0) == [Grant("a", 1)]
    assert policy.connected(0, 1.0, 1.0) == [Grant("b", 0)]
    assert policy.connected(2, 1.0, 1.0) == [Grant("c", 2)]
    assert policy.release(0, 2.0, CLEAN) == [Grant("d", 0)]
    assert policy.size == 3


def test_grow_counts_incoming_connections() -> None:
    policy = make(1, 4)
    assert lent(policy.request("a", 0.0)) == 0
    assert policy.release(0, 1.0, DIRTY) == [Reset(0)]
    # The connection being reset will serve the first waiter.
    assert queued(policy.request("b", 1.0)) == []
    assert queued(policy.request("c", 1.0)) == [Open(1)]
    assert queued(policy.request("d", 1.0)) == [Open(2)]
    policy.cancel("d", 1.0)
    # A resize opens only what the waiters still lack: 2 waiters, 2 incoming.
    assert policy.resize(1, 8) == [Wake()]
    assert queued(policy.request("e", 1.0)) == []  # slot 2 is still coming
    assert queued(policy.request("f", 1.0)) == [Open(3)]


# -- shrinking and expiry ---------------------------------------------------------


def test_idle_surplus_closed_after_exactly_max_idle() -> None:
    policy = three_idle([1.0, 2.0, 3.0])  # min_size=1, max_idle=10
    assert policy.next_deadline() == 11.0
    assert policy.tick(10.999) == []
    assert policy.tick(11.0) == [Close(0)]  # least recently used first
    assert policy.closed_slot(0) == []
    assert policy.next_deadline() == 12.0
    assert policy.tick(12.0) == [Close(1)]
    assert policy.closed_slot(1) == []
    # At min_size: only the lifetime of the last one is left to watch.
    assert policy.next_deadline() == 3420.0
    assert policy.tick(13.0) == []
    assert policy.idle_slots() == [2]


def test_idle_shrink_stops_at_min_size_when_several_are_due_together() -> None:
    policy = three_idle([1.0, 1.0, 1.0])  # min_size=1, max_idle=10
    assert policy.next_deadline() == 11.0
    # Two are surplus; the most recently used one stays.
    assert policy.tick(11.0) == [Close(0), Close(1)]
    assert policy.idle_slots() == [2]


def test_idle_shrink_does_not_count_connections_being_closed() -> None:
    policy = three_idle([1.0, 1.0, 1.0])  # min_size=1, max_idle=10
    for waiter in "xy":
        policy.request(waiter, 2.0)  # lends 2, then 1
    assert policy.release(2, 3.0, BROKEN) == [Close(2)]  # its close is in progress
    assert policy.release(1, 3.0, BROKEN) == [Close(1)]
    # Slot 0 is the only connection left (min_size=1): idle for long, but kept.
    assert policy.tick(11.0) == []
    assert policy.idle_slots() == [0]


@pytest.mark.parametrize(("random", "expires_at"), [(0.0, 3605.0), (0.5, 3425.0), (1.0, 3245.0)])
def test_idle_connection_replaced_at_max_lifetime_with_jitter(
    random: float, expires_at: float
) -> None:
    # max_lifetime=3600 is reduced by up to 10 %: random() * 0.1 of it.
    policy = Policy(min_size=1, max_size=2, random=lambda: random)
    assert policy.open() == [Open(0)]
    assert policy.next_deadline() == math.inf
    assert policy.connected(0, 5.0, 0.0) == [Wake()]
    assert policy.next_deadline() == expires_at
    assert policy.tick(expires_at - 0.001) == []
    assert policy.tick(expires_at) == [Close(0)]
    assert policy.closed_slot(0) == [Open(1)]


def test_lent_connection_past_max_lifetime_is_closed_when_it_comes_back() -> None:
    policy = make(1, 1, max_lifetime=100.0)  # slot 0 connected at 0: expires at 95
    assert lent(policy.request("a", 10.0)) == 0
    assert queued(policy.request("b", 20.0)) == []
    assert queued(policy.request("c", 30.0)) == []
    assert policy.release(0, 94.0, CLEAN) == [Grant("b", 0)]
    assert policy.release(0, 95.0, CLEAN) == [Close(0)]  # not handed to c
    assert policy.closed_slot(0) == [Open(1)]
    assert policy.connected(1, 96.0, 1.0) == [Grant("c", 1)]


# -- reconnecting -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("random", "delays"),
    [
        # Failures at 0, 1, 3, 7: the last delay is capped to end at 0 + 10.
        (0.5, [1.0, 2.0, 4.0, 3.0]),
        (0.0, [0.9, 1.8, 3.6, 3.7]),  # -10 %
        (1.0, [1.1, 2.2, 4.4, 2.3]),  # +10 %
    ],
)
def test_reconnect_backoff_doubles_with_jitter_until_reconnect_timeout(
    random: float, delays: list[float]
) -> None:
    policy = Policy(min_size=1, max_size=2, reconnect_timeout=10.0, random=lambda: random)
    assert policy.open() == [Open(0)]
    now, got = 0.0, []
    while True:
        delay, actions = policy.connect_failed(0, now, f"failed at {now}")
        if delay is None:
            break
        assert actions == []
        got.append(delay)
        now += delay
    assert got == pytest.approx(delays)
    assert now == 10.0
    # Given up: the callback, and a new attempt since the pool is below min_size,
    # after a first backoff delay (1 s, with the same jitter).
    assert actions[0] == ReconnectFailed()
    reopen = actions[1]
    assert isinstance(reopen, Open)
    assert actions[1:] == [Open(1, after=reopen.after)]
    assert reopen.after == pytest.approx(delays[0])
    assert policy.state_of(0) is None
    assert policy.counters.connections_errors == len(delays) + 1
    assert policy.counters.connections_num == len(delays) + 1  # failed attempts count
    assert policy.last_error == "failed at 10.0"
    assert policy.connect_failed(1, 10.0, "again") == (got[0], [])  # a fresh backoff
    assert policy.connected(1, 11.0, 0.5) == [Wake()]
    assert policy.last_error is None


def test_connection_given_up_is_attempted_again_for_a_waiter() -> None:
    policy = make(0, 1, reconnect_timeout=2.0)
    assert queued(policy.request("a", 0.0)) == [Open(0)]
    assert policy.connect_failed(0, 0.0, "down") == (1.0, [])
    assert policy.connect_failed(0, 1.0, "down") == (1.0, [])  # capped: 2 s after the first
    assert policy.connect_failed(0, 2.0, "down") == (
        None,
        [ReconnectFailed(), Open(1, after=1.0)],
    )
    assert policy.connected(1, 3.0, 0.5) == [Grant("a", 1)]


def test_failing_connection_nobody_needs_is_abandoned() -> None:
    policy = make(0, 3)
    assert queued(policy.request("a", 0.0)) == [Open(0)]
    assert queued(policy.request("b", 0.0)) == [Open(1)]
    assert policy.connect_failed(0, 0.0, "down") == (1.0, [])
    policy.cancel("b", 0.5)
    # Slot 1 is enough for "a": slot 0 gives up, silently (no ReconnectFailed).
    assert policy.connect_failed(0, 1.0, "down") == (None, [])
    assert policy.state_of(0) is None
    policy.cancel("a", 1.5)
    assert policy.connect_failed(1, 2.0, "down") == (None, [])
    assert policy.size == 0
    assert policy.counters.connections_errors == 3


# -- drain, resize, close ------------------------------------------------------------


def test_drain_closes_idle_at_once_and_lent_when_they_come_back() -> None:
    policy = make(2, 3)  # idle [0, 1]
    assert lent(policy.request("a", 1.0)) == 1
    assert policy.drain() == [Close(0)]
    assert policy.release(1, 2.0, CLEAN) == [Close(1)]
    assert policy.closed_slot(0) == [Open(2)]
    assert policy.closed_slot(1) == [Open(3)]
    policy.connected(2, 3.0, 0.0)
    policy.connected(3, 3.0, 0.0)
    assert policy.idle_slots() == [2, 3]
    assert policy.counters.connections_lost == 0


def test_drain_since_slot_drains_once_per_generation() -> None:
    policy = make(2, 2)  # idle [0, 1], generation 0
    assert policy.drain(since_slot=0) == [Close(0), Close(1)]
    # The other old connection failing too must not drain the new ones.
    assert policy.drain(since_slot=1) == []
    assert policy.closed_slot(0) == [Open(2)]
    assert policy.closed_slot(1) == [Open(3)]
    assert policy.drain(since_slot=1) == []  # forgotten slot
    policy.connected(2, 1.0, 0.0)
    policy.connected(3, 1.0, 0.0)
    assert policy.drain(since_slot=3) == [Close(2), Close(3)]


def test_connection_established_after_a_drain_is_kept() -> None:
    """As psycopg_pool's: what counts is when a connection was made, not when its
    attempt began (else drains faster than a connection is made serve nobody)."""
    policy = make(0, 2)
    assert queued(policy.request("a", 0.0)) == [Open(0)]
    assert policy.drain() == []
    assert policy.connected(0, 1.0, 1.0) == [Grant("a", 0)]
    assert policy.drain() == []  # lent: closed when it comes back
    assert policy.release(0, 2.0, CLEAN) == [Close(0)]


def test_resize_up_refills_and_grows_for_waiters() -> None:
    policy = make(1, 2)  # idle [0]
    assert lent(policy.request("a", 0.0)) == 0
    assert queued(policy.request("b", 0.0)) == [Open(1)]
    assert queued(policy.request("c", 0.0)) == []
    assert queued(policy.request("d", 0.0)) == []
    # Refill to 3 (slot 2), then one more for the 3 waiters with 2 incoming.
    assert policy.resize(3, 5) == [Open(2), Open(3), Wake()]
    assert (policy.min_size, policy.max_size) == (3, 5)


def test_resize_down_closes_only_the_surplus_idle_connections() -> None:
    policy = three_idle([1.0, 2.0, 3.0])  # min_size=1, max_size=3
    assert policy.resize(1, 2) == [Close(0), Wake()]
    assert policy.idle_slots() == [1, 2]


def test_resize_down_closes_lent_surplus_when_it_comes_back() -> None:
    policy = three_idle([1.0, 2.0, 3.0])
    assert [lent(policy.request(w, 4.0)) for w in "xyz"] == [2, 1, 0]
    assert policy.resize(1, 1) == [Wake()]
    assert policy.next_deadline() == math.inf
    assert policy.release(2, 5.0, CLEAN) == [Close(2)]
    assert policy.closed_slot(2) == []
    assert policy.release(1, 5.0, CLEAN) == [Close(1)]
    assert policy.closed_slot(1) == []
    assert policy.release(0, 5.0, CLEAN) == [Wake()]
    assert policy.idle_slots() == [0]
    assert policy.size == 1


def test_close_rejects_waiters_closes_connecting_and_lent_on_return() -> None:
    policy = make(1, 2)
    assert lent(policy.request("a", 0.0)) == 0
    assert queued(policy.request("b", 0.0)) == [Open(1)]
    assert queued(policy.request("c", 0.0)) == []
    assert policy.close() == [Reject("b"), Reject("c"), Close(1)]
    assert policy.waiters() == []
    assert policy.close() == []
    assert policy.release(0, 1.0, CLEAN) == [Close(0)]
    assert policy.closed_slot(1) == []  # nothing reopened
    assert policy.closed_slot(0) == []
    assert policy.size == 0
    assert policy.counters.requests_errors == 2


def test_close_closes_idle_at_once_and_resetting_when_done() -> None:
    policy = make(3, 3)  # idle [0, 1, 2]
    assert lent(policy.request("a", 0.0)) == 2
    assert policy.release(2, 1.0, DIRTY) == [Reset(2)]
    assert policy.close() == [Close(0), Close(1)]
    assert policy.reset_done(2, 2.0, ok=True) == [Close(2)]
    assert [policy.closed_slot(slot) for slot in (0, 1, 2)] == [[], [], []]
    assert policy.next_deadline() == math.inf


# -- the null pool --------------------------------------------------------------------


def test_null_pool_keeps_nothing_idle() -> None:
    policy = make(0, None, keep_idle=False)
    assert queued(policy.request("a", 0.0)) == [Open(0)]
    assert policy.connected(0, 1.0, 1.0) == [Grant("a", 0)]
    assert queued(policy.request("b", 1.0)) == [Open(1)]
    # A connection coming back serves the first waiter...
    assert policy.release(0, 2.0, CLEAN) == [Grant("b", 0)]
    # ...so the one opened for it is closed, not kept.
    assert policy.connected(1, 2.0, 1.0) == [Close(1)]
    assert policy.release(0, 3.0, CLEAN) == [Close(0)]
    assert policy.available == 0
    assert policy.next_deadline() == math.inf


def test_null_pool_resets_a_dirty_return_only_for_a_waiter() -> None:
    policy = make(0, 1, keep_idle=False)
    assert queued(policy.request("a", 0.0)) == [Open(0)]
    assert queued(policy.request("b", 0.0)) == []
    assert policy.connected(0, 1.0, 1.0) == [Grant("a", 0)]
    assert policy.release(0, 2.0, DIRTY) == [Reset(0)]
    assert policy.reset_done(0, 3.0, ok=True) == [Grant("b", 0)]
    assert policy.release(0, 4.0, DIRTY) == [Close(0)]
    assert policy.closed_slot(0) == []
    assert policy.size == 0


# -- returns ----------------------------------------------------------------------------


def test_dirty_return_is_reset_before_serving_again() -> None:
    policy = make(1, 1)
    assert lent(policy.request("a", 0.0)) == 0
    assert policy.release(0, 1.0, DIRTY) == [Reset(0)]
    assert policy.state_of(0) is SlotState.RESETTING
    assert queued(policy.request("b", 1.0)) == []
    assert policy.reset_done(0, 2.0, ok=True) == [Grant("b", 0)]
    assert policy.release(0, 3.0, DIRTY) == [Reset(0)]
    assert policy.reset_done(0, 4.0, ok=True) == []
    assert policy.idle_slots() == [0]
    assert policy.counters.returns_bad == 0


def test_failed_reset_closes_counts_a_bad_return_and_refills() -> None:
    policy = make(1, 1)
    assert lent(policy.request("a", 0.0)) == 0
    assert policy.release(0, 1.0, DIRTY) == [Reset(0)]
    assert policy.reset_done(0, 2.0, ok=False) == [Close(0)]
    assert policy.counters.returns_bad == 1
    assert policy.closed_slot(0) == [Open(1)]
    assert policy.counters.connections_lost == 0


def test_broken_return_closes_counts_a_bad_return_and_refills() -> None:
    policy = make(1, 1)
    assert lent(policy.request("a", 0.0)) == 0
    assert queued(policy.request("b", 0.0)) == []
    assert policy.release(0, 1.0, BROKEN) == [Close(0)]
    assert policy.counters.returns_bad == 1
    assert policy.closed_slot(0) == [Open(1)]
    assert policy.connected(1, 2.0, 1.0) == [Grant("b", 1)]
    assert policy.counters.connections_lost == 0


def test_connection_found_broken_by_the_pool_counts_as_lost() -> None:
    policy = make(2, 2)  # idle [0, 1]
    policy.pop_counters()
    policy.take_idle(0, 5.0)
    assert policy.idle_slots() == [1]
    assert policy.release(0, 6.0, BROKEN, by_pool=True) == [Close(0)]
    policy.take_idle(1, 5.0)
    assert policy.release(1, 6.0, CLEAN, by_pool=True) == []
    assert policy.idle_slots() == [1]
    counters = policy.pop_counters()
    assert counters == Counters(connections_lost=1)  # not a bad return, not usage
    assert policy.closed_slot(0) == [Open(2)]


def test_connection_lost_while_idle_is_counted_and_replaced() -> None:
    policy = make(1, 1)
    assert policy.closed_slot(0) == [Open(1)]
    assert policy.available == 0
    assert policy.counters.connections_lost == 1


# -- statistics and timers -----------------------------------------------------------


def test_counters_and_pop_counters() -> None:
    policy = make(0, 1)
    assert queued(policy.request("a", 0.0)) == [Open(0)]
    assert queued(policy.request("b", 0.0, deadline=2.0)) == [Wake()]
    assert policy.next_deadline() == 2.0
    assert policy.connected(0, 0.25, 0.25) == [Grant("a", 0)]  # a waited 250 ms
    assert policy.tick(2.0) == [Expire("b", 2.0)]  # b waited 2000 ms, in error
    assert policy.release(0, 2.5, BROKEN) == [Close(0)]  # used 2250 ms, bad
    assert policy.closed_slot(0) == []
    assert queued(policy.request("c", 3.0)) == [Open(1)]
    assert policy.connect_failed(1, 3.5, "down") == (1.0, [])
    policy.cancel("c", 4.0, timed_out=True)  # waited 1000 ms, in error
    # Will not wait: in error at once (slot 1, still trying, is coming for it).
    assert policy.request("d", 5.0, deadline=5.0) == [Expire("d", 0.0)]
    assert policy.connect_failed(1, 4.5, "down") == (None, [])
    expected = Counters(
        requests_num=4,
        requests_queued=3,
        requests_wait_ms=3250,
        requests_errors=3,
        returns_bad=1,
        connections_num=3,  # attempts, failed ones included (as psycopg_pool)
        connections_ms=250,
        connections_errors=2,
        connections_lost=0,
        usage_ms=2250,
    )
    assert policy.counters == expected
    assert policy.pop_counters() == expected
    assert policy.counters == Counters()
    # Served at once: counted, not queued, no wait.
    policy.resize(1, 1)
    policy.connected(2, 6.0, 0.5)
    assert lent(policy.request("e", 7.0)) == 2
    assert policy.release(2, 7.5, CLEAN) == []
    assert policy.pop_counters() == Counters(
        requests_num=1, connections_num=1, connections_ms=500, usage_ms=500
    )


def test_wake_only_when_a_deadline_moves_earlier() -> None:
    policy = make(0, 2, max_idle=10.0)
    assert policy.next_deadline() == math.inf
    assert queued(policy.request("a", 0.0, deadline=10.0)) == [Wake(), Open(0)]
    assert policy.next_deadline() == 10.0
    assert queued(policy.request("b", 0.0, deadline=20.0)) == [Open(1)]
    assert queued(policy.request("c", 0.0, deadline=5.0)) == [Wake()]
    assert policy.next_deadline() == 5.0
    policy.cancel("c", 1.0)
    assert policy.next_deadline() == 10.0  # the cancelled waiter's deadline is dropped
    assert policy.connected(0, 2.0, 1.0) == [Grant("a", 0)]
    assert policy.connected(1, 2.0, 1.0) == [Grant("b", 1)]
    assert policy.next_deadline() == math.inf
    # An idle connection above min_size is to be closed after max_idle.
    assert policy.release(0, 3.0, CLEAN) == [Wake()]
    assert policy.next_deadline() == 13.0
    assert policy.release(1, 4.0, CLEAN) == []  # later than the timer already set
    assert policy.tick(13.0) == [Close(0)]
    assert policy.closed_slot(0) == []
    assert policy.next_deadline() == 14.0


def test_illegal_input_raises_key_error_and_changes_nothing() -> None:
    policy = make(1, 2)  # idle [0]
    before = (policy.idle_slots(), policy.state_of(0), policy.size, replace(policy.counters))
    with pytest.raises(KeyError):
        policy.release(0, 1.0, CLEAN)  # idle, not lent
    with pytest.raises(KeyError):
        policy.connected(0, 1.0, 0.0)
    with pytest.raises(KeyError):
        policy.connect_failed(0, 1.0, "x")
    with pytest.raises(KeyError):
        policy.reset_done(0, 1.0, ok=True)
    with pytest.raises(KeyError):
        policy.closed_slot(7)
    with pytest.raises(KeyError):
        policy.take_idle(7, 1.0)
    assert (policy.idle_slots(), policy.state_of(0), policy.size, policy.counters) == before
    assert lent(policy.request("a", 1.0)) == 0
    with pytest.raises(KeyError):
        policy.take_idle(0, 1.0)  # lent, not idle
    assert policy.state_of(0) is SlotState.LENT


# -- edges found by review (issue 15, issue 14 #4) ------------------------------------


def test_nothing_opens_before_open_and_sizes_changed_before_apply() -> None:
    policy = Policy(min_size=1, max_size=2)
    assert policy.resize(3, 4) == [Wake()]  # before open: only the numbers change
    assert policy.size == 0
    assert policy.open() == [Open(0), Open(1), Open(2)]


def test_an_attempt_started_while_nobody_waited_does_not_hold_waiters_back() -> None:
    policy = Policy(min_size=1, max_size=2)
    assert policy.open() == [Open(0)]  # say its configure hangs
    assert queued(policy.request("a", 0.0)) == [Open(1)]
    assert queued(policy.request("b", 0.0)) == []  # max_size reached
    assert policy.connected(1, 0.5, 0.5) == [Grant("a", 1)]


def test_reconnect_timeout_zero_gives_up_at_once_and_waits_before_the_next() -> None:
    policy = Policy(min_size=1, max_size=1, reconnect_timeout=0.0)
    assert policy.open() == [Open(0)]
    assert policy.connect_failed(0, 0.0, "down") == (None, [ReconnectFailed(), Open(1, 1.0)])
    assert policy.connect_failed(1, 1.0, "down") == (None, [ReconnectFailed(), Open(2, 1.0)])


def test_a_new_connection_serves_a_waiter_even_past_a_tiny_lifetime() -> None:
    policy = make(0, 1, max_lifetime=1e-9)
    assert queued(policy.request("a", 100.0)) == [Open(0)]
    assert policy.connected(0, 1e9, 0.0) == [Grant("a", 0)]  # expires_at == now here
    assert policy.release(0, 1e9, CLEAN) == [Close(0)]  # then it is replaced


def test_null_pool_request_with_room_is_not_queued() -> None:
    policy = make(0, 1, keep_idle=False, max_waiting=1)
    assert queued(policy.request("a", 0.0)) == [Open(0)]  # opened for it: not queued
    assert policy.waiting == 0
    assert queued(policy.request("b", 0.0)) == []  # no room: queued
    assert policy.waiting == 1
    with pytest.raises(QueueFull):  # max_waiting counts the queued only
        policy.request("c", 0.0)
    assert policy.connected(0, 1.0, 1.0) == [Grant("a", 0)]
    assert policy.release(0, 2.0, CLEAN) == [Grant("b", 0)]
    counters = policy.counters
    assert (counters.requests_num, counters.requests_queued) == (2, 1)
    assert counters.requests_wait_ms == 2000  # b's wait only


def test_idle_connection_found_dead_is_closed_counted_and_replaced() -> None:
    policy = make(1, 2)
    assert policy.idle_lost(0) == [Close(0)]  # it counts in size until closed
    assert policy.counters.connections_lost == 1
    assert policy.closed_slot(0) == [Open(1)]  # asked to close: not lost twice
    assert policy.counters.connections_lost == 1


def test_attempts_outside_slots_are_counted() -> None:
    policy = make(0, None, keep_idle=False)
    policy.attempted(0.25)
    policy.attempted(0.5, error="refused")
    assert policy.counters == Counters(connections_num=2, connections_ms=250, connections_errors=1)
    assert policy.last_error == "refused"


def test_dirty_return_to_a_closed_pool_is_closed_not_reset() -> None:
    policy = make(1, 1)
    assert lent(policy.request("a", 0.0)) == 0
    assert policy.close() == []
    assert policy.release(0, 1.0, DIRTY) == [Close(0)]


# -- one-shot statements: pipelining slots ---------------------------------------------


def statement(policy: Policy, waiter: str, now: float = 0.0) -> int | list[Action[str]]:
    return policy.request(waiter, now, statement=True)


def test_a_statement_takes_an_idle_slot_then_the_least_busy_pipelining_one() -> None:
    policy = make(2, 2, pipeline_depth=3)
    assert lent(statement(policy, "a")) == 1  # the top of the idle stack
    assert lent(statement(policy, "b")) == 0  # idle first: no wait behind "a"
    assert lent(statement(policy, "c")) == 1  # both carry one: the first found
    assert lent(statement(policy, "d")) == 0
    assert policy.statements_done(1, 1.0, 2) == []  # slot 1 now carries none...
    assert policy.state_of(1) is SlotState.IDLE  # ...so it is idle again
    assert lent(statement(policy, "e", 1.0)) == 1
    assert lent(statement(policy, "f", 1.0)) == 1  # 1 in flight against 2 on slot 0
    assert policy.count(SlotState.PIPELINING) == 2
    assert policy.counters.requests_num == 6 and policy.counters.requests_queued == 0


def test_depth_bounds_statements_in_flight_and_room_lets_the_next_in() -> None:
    policy = make(1, 1, pipeline_depth=2)
    assert lent(statement(policy, "a")) == 0
    assert lent(statement(policy, "b")) == 0
    assert queued(statement(policy, "c")) == []  # full, and no room to grow
    assert queued(statement(policy, "d")) == []
    assert policy.slots[0].in_flight == 2
    assert policy.statements_done(0, 1.0, 1) == [Grant("c", 0)]
    assert policy.statements_done(0, 2.0, 2) == [Grant("d", 0)]  # none left: dispatched
    assert policy.counters.requests_wait_ms == 1000 + 2000


def test_a_pipelining_slot_is_never_lent_and_fifo_holds_across_kinds() -> None:
    policy = make(1, 1, pipeline_depth=4)
    assert lent(statement(policy, "s1")) == 0
    assert queued(policy.request("borrower", 0.0)) == []  # no idle: waits
    # A statement arriving now waits behind the borrower, although slot 0 has room.
    assert queued(statement(policy, "s2")) == []
    assert policy.waiters() == ["borrower", "s2"]
    # The borrower gets the slot once it carries nothing; s2 then waits for it again.
    assert policy.statements_done(0, 1.0, 1) == [Grant("borrower", 0)]
    assert policy.state_of(0) is SlotState.LENT
    assert policy.release(0, 2.0, CLEAN) == [Grant("s2", 0)]
    assert policy.state_of(0) is SlotState.PIPELINING


def test_statements_behind_a_borrower_go_once_it_is_served() -> None:
    policy = make(2, 2, pipeline_depth=4)
    assert lent(statement(policy, "s1")) == 1
    assert lent(policy.request("b1", 0.0)) == 0
    assert queued(policy.request("b2", 0.0)) == []
    assert queued(statement(policy, "s2")) == []
    assert queued(statement(policy, "s3")) == []
    # b1 returns its connection to b2: s2 and s3 now head the queue and go to slot 1.
    assert policy.release(0, 1.0, CLEAN) == [Grant("b2", 0), Grant("s2", 1), Grant("s3", 1)]
    assert policy.slots[1].in_flight == 3


def test_a_cancelled_borrower_at_the_head_lets_statements_through() -> None:
    policy = make(1, 1, pipeline_depth=4)
    assert lent(statement(policy, "s1")) == 0
    assert queued(policy.request("b", 0.0)) == []
    assert queued(statement(policy, "s2")) == []
    assert policy.cancel("b", 1.0) == [Grant("s2", 0)]


def test_cancel_requests_only_for_the_last_statement_sent_and_the_slot_then_drains() -> None:
    policy = make(1, 2, pipeline_depth=4)
    assert lent(statement(policy, "a")) == 0
    assert lent(statement(policy, "b")) == 0
    assert not policy.statement_cancelled(0, last=False)  # "a": "b" was sent after it
    assert not policy.slots[0].held
    assert policy.statement_cancelled(0, last=True)  # "b": nothing after it
    assert policy.slots[0].held
    # A held slot takes no new statement: "c" goes to a new connection.
    assert queued(statement(policy, "c")) == [Open(1)]
    assert policy.connected(1, 0.5, 0.5) == [Grant("c", 1)]
    assert policy.statements_done(0, 1.0, 2) == [Wake()]  # none left: idle (max_idle timer)
    assert not policy.slots[0].held and policy.state_of(0) is SlotState.IDLE
    assert not policy.statement_cancelled(0, last=True)  # not pipelining any more


def test_a_broken_pipeline_closes_its_slot_and_replaces_it() -> None:
    policy = make(1, 1, pipeline_depth=4)
    assert lent(statement(policy, "a")) == 0
    assert lent(statement(policy, "b")) == 0
    assert lent(statement(policy, "c", 0.5)) == 0
    assert policy.pipeline_broken(0, 2.0) == [Close(0)]
    assert policy.counters.connections_lost == 1 and policy.counters.usage_ms == 2000
    assert policy.closed_slot(0) == [Open(1)]


def test_a_pipelining_slot_past_its_lifetime_drains_then_closes() -> None:
    policy = make(1, 1, max_lifetime=100.0, pipeline_depth=4)  # expires at 95
    assert lent(statement(policy, "a", 90.0)) == 0
    assert policy.next_deadline() == 95.0
    assert policy.tick(95.0) == []
    assert policy.slots[0].held  # no new statement on it
    assert queued(statement(policy, "b", 96.0)) == []
    assert policy.statements_done(0, 97.0, 1) == [Close(0)]
    assert policy.closed_slot(0) == [Open(1)]
    assert policy.connected(1, 98.0, 1.0) == [Grant("b", 1)]


def test_resize_below_the_size_drains_pipelining_slots() -> None:
    policy = make(2, 2, pipeline_depth=4)
    assert lent(statement(policy, "a")) == 1
    assert lent(statement(policy, "b")) == 0
    assert policy.resize(1, 1) == [Wake()]
    assert policy.slots[0].held and policy.slots[1].held
    assert policy.statements_done(1, 1.0, 1) == [Close(1)]  # the surplus
    assert policy.statements_done(0, 1.0, 1) == []  # idle again (timer already set)
    assert policy.idle_slots() == [0]


def test_drained_pipelining_slots_take_no_more_statements() -> None:
    policy = make(1, 2, pipeline_depth=4)
    assert lent(statement(policy, "a")) == 0
    assert policy.drain() == []
    assert queued(statement(policy, "b")) == [Open(1)]
    assert policy.statements_done(0, 1.0, 1) == [Close(0)]


def test_close_rejects_waiting_statements_and_closes_pipelining_slots_when_done() -> None:
    policy = make(1, 1, pipeline_depth=1)
    assert lent(statement(policy, "a")) == 0
    assert queued(statement(policy, "b")) == []
    assert policy.close() == [Reject("b")]
    assert policy.statements_done(0, 1.0, 1) == [Close(0)]


def test_null_pool_opens_a_connection_for_a_statement_and_closes_it_after() -> None:
    policy = make(0, None, keep_idle=False)
    assert queued(statement(policy, "a")) == [Open(0)]
    assert policy.connected(0, 1.0, 1.0) == [Grant("a", 0), Wake()]  # its lifetime's timer
    assert lent(statement(policy, "b", 1.0)) == 0  # rides along
    assert policy.statements_done(0, 2.0, 2) == [Close(0)]


def test_statements_done_checks_its_input_and_changes_nothing() -> None:
    policy = make(1, 1)
    with pytest.raises(KeyError):
        policy.statements_done(0, 0.0, 1)  # idle, not pipelining
    assert lent(statement(policy, "a")) == 0
    with pytest.raises(ValueError, match="2 statements done, 1 in flight"):
        policy.statements_done(0, 0.0, 2)
    with pytest.raises(KeyError):
        policy.pipeline_broken(5, 0.0)
    assert policy.slots[0].in_flight == 1
