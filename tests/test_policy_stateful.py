"""Property-based test of the pure pool policy: a hypothesis state machine.

`PolicyMachine` drives a `PoolPolicy` the way the trio shell does (it carries
out every action: connects what it was told to `Open`, closes what it was
told to `Close`, resets what it was told to `Reset`, holds what was
`Grant`-ed) and keeps its own model of who holds what.  After every step it
checks the policy against the model and the pool's promises:

* every slot is in exactly one state, the one the model expects; the idle
  stack is exactly the model's, in LIFO order;
* ``size <= max_size`` (``size`` counts connections until their close ends),
  except after a ``resize`` lowered ``max_size`` below the connections then in
  use: ``resize`` closes only idle ones and the surplus of the others is closed
  as it comes back, so ``size`` may stay above ``max_size`` for a while; it
  never grows while above it, and nothing is opened beyond ``max_size``;
* shrinking (``max_idle``, ``resize``) closes no more than the surplus, not
  counting connections already being closed, and never goes below
  ``min_size``;
* connections are opened only for waiters that nothing in progress serves;
* FIFO: a waiter is granted only when it is the oldest queued one; no slot
  has two holders; a waiter is granted, rejected, expired or cancelled at most
  once; after ``close()`` nobody waits;
* no stale (drained) or expired connection is handed out or kept idle;
* one-shot statements: a PIPELINING slot carries 1 to ``pipeline_depth``
  statements and is never lent; a statement goes to the idle slot on top of
  the stack, else to an accepting pipelining slot with the fewest in flight
  (never a held, full or drained one), else queues; the queue keeps one
  arrival order for both kinds, and a statement at its head never waits
  while a slot would take it; a slot is held once its lifetime is over, when
  a resize leaves the pool too big, or for a cancel request asked for the
  last statement sent on it;
* the counters equal the model's count of the events;
* timers: the shell re-reads ``next_deadline()`` only after `Wake` or a
  tick, so that deadline must never be later than the policy's real next
  deadline, and nothing is due before ``now`` (unless `tick` has work);
* liveness (`teardown`): once every pending connect succeeds and every
  lent connection is returned, no waiter is left waiting.

`test_state_machine_catches_planted_bugs` shows the invariants can fail.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from triopool._policy import (
    BACKOFF_JITTER,
    INITIAL_BACKOFF,
    LIFETIME_JITTER,
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
    Slot,
    SlotState,
    Wake,
    _Waiter,
)

pytestmark = pytest.mark.psycopg_independent

POOL = -1  # holder of a connection lent to the pool itself (`take_idle`, for check())
EPSILON = 1e-6  # for float sums of times

Fate = Literal["grant", "idle", "reset", "close"]
Kind = Literal["borrower", "statement"]
P = ParamSpec("P")
M = TypeVar("M", bound="PolicyMachine")


def ms(seconds: float) -> int:
    return round(seconds * 1000)


@dataclass(frozen=True)
class Config:
    min_size: int
    max_size: int | None
    max_waiting: int
    max_idle: float
    max_lifetime: float
    reconnect_timeout: float
    keep_idle: bool
    pipeline_depth: int
    randoms: tuple[float, ...]


RANDOMS = st.sampled_from([0.0, 0.5, 1.0, 0.25, 0.9])


@st.composite
def configs(draw: st.DrawFn) -> Config:
    keep_idle = draw(st.booleans())
    if keep_idle:
        min_size = draw(st.integers(0, 3))
        max_size: int | None = draw(st.integers(max(min_size, 1), 4))
    else:  # the null pool
        min_size = 0
        max_size = draw(st.none() | st.integers(1, 3))
    return Config(
        min_size=min_size,
        max_size=max_size,
        max_waiting=draw(st.integers(0, 3)),
        max_idle=draw(st.sampled_from([2.0, 10.0, 600.0])),
        max_lifetime=draw(st.sampled_from([5.0, 30.0, 3600.0])),
        reconnect_timeout=draw(st.sampled_from([0.0, 3.0, 20.0])),
        keep_idle=keep_idle,
        pipeline_depth=draw(st.integers(1, 3)),
        randoms=draw(st.tuples(RANDOMS, RANDOMS)),
    )


@st.composite
def busy_configs(draw: st.DrawFn) -> Config:
    """Small pools that one-shot statements fill: for the planted statement bugs."""
    size = draw(st.integers(1, 2))
    return Config(
        min_size=size,
        max_size=size,
        max_waiting=0,
        max_idle=600.0,
        max_lifetime=draw(st.sampled_from([5.0, 3600.0])),
        reconnect_timeout=20.0,
        keep_idle=True,
        pipeline_depth=draw(st.integers(2, 3)),
        randoms=(0.5, 0.5),
    )


def cycling(values: tuple[float, ...]) -> Callable[[], float]:
    """A deterministic stand-in for `random.random`."""
    values_iter: Iterator[float] = itertools.cycle(values)
    return lambda: next(values_iter)


def step(
    method: Callable[Concatenate[M, P], None],
) -> Callable[Concatenate[M, P], None]:
    """Mark the machine unsettled while `method` runs, so that the liveness
    check of `teardown` does not run on the wreck of a failed step."""

    @functools.wraps(method)
    def wrapper(self: M, *args: P.args, **kwargs: P.kwargs) -> None:
        self.sound = False
        method(self, *args, **kwargs)
        self.sound = True

    return wrapper  # type: ignore[return-value]  # functools.wraps typing


PICK = st.integers(0, 7)  # an index into whatever the rule chooses from
# Times and random numbers: a few exact values that hit the configured limits
# (max_idle, max_lifetime, backoff), and some arbitrary ones.
DELAYS = st.sampled_from([0.0, 0.25, 1.0, 2.0, 2.5, 3.0, 10.0, 30.0, 100.0, 5000.0]) | st.floats(
    0.0, 50.0
)


class PolicyMachine(RuleBasedStateMachine):
    policy: PoolPolicy[int]
    config: Config

    def __init__(self) -> None:
        super().__init__()
        self.sound = False  # no liveness check until started, and after a failure
        self.now = 0.0
        self.timer = math.inf  # what the shell sleeps until (see `_sync_timer`)
        self.min_size = 0
        self.max_size: int | None = None
        self.closed = False
        self.next_waiter = 0
        # The model of the shell.  Every slot the policy knows is in one of these.
        # waiter -> (since, deadline, queued): not queued, a null pool's request
        # with a connection opened for it at once (not in the queue's counts)
        self.queue: dict[int, tuple[float, float, bool]] = {}
        self.idle: list[int] = []  # least recently used first
        self.holders: dict[int, int] = {}  # lent slot -> waiter (or POOL)
        self.lent_at: dict[int, float] = {}  # lent or pipelining slot -> since when
        self.kinds: dict[int, Kind] = {}  # waiter -> what it asked for
        # Pipelining slot -> its statements in flight, in the order sent (dict
        # order: the order slots started pipelining, as the policy's).
        self.pipes: dict[int, list[int]] = {}
        self.held: set[int] = set()
        self.connecting: dict[int, float] = {}  # slot -> when its attempt may end
        # Connecting slots started while clients waited (or for one): coming for waiters.
        self.for_waiters: set[int] = set()
        self.resizing = False  # resize may close connection attempts over max_size
        self.resetting: set[int] = set()
        self.closing: set[int] = set()
        # History.
        self.done: set[int] = set()  # waiters granted, rejected, expired or cancelled
        self.opened: set[int] = set()
        self.failures: dict[int, tuple[float, int]] = {}  # slot -> (first failure, count)
        self.generation = 0
        self.generation_of: dict[int, int] = {}
        self.counters = Counters()
        self.last_size = 0
        self.progress_turn = 0

    # -- the model -------------------------------------------------------------------

    @property
    def size(self) -> int:
        return (
            len(self.connecting)
            + len(self.idle)
            + len(self.holders)
            + len(self.pipes)
            + len(self.resetting)
            + len(self.closing)
        )

    def _accepts(self, slot: int) -> bool:
        """Would pipelining `slot` take one more statement?"""
        return (
            len(self.pipes[slot]) < self.config.pipeline_depth
            and slot not in self.held
            and self.generation_of[slot] == self.generation
        )

    def _least_busy(self) -> int | None:
        """How many statements are in flight on the least busy accepting slot."""
        return min((len(v) for s, v in self.pipes.items() if self._accepts(s)), default=None)

    def _over_max(self) -> bool:
        """More connections than max_size, not counting those being closed.

        (After a resize-down: those come back to be closed.)"""
        return self.max_size is not None and self.size - len(self.closing) > self.max_size

    def _dispatch_fate(self, slot: int, *, expires_at: float) -> Fate:
        """What must become of `slot` when its connection is ready to serve."""
        if (
            self.closed
            or self.generation_of[slot] != self.generation
            or expires_at <= self.now
            or self._over_max()
        ):
            return "close"
        if self.queue:
            return "grant"
        return "idle" if self.config.keep_idle else "close"

    def _sync_timer(self) -> None:
        """As the shell does after a `Wake` or a tick."""
        self.timer = self.policy.next_deadline()

    def _apply(
        self,
        actions: list[Action[int]],
        ready: int | None = None,
        fate: Fate | None = None,
        for_one: int = 0,
    ) -> None:
        """Carry out `actions`, checking each.

        `ready` is the slot the call made ready to serve (connected, returned,
        reset); its `fate` is what the model expects of it.  `for_one`: a
        client that will not wait asked (the pool may grow for it).
        """
        policy = self.policy
        if any(isinstance(action, Open) for action in actions):
            assert policy.max_size is None or policy.size <= policy.max_size, (
                f"opened beyond max_size: size {policy.size}, max_size {policy.max_size}"
            )
            incoming = (
                len(self.for_waiters)
                + len(self.resetting)
                + sum(isinstance(action, Open) for action in actions)
            )
            assert policy.size <= policy.min_size or incoming <= len(self.queue) + for_one, (
                f"opened more than the waiters need: {incoming} incoming for "
                f"{len(self.queue)} waiters"
            )
        got: Fate | None = None
        wake = False
        for action in actions:
            match action:
                case Grant(waiter=waiter, slot=slot):
                    oldest = next(iter(self.queue), None)
                    assert waiter == oldest, f"FIFO: granted {waiter} before {oldest}"
                    assert waiter not in self.done, f"waiter {waiter} served twice"
                    assert slot not in self.holders, f"slot {slot} lent twice"
                    assert self.generation_of[slot] == self.generation, "drained slot lent"
                    assert policy.slots[slot].expires_at > self.now, "expired slot lent"
                    if slot == ready and got is None:
                        got = "grant"  # the slot being dispatched
                        self.lent_at[slot] = self.now
                        if self.kinds[waiter] == "borrower":
                            self.holders[slot] = waiter
                        else:
                            self.pipes[slot] = [waiter]
                    else:
                        assert self.kinds[waiter] == "statement", (
                            f"borrower {waiter} granted slot {slot}, not {ready}"
                        )
                        assert slot in self.pipes, f"statement granted slot {slot}, not pipelining"
                        assert self._accepts(slot), (
                            f"statement placed on slot {slot}: held, full or drained"
                        )
                        assert len(self.pipes[slot]) == self._least_busy(), "not the least busy"
                        self.pipes[slot].append(waiter)
                    self._left_queue(waiter)
                    self.done.add(waiter)
                case Reject(waiter=waiter):
                    assert policy.closed, "rejected while open"
                    oldest = next(iter(self.queue), None)
                    assert waiter == oldest, f"rejected {waiter} before {oldest}"
                    del self.queue[waiter]
                    self.done.add(waiter)
                    self.counters.requests_errors += 1
                case Expire(waiter=waiter, waited=waited):
                    assert waiter in self.queue, f"expired {waiter}, not waiting"
                    since, deadline, _ = self.queue[waiter]
                    assert deadline <= self.now, f"expired {waiter} before its deadline"
                    assert waited == deadline - since
                    self._left_queue(waiter)
                    self.counters.requests_errors += 1
                    self.done.add(waiter)
                case Open(slot=slot, after=after):
                    assert slot not in self.opened, f"slot {slot} opened twice"
                    self.opened.add(slot)
                    self.connecting[slot] = self.now + after
                    self.generation_of[slot] = self.generation
                    if policy.slots[slot].for_waiters:
                        self.for_waiters.add(slot)
                    else:
                        assert not self.queue and not for_one, "attempt not counted for waiters"
                case Close(slot=slot):
                    assert slot not in self.closing, f"slot {slot} closed twice"
                    if slot == ready and got is None:
                        got = "close"
                    elif slot in self.idle:
                        self.idle.remove(slot)
                    elif slot in self.connecting:
                        assert policy.closed or self.resizing, (
                            f"connecting slot {slot} closed while open, outside resize"
                        )
                        del self.connecting[slot]
                        self.for_waiters.discard(slot)
                    else:
                        raise AssertionError(f"closed slot {slot}, neither idle nor ready")
                    self.closing.add(slot)
                case Reset(slot=slot):
                    assert slot == ready and got is None, f"reset slot {slot}, not {ready}"
                    got = "reset"
                    self.resetting.add(slot)
                case Wake():
                    wake = True
                case ReconnectFailed():
                    raise AssertionError("ReconnectFailed outside connect_failed")
        if ready is not None:
            if got is None:
                got = "idle"
                self.idle.append(ready)
            assert got == fate, f"slot {ready}: expected {fate}, policy chose {got}"
        if wake:
            self._sync_timer()

    def _left_queue(self, waiter: int) -> None:
        """A waiter leaves the queue (served, expired, cancelled): its wait counts if queued."""
        since, _, queued = self.queue.pop(waiter)
        if queued:
            self.counters.requests_wait_ms += ms(self.now - since)

    def _check(self) -> None:
        policy = self.policy
        assert policy.waiters() == list(self.queue)
        assert policy.waiting == sum(queued for _, _, queued in self.queue.values())
        assert policy.idle_slots() == self.idle, "idle stack differs from the model"
        assert policy.available == len(self.idle)
        model_states = (
            [(slot, SlotState.CONNECTING) for slot in self.connecting]
            + [(slot, SlotState.IDLE) for slot in self.idle]
            + [(slot, SlotState.LENT) for slot in self.holders]
            + [(slot, SlotState.PIPELINING) for slot in self.pipes]
            + [(slot, SlotState.RESETTING) for slot in self.resetting]
            + [(slot, SlotState.CLOSING) for slot in self.closing]
        )
        assert len(model_states) == len(dict(model_states)), "a slot in two model states"
        assert {slot: s.state for slot, s in policy.slots.items()} == dict(model_states)
        assert policy.size == self.size
        # The policy's running count of what will serve waiters (kept, not recounted).
        incoming = len(self.for_waiters & set(self.connecting)) + len(self.resetting)
        assert policy._incoming() == incoming, "running count of incoming connections"
        queued_statements = sum(1 for waiter in self.queue if self.kinds[waiter] == "statement")
        assert policy._statements_queued == queued_statements, "running count of statements"
        assert (policy.min_size, policy.max_size) == (self.min_size, self.max_size)
        assert not (self.idle and self.queue), "idle connections while clients wait"
        for slot, statements in self.pipes.items():
            assert statements, f"pipelining slot {slot} with nothing in flight"
            assert len(statements) <= self.config.pipeline_depth, (
                f"{len(statements)} statements in flight beyond pipeline_depth on slot {slot}"
            )
            assert policy.slots[slot].in_flight == len(statements)
            assert policy.slots[slot].held == (slot in self.held), f"slot {slot} held?"
        head = next(iter(self.queue), None)
        if head is not None and self.kinds[head] == "statement":
            assert self._least_busy() is None, f"statement {head} waits while a slot takes it"
        if self.closed:
            assert policy.closed
            assert not self.queue, "waiting after close"
            assert not self.idle and not self.connecting
        # size <= max_size, but for a resize-down still being carried out.
        if self.max_size is not None and self.size > self.max_size:
            assert self.size <= self.last_size, f"grew to {self.size} above max_size"
        self.last_size = self.size
        for slot in self.idle:
            assert policy.slots[slot].expires_at > self.now, f"expired slot {slot} kept idle"
            assert self.generation_of[slot] == self.generation, f"drained slot {slot} kept"
        # Somebody will serve every waiter (given the shell does its part).
        incoming = len(self.connecting) + len(self.resetting) + len(self.closing)
        assert (
            self.closed
            or incoming >= len(self.queue)
            or (self.max_size is not None and self.size >= self.max_size)
        ), f"{len(self.queue)} waiters, {incoming} incoming, size {self.size}"
        assert policy.counters == self.counters
        # Timers: what the shell sleeps until must not be later than the truth,
        # and the truth not later than what is due by the model.
        deadline = self._true_deadline()
        assert self.timer <= deadline, (
            f"a deadline moved to {deadline} without a Wake (timer at {self.timer})"
        )
        due = [waiter_deadline for _, waiter_deadline, _ in self.queue.values()]
        due += [policy.slots[slot].expires_at for slot in self.idle]
        due += [policy.slots[slot].expires_at for slot in self.pipes if slot not in self.held]
        if self.idle and self.size - len(self.closing) > self.min_size:
            due.append(policy.slots[self.idle[0]].idle_since + self.config.max_idle)
        assert deadline <= min(due, default=math.inf), f"next_deadline {deadline} too late"
        assert deadline > self.now or copy.deepcopy(policy).tick(self.now), (
            f"next_deadline {deadline} before now {self.now} but nothing to do"
        )

    def _true_deadline(self) -> float:
        """`next_deadline()`, without the side effect the shell's reading has."""
        timer_at = self.policy._timer_at
        deadline = self.policy.next_deadline()
        self.policy._timer_at = timer_at
        return deadline

    # -- setting up -----------------------------------------------------------------------

    @initialize(config=configs())
    @step
    def start(self, config: Config) -> None:
        self._start(config)

    def _start(self, config: Config) -> None:
        self.config = config
        self.min_size, self.max_size = config.min_size, config.max_size
        self.policy = PoolPolicy[int](
            min_size=config.min_size,
            max_size=config.max_size,
            max_waiting=config.max_waiting,
            max_idle=config.max_idle,
            max_lifetime=config.max_lifetime,
            reconnect_timeout=config.reconnect_timeout,
            keep_idle=config.keep_idle,
            pipeline_depth=config.pipeline_depth,
            random=cycling(config.randoms),
        )
        self._apply(self.policy.open())

    # -- clients ----------------------------------------------------------------------------

    @rule(clients=st.integers(1, 3), wait=st.none() | st.sampled_from([0.0, 0.5, 3.0, 20.0]))
    @step
    def request(self, clients: int, wait: float | None) -> None:
        for i in range(clients):
            if i:
                self._check()
            self._request(wait)

    @rule(
        clients=st.integers(1, 4),
        wait=st.none() | st.sampled_from([0.0, 0.5, 3.0, 20.0]),
        cancel_last=st.booleans(),
    )
    @step
    def statement(self, clients: int, wait: float | None, cancel_last: bool) -> None:
        """One-shot statements (a burst of them); maybe the caller of the last
        one is cancelled once it is sent."""
        for i in range(clients):
            if i:
                self._check()
            self._request(wait, "statement")
        sent_on = [
            slot for slot, statements in self.pipes.items() if self.next_waiter - 1 in statements
        ]
        if cancel_last and sent_on:
            self._check()
            self._statement_cancelled(sent_on[0], last=True)

    def _request(self, wait: float | None, kind: Kind = "borrower") -> None:
        waiter, self.next_waiter = self.next_waiter, self.next_waiter + 1
        self.kinds[waiter] = kind
        deadline = math.inf if wait is None else self.now + wait
        top = self.idle[-1] if self.idle else None
        least_busy = self._least_busy()
        placed = kind == "statement" and not self.queue and (top, least_busy) != (None, None)
        room = self.max_size is None or self.size < self.max_size
        queued = self.config.keep_idle or not room  # else a connection opens for it
        n_queued = sum(q for _, _, q in self.queue.values())
        queue_full = (
            queued and bool(self.config.max_waiting) and n_queued >= self.config.max_waiting
        )
        try:
            result = self.policy.request(waiter, self.now, deadline, statement=kind == "statement")
        except PolicyClosed:
            assert self.closed
            self.counters.requests_errors += 1
            return
        except QueueFull:
            assert not self.closed and not placed and queue_full
            assert kind == "statement" or top is None
            self.counters.requests_errors += 1
            return
        assert not self.closed
        self.counters.requests_num += 1
        if isinstance(result, int) and kind == "borrower":
            assert result == top, f"lent slot {result}, not the top of the idle stack {top}"
            self.idle.pop()
            self.holders[result] = waiter
            self.lent_at[result] = self.now
            self.done.add(waiter)
        elif isinstance(result, int):
            if result in self.pipes:
                assert self._accepts(result), (
                    f"statement placed on slot {result}: held, full or drained"
                )
            assert placed, f"statement {waiter} placed on slot {result}, jumping the queue"
            if top is not None:
                assert result == top, f"statement on slot {result}, not the idle {top}"
                self.idle.pop()
                self.pipes[result] = [waiter]
                self.lent_at[result] = self.now
            else:
                assert result in self.pipes and self._accepts(result), (
                    f"statement placed on slot {result}: held, full or drained"
                )
                assert len(self.pipes[result]) == least_busy, "not the least busy slot"
                self.pipes[result].append(waiter)
            self.done.add(waiter)
        elif deadline <= self.now:
            # Will not wait: expired at once, the pool growing for it (not a null pool).
            assert not placed and not queue_full
            assert kind == "statement" or top is None
            assert result[-1:] == [Expire(waiter, 0.0)], result
            self.counters.requests_errors += 1
            self.done.add(waiter)
            self._apply(result[:-1], for_one=int(self.config.keep_idle))
            if not self.config.keep_idle:
                assert result == [Expire(waiter, 0.0)]
        else:
            assert not placed and not queue_full, f"{kind} {waiter} queued, yet a slot takes it"
            assert kind == "statement" or top is None
            self.counters.requests_queued += queued
            self.queue[waiter] = (self.now, deadline, queued)
            self._apply(result)

    @precondition(lambda self: self.next_waiter > 0)
    @rule(pick=PICK, timed_out=st.booleans())
    @step
    def cancel(self, pick: int, timed_out: bool) -> None:
        # Mostly the latest waiters (likely queued); possibly one already done.
        waiter = self.next_waiter - 1 - pick % self.next_waiter
        if waiter in self.queue:
            self._left_queue(waiter)
            self.done.add(waiter)
            self.counters.requests_errors += timed_out
        self._apply(self.policy.cancel(waiter, self.now, timed_out=timed_out))

    @precondition(lambda self: bool(self.holders))
    @rule(pick=PICK, outcome=st.sampled_from(Outcome), everyone=st.booleans())
    @step
    def release(self, pick: int, outcome: Outcome, everyone: bool) -> None:
        """One client (or every one, oldest slot first) returns its connection."""
        if not everyone:
            self._release(sorted(self.holders)[pick % len(self.holders)], outcome)
            return
        for i, slot in enumerate(sorted(self.holders)):
            if i:
                self._check()
            if slot in self.holders:
                self._release(slot, outcome)

    def _release(self, slot: int, outcome: Outcome) -> None:
        by_pool = self.holders[slot] == POOL
        fate: Fate
        if outcome is Outcome.BROKEN:
            fate = "close"
        elif outcome is Outcome.DIRTY:
            reset = not self.closed and (self.config.keep_idle or self.queue)
            fate = "reset" if reset else "close"
        else:
            fate = self._dispatch_fate(slot, expires_at=self.policy.slots[slot].expires_at)
        del self.holders[slot]
        lent_at = self.lent_at.pop(slot)
        if not by_pool:
            self.counters.usage_ms += ms(self.now - lent_at)
        if outcome is Outcome.BROKEN:
            if by_pool:
                self.counters.connections_lost += 1
            else:
                self.counters.returns_bad += 1
        actions = self.policy.release(slot, self.now, outcome, by_pool=by_pool)
        self._apply(actions, ready=slot, fate=fate)

    @precondition(lambda self: bool(self.idle))
    @rule(pick=PICK)
    @step
    def take_idle(self, pick: int) -> None:
        """The pool's check(): take an idle connection out, then `release(by_pool)`."""
        slot = self.idle[pick % len(self.idle)]
        self.policy.take_idle(slot, self.now)
        self.idle.remove(slot)
        self.holders[slot] = POOL
        self.lent_at[slot] = self.now

    @rule()
    @step
    def progress(self) -> None:
        """The shell completes the next pending thing, all going well.

        In turn: a connection attempt succeeds, a reset succeeds, a close ends,
        a client returns the connection it has held longest (in a transaction
        one time in three), the statements in flight on the oldest pipelining
        slot are answered.  Being the only rule without arguments, this is
        the one hypothesis picks most often: it keeps connections flowing.
        """
        self.progress_turn += 1
        turn = self.progress_turn
        ready = self._ready_to_connect()
        pending: list[Callable[[], None]] = []
        if ready:
            pending.append(lambda: self._connected(ready[0], 0.0))
        if self.resetting:
            pending.append(lambda: self._reset_done(min(self.resetting), ok=True))
        if self.closing:
            pending.append(lambda: self._closed_slot(min(self.closing)))
        if self.holders:
            oldest = min(self.holders, key=self.lent_at.__getitem__)
            outcome = Outcome.DIRTY if turn % 3 == 0 else Outcome.CLEAN
            pending.append(lambda: self._release(oldest, outcome))
        if self.pipes:
            first = next(iter(self.pipes))
            pending.append(lambda: self._statements_done(first, len(self.pipes[first])))
        if pending:
            pending[turn % len(pending)]()

    # -- one-shot statements in flight -----------------------------------------------------

    @precondition(lambda self: bool(self.pipes))
    @rule(pick=PICK, count=PICK)
    @step
    def statements_done(self, pick: int, count: int) -> None:
        """The first statements in flight on a pipelining slot are answered."""
        slot = sorted(self.pipes)[pick % len(self.pipes)]
        self._statements_done(slot, 1 + count % len(self.pipes[slot]))

    def _statements_done(self, slot: int, count: int) -> None:
        statements = self.pipes[slot]
        del statements[:count]
        if statements:
            self._apply(self.policy.statements_done(slot, self.now, count))
            return
        fate = self._dispatch_fate(slot, expires_at=self.policy.slots[slot].expires_at)
        del self.pipes[slot]
        self.held.discard(slot)
        self.counters.usage_ms += ms(self.now - self.lent_at.pop(slot))
        self._apply(self.policy.statements_done(slot, self.now, count), ready=slot, fate=fate)

    @precondition(lambda self: bool(self.pipes))
    @rule(pick=PICK, which=PICK)
    @step
    def statement_cancelled(self, pick: int, which: int) -> None:
        """The caller of a statement in flight was cancelled: the shell asks whether
        it may send a cancel request (only for the last statement sent)."""
        slot = sorted(self.pipes)[pick % len(self.pipes)]
        statements = self.pipes[slot]
        self._statement_cancelled(slot, last=which % len(statements) == len(statements) - 1)

    def _statement_cancelled(self, slot: int, *, last: bool) -> None:
        may_cancel = self.policy.statement_cancelled(slot, last=last)
        assert may_cancel == last, f"cancel request allowed: {may_cancel}, last: {last}"
        if last:
            self.held.add(slot)

    @precondition(lambda self: bool(self.pipes))
    @rule(pick=PICK)
    @step
    def pipeline_broken(self, pick: int) -> None:
        """A pipelining connection breaks: its statements fail, it is replaced."""
        slot = sorted(self.pipes)[pick % len(self.pipes)]
        actions = self.policy.pipeline_broken(slot, self.now)
        assert actions[:1] == [Close(slot)]
        del self.pipes[slot]
        self.held.discard(slot)
        self.counters.usage_ms += ms(self.now - self.lent_at.pop(slot))
        self.counters.connections_lost += 1
        self.closing.add(slot)
        self._apply(actions[1:])

    # -- connections -----------------------------------------------------------------------

    def _ready_to_connect(self) -> list[int]:
        return sorted(slot for slot, at in self.connecting.items() if at <= self.now)

    @precondition(lambda self: bool(self._ready_to_connect()))
    @rule(pick=PICK, seconds=st.sampled_from([0.0, 0.25, 1.5]), everyone=st.booleans())
    @step
    def connect_ok(self, pick: int, seconds: float, everyone: bool) -> None:
        """One connection attempt (or every one due) succeeds."""
        ready = self._ready_to_connect()
        if not everyone:
            self._connected(ready[pick % len(ready)], seconds)
            return
        for i, slot in enumerate(ready):
            if i:
                self._check()
            if slot in self.connecting:
                self._connected(slot, seconds)

    def _connected(self, slot: int, seconds: float) -> None:
        # Of the generation it is established in: a drain while it was being made
        # does not discard it.
        self.generation_of[slot] = self.generation
        fate = self._dispatch_fate(slot, expires_at=math.inf)  # (a new connection)
        del self.connecting[slot]
        self.for_waiters.discard(slot)
        self.failures.pop(slot, None)
        self.counters.connections_num += 1
        self.counters.connections_ms += ms(seconds)
        actions = self.policy.connected(slot, self.now, seconds)
        lifetime = self.policy.slots[slot].expires_at - self.now
        max_lifetime = self.config.max_lifetime
        assert (1 - LIFETIME_JITTER) * max_lifetime - EPSILON <= lifetime <= max_lifetime + EPSILON
        assert self.policy.last_error is None
        self._apply(actions, ready=slot, fate=fate)

    @precondition(lambda self: bool(self._ready_to_connect()))
    @rule(pick=PICK)
    @step
    def connect_failed(self, pick: int) -> None:
        ready = self._ready_to_connect()
        slot = ready[pick % len(ready)]
        incoming_others = len(self.for_waiters - {slot}) + len(self.resetting)
        needed = self.size - 1 < self.min_size or len(self.queue) > incoming_others
        first, count = self.failures.get(slot, (self.now, 0))
        give_up_at = first + self.config.reconnect_timeout
        self.counters.connections_num += 1  # failed attempts count too
        self.counters.connections_errors += 1
        error = ("failed", slot, count)
        delay, actions = self.policy.connect_failed(slot, self.now, error)
        assert self.policy.last_error == error
        if not needed:
            assert (delay, actions) == (None, []), "kept connecting for nobody"
            assert self.policy.state_of(slot) is None
            del self.connecting[slot]
            self.for_waiters.discard(slot)
        elif self.now >= give_up_at:
            assert delay is None, f"still trying after reconnect_timeout: {delay}"
            assert actions[:1] == [ReconnectFailed()]
            assert self.policy.state_of(slot) is None
            del self.connecting[slot]
            self.for_waiters.discard(slot)
            # Replacements wait a first backoff delay: no busy loop, even with 0.
            for action in actions[1:]:
                if isinstance(action, Open):
                    low = INITIAL_BACKOFF * (1 - BACKOFF_JITTER) - EPSILON
                    assert low <= action.after <= INITIAL_BACKOFF * (1 + BACKOFF_JITTER) + EPSILON
            self._apply(actions[1:])
        else:
            assert delay is not None and actions == [], f"gave up too early: {actions}"
            nominal = INITIAL_BACKOFF * 2**count
            assert 0 < delay <= give_up_at - self.now + EPSILON, "delay beyond the timeout"
            assert delay <= nominal * (1 + BACKOFF_JITTER) + EPSILON
            assert (
                delay >= nominal * (1 - BACKOFF_JITTER) - EPSILON
                or abs(self.now + delay - give_up_at) <= EPSILON
            ), f"delay {delay} after {count} failures"
            self.connecting[slot] = self.now + delay
            self.failures[slot] = (first, count + 1)

    @precondition(lambda self: bool(self.resetting))
    @rule(pick=PICK, ok=st.booleans())
    @step
    def reset_done(self, pick: int, ok: bool) -> None:
        self._reset_done(sorted(self.resetting)[pick % len(self.resetting)], ok=ok)

    def _reset_done(self, slot: int, *, ok: bool) -> None:
        expires_at = self.policy.slots[slot].expires_at
        fate = self._dispatch_fate(slot, expires_at=expires_at) if ok else "close"
        self.resetting.remove(slot)
        if not ok:
            self.counters.returns_bad += 1
        self._apply(self.policy.reset_done(slot, self.now, ok=ok), ready=slot, fate=fate)

    @precondition(lambda self: bool(self.closing))
    @rule(pick=PICK)
    @step
    def closed_slot(self, pick: int) -> None:
        self._closed_slot(sorted(self.closing)[pick % len(self.closing)])

    def _closed_slot(self, slot: int) -> None:
        self.closing.remove(slot)
        self._apply(self.policy.closed_slot(slot))

    @precondition(lambda self: bool(self.idle))
    @rule(pick=PICK)
    @step
    def lose_idle(self, pick: int) -> None:
        """An idle connection is found closed (the shell reports it unasked)."""
        slot = self.idle[pick % len(self.idle)]
        self.idle.remove(slot)
        self.counters.connections_lost += 1
        self._apply(self.policy.closed_slot(slot))

    @precondition(lambda self: bool(self.idle))
    @rule(pick=PICK)
    @step
    def idle_dead(self, pick: int) -> None:
        """The shell finds an idle connection dead before lending it (`idle_lost`)."""
        slot = self.idle[pick % len(self.idle)]
        actions = self.policy.idle_lost(slot)
        assert actions[:1] == [Close(slot)]
        self.idle.remove(slot)
        self.closing.add(slot)
        self.counters.connections_lost += 1
        self._apply(actions[1:])

    @rule(seconds=st.sampled_from([0.0, 0.5]), failed=st.booleans())
    @step
    def attempted(self, seconds: float, failed: bool) -> None:
        """A null pool's ``wait`` made a test connection outside the slots."""
        self.counters.connections_num += 1
        if failed:
            self.counters.connections_errors += 1
            self.policy.attempted(seconds, "refused")
            assert self.policy.last_error == "refused"
        else:
            self.counters.connections_ms += ms(seconds)
            self.policy.attempted(seconds)

    # -- administration ------------------------------------------------------------------

    @rule(a=st.integers(0, 3), b=st.integers(0, 4), unlimited=st.booleans())
    @step
    def resize(self, a: int, b: int, unlimited: bool) -> None:
        max_size: int | None
        if self.config.keep_idle:
            min_size, max_size = min(a, b), max(a, b, 1)
        else:
            min_size, max_size = 0, None if unlimited else max(b, 1)
        idle_before, size_before = list(self.idle), self.size
        connecting_before = list(self.connecting)
        self.min_size, self.max_size = min_size, max_size
        actions = self.policy.resize(min_size, max_size)
        assert actions[-1:] == [Wake()]
        self.resizing = True
        closed = [action.slot for action in actions if isinstance(action, Close)]
        closed_idle = [slot for slot in closed if slot in idle_before]
        closed_connecting = closed[len(closed_idle) :]
        assert closed_idle == idle_before[: len(closed_idle)], "closed other than the oldest idle"
        newest_connecting = sorted(connecting_before, reverse=True)
        assert closed_connecting == newest_connecting[: len(closed_connecting)], (
            "closed other than the newest connection attempts, after the idle ones"
        )
        surplus = 0 if max_size is None else max(0, size_before - max_size)
        assert len(closed) <= surplus, f"closed {len(closed)} idle for a surplus of {surplus}"
        try:
            self._apply(actions)
        finally:
            self.resizing = False
        if self._over_max():  # pipelining slots drain; the surplus closes then
            self.held.update(self.pipes)

    @rule(since=st.none() | st.integers(0, 12))
    @step
    def drain(self, since: int | None) -> None:
        drains = since is None or (
            since in self.policy.slots and self.generation_of[since] == self.generation
        )
        idle_before = list(self.idle)
        actions = self.policy.drain(since_slot=since)
        if drains:
            self.generation += 1
            assert actions == [Close(slot) for slot in idle_before]
        else:
            assert actions == []
        self._apply(actions)

    @precondition(lambda self: not self.closed)
    @rule(chance=st.integers(0, 9))
    @step
    def close(self, chance: int) -> None:
        # (Hypothesis would otherwise pick this cheap rule so often that most
        # runs would end early: close one time in ten.)
        if chance != 9:
            return
        self.closed = True
        to_close = set(self.idle) | set(self.connecting)
        actions = self.policy.close()
        assert {a.slot for a in actions if isinstance(a, Close)} == to_close
        self._apply(actions)
        assert self.policy.close() == [], "closed twice"

    # -- time -----------------------------------------------------------------------------

    def _tick(self) -> None:
        policy, now = self.policy, self.now
        due = {w for w, (_, deadline, _) in self.queue.items() if deadline <= now}
        expired = {slot for slot in self.idle if policy.slots[slot].expires_at <= now}
        self.held.update(slot for slot in self.pipes if policy.slots[slot].expires_at <= now)
        actions = policy.tick(now)
        assert {a.waiter for a in actions if isinstance(a, Expire)} == due
        closed = {a.slot for a in actions if isinstance(a, Close)}
        assert expired <= closed, "expired idle connection not closed"
        shrunk = closed - expired
        for slot in shrunk:
            assert policy.slots[slot].idle_since + self.config.max_idle <= now, "closed early"
        self._apply(actions)
        live = self.size - len(self.closing)
        if shrunk:
            assert live >= self.min_size, (
                f"idle shrink closed {sorted(shrunk)}, leaving {live} < min_size "
                f"{self.min_size} connections"
            )
        if self.idle and live > self.min_size:
            oldest = policy.slots[self.idle[0]]
            assert oldest.idle_since + self.config.max_idle > now, "surplus idle kept"
        self._sync_timer()
        assert self.timer > now, "tick left work due"

    def _advance_to(self, target: float) -> None:
        """Let time pass; the shell's timer fires (and ticks) on the way."""
        for _ in range(1000):
            if self.timer > target:
                break
            self.now = max(self.now, self.timer)
            self._tick()
        else:
            raise AssertionError("the timer keeps firing")
        self.now = target

    @rule(dt=DELAYS, pop_counters=st.booleans())
    @step
    def advance(self, dt: float, pop_counters: bool) -> None:
        """Time passes (the shell's timer fires on the way); the shell may read
        the statistics, and reset them."""
        if dt == 0:
            # The shell may also wake early: a tick with nothing due does nothing.
            self._tick()
        self._advance_to(self.now + dt)
        if pop_counters:
            assert self.policy.pop_counters() == self.counters
            self.counters = Counters()

    # -- checks ------------------------------------------------------------------------------

    @invariant()
    def consistent(self) -> None:
        self.sound = False
        self._check()
        self.sound = True

    def teardown(self) -> None:
        """Liveness: the shell completes everything; nobody is left waiting."""
        if not self.sound:
            return
        for _ in range(10_000):
            if self.holders:
                self._release(min(self.holders), Outcome.CLEAN)
            elif self.pipes:
                slot = min(self.pipes)
                self._statements_done(slot, len(self.pipes[slot]))
            elif self.resetting:
                self._reset_done(min(self.resetting), ok=True)
            elif self.closing:
                self._closed_slot(min(self.closing))
            elif self.connecting:
                at = min(self.connecting.values())
                if at > self.now:
                    self._advance_to(at)
                else:
                    self._connected(min(self.connecting, key=self.connecting.__getitem__), 0.0)
            else:
                break
            self._check()
        else:
            raise AssertionError("the pool never settles")
        assert not self.queue, f"waiters never served: {list(self.queue)}"
        assert self.closed or self.size >= self.min_size, "below min_size once settled"


MACHINE_SETTINGS = settings(
    max_examples=400,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_policy_state_machine() -> None:
    run_state_machine_as_test(PolicyMachine, settings=MACHINE_SETTINGS)


class BusyPolicyMachine(PolicyMachine):
    """The same machine on small pools that statements keep busy (`busy_configs`)."""

    @initialize(config=busy_configs())
    @step
    def start(self, config: Config) -> None:
        self._start(config)


def test_busy_policy_state_machine() -> None:
    run_state_machine_as_test(
        BusyPolicyMachine, settings=settings(MACHINE_SETTINGS, max_examples=150)
    )


# -- the invariants can fail: planted bugs ---------------------------------------------------


class _LifoPop(OrderedDict[int, _Waiter]):
    def popitem(self, last: bool = True) -> tuple[int, _Waiter]:
        return super().popitem(last=True)


def plant_lifo_service(monkeypatch: pytest.MonkeyPatch) -> None:
    """`_dispatch` serves the newest waiter (``popitem(last=True)``)."""
    dispatch = PoolPolicy._dispatch

    def lifo_dispatch(
        self: PoolPolicy[int], slot: Slot, now: float, actions: list[Action[int]], **kw: bool
    ) -> None:
        fifo, self._waiters = self._waiters, _LifoPop(self._waiters)
        try:
            dispatch(self, slot, now, actions, **kw)
        finally:
            fifo.clear()
            fifo.update(self._waiters)
            self._waiters = fifo

    monkeypatch.setattr(PoolPolicy, "_dispatch", lifo_dispatch)


def plant_unbounded_grow(monkeypatch: pytest.MonkeyPatch) -> None:
    """`_grow` forgets the max_size bound."""

    def grow(
        self: PoolPolicy[int], actions: list[Action[int]], *, extra: int = 0, after: float = 0.0
    ) -> None:
        if self.opened and not self.closed:
            for _ in range(len(self._waiters) + extra - self._incoming()):
                self._open(actions, after, for_waiters=True)

    monkeypatch.setattr(PoolPolicy, "_grow", grow)


def plant_missing_wake(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new waiter's earlier deadline does not wake the shell."""
    request = PoolPolicy.request

    def request_without_wake(
        self: PoolPolicy[int], waiter: int, now: float, *args: Any, **kwargs: Any
    ) -> int | list[Action[int]]:
        result = request(self, waiter, now, *args, **kwargs)
        if isinstance(result, list) and Wake() in result:
            result.remove(Wake())
        return result

    monkeypatch.setattr(PoolPolicy, "request", request_without_wake)


def plant_no_refill(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lost connections are not replaced up to min_size."""
    monkeypatch.setattr(PoolPolicy, "_refill", lambda self, actions, after=0.0: None)


def plant_forgotten_waiter(monkeypatch: pytest.MonkeyPatch) -> None:
    """A returned connection goes idle although a client waits (when size == 2)."""
    dispatch = PoolPolicy._dispatch

    def dispatch_ignoring(
        self: PoolPolicy[int], slot: Slot, now: float, actions: list[Action[int]], **kw: bool
    ) -> None:
        waiters = self._waiters
        if self.size == 2 and self.keep_idle:
            self._waiters = OrderedDict()
        try:
            dispatch(self, slot, now, actions, **kw)
        finally:
            self._waiters = waiters

    monkeypatch.setattr(PoolPolicy, "_dispatch", dispatch_ignoring)


def plant_over_close(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shrinking counts connections already being closed (so it closes too many)."""
    monkeypatch.setattr(PoolPolicy, "_staying", lambda self: len(self.slots))


def plant_lend_pipelining(monkeypatch: pytest.MonkeyPatch) -> None:
    """A borrower that finds no idle connection is lent a pipelining one."""
    request = PoolPolicy.request

    def lend_busy(
        self: PoolPolicy[int], waiter: int, now: float, deadline: float = math.inf, **kw: bool
    ) -> int | list[Action[int]]:
        if not kw.get("statement") and not self._idle and self._pipelining and not self.closed:
            slot = next(iter(self._pipelining.values()))
            del self._pipelining[slot.id]
            slot.state, slot.in_flight, slot.lent_at = SlotState.LENT, 0, now
            self.counters.requests_num += 1
            return slot.id
        return request(self, waiter, now, deadline, **kw)

    monkeypatch.setattr(PoolPolicy, "request", lend_busy)


def plant_unbounded_depth(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pipelining slots take statements beyond ``pipeline_depth``."""
    monkeypatch.setattr(
        PoolPolicy,
        "_accepts",
        lambda self, slot: not slot.held and slot.generation == self._generation,
    )


def plant_ignored_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    """A held slot (a cancel request may follow) still takes statements."""
    monkeypatch.setattr(
        PoolPolicy,
        "_accepts",
        lambda self, slot: (
            slot.in_flight < self.pipeline_depth and slot.generation == self._generation
        ),
    )


def plant_statement_jumps_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new statement is placed on a pipelining slot although clients wait."""
    request = PoolPolicy.request

    def jump(
        self: PoolPolicy[int], waiter: int, now: float, deadline: float = math.inf, **kw: bool
    ) -> int | list[Action[int]]:
        if kw.get("statement") and self._waiters and not self.closed:
            slot = self._least_busy()
            if slot is not None:
                slot.in_flight += 1
                self.counters.requests_num += 1
                return slot.id
        return request(self, waiter, now, deadline, **kw)

    monkeypatch.setattr(PoolPolicy, "request", jump)


def plant_unfed_statements(monkeypatch: pytest.MonkeyPatch) -> None:
    """Room made on a pipelining slot does not let waiting statements in."""
    done = PoolPolicy.statements_done

    def statements_done(
        self: PoolPolicy[int], slot_id: int, now: float, count: int
    ) -> list[Action[int]]:
        slot = self.slots[slot_id]
        if slot.state is SlotState.PIPELINING and 0 < count < slot.in_flight:
            slot.in_flight -= count
            return []
        return done(self, slot_id, now, count)

    monkeypatch.setattr(PoolPolicy, "statements_done", statements_done)


PLANTS: dict[str, tuple[Callable[[pytest.MonkeyPatch], None], str]] = {
    # plant: (how, a message of the invariant expected to catch it); those of
    # statements run on `BusyPolicyMachine`
    "lifo_service": (plant_lifo_service, "FIFO"),
    "unbounded_grow": (plant_unbounded_grow, "beyond max_size"),
    "missing_wake": (plant_missing_wake, "without a Wake"),
    "no_refill": (plant_no_refill, "below min_size once settled"),
    "forgotten_waiter": (plant_forgotten_waiter, "policy chose idle"),
    "over_close": (plant_over_close, "idle for a surplus|idle shrink closed|policy chose close"),
    "lend_pipelining": (plant_lend_pipelining, "lent slot|differs|==|state"),
    "unbounded_depth": (plant_unbounded_depth, "beyond pipeline_depth|held, full or drained"),
    "ignored_hold": (plant_ignored_hold, "held, full or drained"),
    "statement_jumps_queue": (plant_statement_jumps_queue, "jumping the queue"),
    "unfed_statements": (plant_unfed_statements, "waits while a slot takes it"),
}
BUSY_PLANTS = {
    "unbounded_depth",
    "ignored_hold",
    "statement_jumps_queue",
    "unfed_statements",
    "lend_pipelining",
}

PLANT_SETTINGS = settings(
    MACHINE_SETTINGS,
    max_examples=500,  # at most: the search stops at the first failure
    stateful_step_count=25,  # (shorter runs shrink faster)
    derandomize=True,
    database=None,
    report_multiple_bugs=False,
    print_blob=False,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],  # no slow "explain"
)


def _steps(error: BaseException) -> list[str]:
    """The steps of the (shrunk) falsifying example hypothesis attached to `error`."""
    notes = getattr(error, "__notes__", [])
    return [n for n in notes if re.match(r"state\.(?!teardown|consistent)\w+\(", n)]


@pytest.mark.parametrize("plant", PLANTS)
def test_state_machine_catches_planted_bugs(
    plant: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    how, expected = PLANTS[plant]
    how(monkeypatch)
    machine = BusyPolicyMachine if plant in BUSY_PLANTS else PolicyMachine
    started = time.perf_counter()
    with pytest.raises(AssertionError) as caught:
        run_state_machine_as_test(machine, settings=PLANT_SETTINGS)
    elapsed = time.perf_counter() - started
    steps = _steps(caught.value)
    with capsys.disabled():
        print(
            f"\n{plant}: caught in {elapsed:.1f} s, {len(steps)} steps: {caught.value}\n  "
            + "\n  ".join(steps)
        )
    assert re.search(expected, str(caught.value))
