"""The pool's decisions, as a pure state machine.

Rule 1: every decision of the pool lives here: who gets which connection, when
to open one, when to close one, how long to back off, and what each statistic
counts.  Rule 2: nothing here does I/O, reads a clock, or knows about trio or
psycopg.  Time comes in as ``now`` (seconds, any monotonic origin); randomness
comes from the injected ``random`` callable.  Rule 3: a method that raises
changes nothing.

Each connection has a *slot*, identified by an int and in exactly one state::

    CONNECTING ──connected──► (dispatch) ──► LENT ──release──► (dispatch)
         │                    │  │  ▲                 │ dirty
         │ failed: backoff/   │  │  └──── IDLE ◄──────┤
         │ give up            │  │         │          ▼
         ▼                    │  │         ▼      RESETTING ──reset_done──► (dispatch)
      (removed)               │  └──► PIPELINING ──statements_done (none left)──► (dispatch)
                              │            │ broken
                              └──► CLOSING ◄┘  ──closed──► (removed)

*Dispatch* is the one place a connection becomes available: it goes to the
first waiter (FIFO), else to the idle stack, else (surplus, expired, drained,
null pool) it is closed.  A slot counts towards ``size`` from ``open`` until
the shell reports it ``closed``, so ``size <= max_size`` holds for the server
too.  Methods return the actions the shell must carry out, in order.

Two kinds of clients share the queue, in one arrival order: *borrowers*
(``connection()``, ``getconn``), who get a connection of their own (LENT),
and *statements* (the one-shot calls), which the pool sends on a connection
in pipeline mode.  A PIPELINING slot carries ``in_flight`` statements (1 to
``pipeline_depth``) and is never lent: it is dispatched again once the shell
reports them all done.  A new statement goes to an idle slot, else to the
pipelining slot with the fewest in flight that *accepts* more (room below
``pipeline_depth``, not held, not drained), else it queues.  Nobody jumps
the queue: a statement that arrives while clients wait queues behind them,
and while a borrower waits at the head no statement is placed at all, so
pipelining slots drain and the borrower gets the first one that does.  A
slot stops accepting statements (it is *held*) when its ``max_lifetime``
passes, when a ``resize`` leaves the pool above ``max_size``, and when the
shell may send a cancel request on it (`PoolPolicy.statement_cancelled`):
then no statement sent after the cancelled one can be hit by that request.

Nothing is opened before `PoolPolicy.open`.  Growth: a waiter that no
connection attempt (nor a reset) is coming for makes the pool open one, up to
``max_size``; an attempt started while nobody waited (to keep ``min_size``)
is not coming for waiters, so one that hangs does not hold them back.  A slot that gives up after
``reconnect_timeout`` is replaced by one that first waits a backoff delay.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from enum import Enum
from typing import Final, Generic, TypeVar

W = TypeVar("W", bound=Hashable)

#: First reconnection delay, in seconds; doubled after every failed attempt.
INITIAL_BACKOFF = 1.0
#: Relative jitter applied to each backoff delay (±10 %).
BACKOFF_JITTER = 0.1
#: Largest fraction by which a connection's max_lifetime is reduced at random.
LIFETIME_JITTER = 0.1


class Backoff:
    """Delays between failing connection attempts, until it is time to give up.

    The first delay is `INITIAL_BACKOFF`, each next one twice the previous,
    each with ±`BACKOFF_JITTER` jitter and capped so that the attempts stop
    `give_up_after` seconds after the first failure.
    """

    __slots__ = ("_random", "give_up_after", "next_delay", "since")

    def __init__(self, give_up_after: float, random: Callable[[], float]) -> None:
        self.give_up_after = give_up_after
        self._random = random
        self.since: float | None = None
        self.next_delay = INITIAL_BACKOFF

    def next(self) -> float:
        """The next delay, with no time limit."""
        jitter = 1 + BACKOFF_JITTER * (2 * self._random() - 1)
        delay = self.next_delay * jitter
        self.next_delay *= 2
        return delay

    def failed(self, now: float) -> float | None:
        """An attempt failed at `now`: the delay before the next, or None to give up."""
        if self.since is None:
            self.since = now
        give_up_at = self.since + self.give_up_after
        if now >= give_up_at:
            return None
        return min(self.next(), give_up_at - now)


class SlotState(Enum):
    CONNECTING = "connecting"
    IDLE = "idle"
    LENT = "lent"
    PIPELINING = "pipelining"
    RESETTING = "resetting"
    CLOSING = "closing"


class Outcome(Enum):
    """How a lent connection came back."""

    CLEAN = "clean"  # idle, ready to serve again
    DIRTY = "dirty"  # needs a rollback and/or the reset callback
    BROKEN = "broken"  # closed, broken, or in a state that cannot be recovered


# For the per-request paths: on Python 3.11 looking up an Enum member costs
# ~70 ns, a module global ~10 ns, and a request and its return do about ten.
LENT: Final = SlotState.LENT
IDLE: Final = SlotState.IDLE
PIPELINING: Final = SlotState.PIPELINING
CLEAN: Final = Outcome.CLEAN
DIRTY: Final = Outcome.DIRTY
BROKEN: Final = Outcome.BROKEN


class PolicyClosed(Exception):
    """The pool is closed."""


class QueueFull(Exception):
    """``max_waiting`` clients are already waiting."""


@dataclass(slots=True)
class Grant(Generic[W]):
    """Hand slot `slot` to `waiter` (already removed from the queue)."""

    waiter: W
    slot: int


@dataclass(slots=True)
class Reject(Generic[W]):
    """Fail `waiter` (already removed from the queue): the pool is closed."""

    waiter: W


@dataclass(slots=True)
class Expire(Generic[W]):
    """Fail `waiter` (already removed from the queue): its deadline passed.

    `waited` is how long it waited, in seconds.
    """

    waiter: W
    waited: float


@dataclass(slots=True)
class Open:
    """Start connecting slot `slot` (connect, then report connected/failed).

    `after`: seconds to wait before the first attempt (a slot replacing one
    that gave up waits, so that a server that stays down is not hammered).
    """

    slot: int
    after: float = 0.0


@dataclass(slots=True)
class Close:
    """Close slot `slot`'s connection (if any), then report closed."""

    slot: int


@dataclass(slots=True)
class Reset:
    """Roll back / reset slot `slot`'s connection, then report reset_done."""

    slot: int


@dataclass(slots=True)
class Wake:
    """A timer deadline moved earlier: ask for `next_deadline()` again."""


@dataclass(slots=True)
class ReconnectFailed:
    """A connection could not be established within reconnect_timeout."""


# (Not frozen: a frozen dataclass costs three times as much to make, and a
# Grant is made for nearly every request.  Nothing holds on to an action.)
Action = Grant[W] | Reject[W] | Expire[W] | Open | Close | Reset | Wake | ReconnectFailed


@dataclass(slots=True, eq=False)
class Slot:
    id: int
    generation: int
    state: SlotState = SlotState.CONNECTING
    expires_at: float = math.inf
    idle_since: float = 0.0
    lent_at: float = 0.0
    backoff: Backoff | None = None  # while connection attempts fail
    # Started while clients waited (or for one): counts as coming for waiters.
    for_waiters: bool = False
    in_flight: int = 0  # PIPELINING: statements sent and not done
    held: bool = False  # PIPELINING: takes no new statement until none is left


@dataclass(slots=True)
class Counters:
    """psycopg_pool's counters (reset by ``pop``)."""

    requests_num: int = 0
    requests_queued: int = 0
    requests_wait_ms: int = 0
    requests_errors: int = 0
    returns_bad: int = 0
    connections_num: int = 0
    connections_ms: int = 0
    connections_errors: int = 0
    connections_lost: int = 0
    usage_ms: int = 0


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


@dataclass(slots=True)
class _Waiter:
    """A client waiting for a connection."""

    since: float
    deadline: float
    #: Counted as queued (psycopg_pool's ``requests_queued``, ``requests_waiting``):
    #: false for a null pool's request that has a connection opened for it at once.
    queued: bool
    #: A one-shot statement (pipelined), not a borrower.
    statement: bool = False


@dataclass
class PoolPolicy(Generic[W]):
    """The state and rules of one pool.  See the module docstring.

    ``max_size=None`` means no limit (the null pool's ``max_size=0``).
    ``keep_idle=False`` gives the null pool: no connection is kept idle.
    ``pipeline_depth``: most statements in flight on one connection.
    Nothing is opened until `open` (sizes may change before).
    """

    min_size: int
    max_size: int | None
    max_waiting: int = 0
    max_idle: float = 600.0
    max_lifetime: float = 3600.0
    reconnect_timeout: float = 300.0
    keep_idle: bool = True
    pipeline_depth: int = 16
    random: Callable[[], float] = field(default=lambda: 0.5, repr=False)

    opened: bool = field(default=False, init=False)
    closed: bool = field(default=False, init=False)
    slots: dict[int, Slot] = field(default_factory=dict, init=False, repr=False)
    counters: Counters = field(default_factory=Counters, init=False)
    #: The error of the last failed connection attempt (opaque to the policy).
    last_error: object = field(default=None, init=False, repr=False)
    _idle: list[int] = field(default_factory=list, init=False, repr=False)  # LIFO stack
    _pipelining: dict[int, Slot] = field(default_factory=dict, init=False, repr=False)
    # Waiting clients, in arrival order.
    _waiters: OrderedDict[W, _Waiter] = field(default_factory=OrderedDict, init=False, repr=False)
    _queued: int = field(default=0, init=False, repr=False)  # waiters counted as queued
    _statements_queued: int = field(default=0, init=False, repr=False)  # of the waiters
    # The deadlines of queued waiters.  Timeouts are mostly alike, so a
    # waiter's deadline is mostly no earlier than any queued before it: those
    # are kept as (deadline, waiter) in `_in_order`, whose deadlines are in
    # arrival order (a deque: no sorting); the others as (deadline, sequence,
    # waiter) in the heap `_deadlines`.  Entries of waiters that left the queue
    # are dropped lazily (and compacted, see `_push_deadline` and `cancel`);
    # both are emptied whenever the queue is.
    _in_order: deque[tuple[float, W]] = field(default_factory=deque, init=False, repr=False)
    _latest_deadline: float = field(default=-math.inf, init=False, repr=False)
    _deadlines: list[tuple[float, int, W]] = field(default_factory=list, init=False, repr=False)
    _sequence: int = field(default=0, init=False, repr=False)
    _next_slot: int = field(default=0, init=False, repr=False)
    _generation: int = field(default=0, init=False, repr=False)
    _timer_at: float = field(default=math.inf, init=False, repr=False)
    _closing: int = field(default=0, init=False, repr=False)  # slots in CLOSING
    #: Slots that will serve waiters without a client returning one (see `_incoming`).
    _incoming_count: int = field(default=0, init=False, repr=False)

    # -- observers ---------------------------------------------------------

    @property
    def size(self) -> int:
        """Connections open or being opened or closed (all that count to max_size)."""
        return len(self.slots)

    @property
    def available(self) -> int:
        return len(self._idle)

    @property
    def waiting(self) -> int:
        """Clients queued for a connection (not those a connection is opened for)."""
        return self._queued

    def count(self, state: SlotState) -> int:
        return sum(1 for slot in self.slots.values() if slot.state is state)

    def state_of(self, slot_id: int) -> SlotState | None:
        slot = self.slots.get(slot_id)
        return None if slot is None else slot.state

    def retry_delays(self) -> Backoff:
        """Delays between the retries of a client whose connections fail ``check``."""
        return Backoff(math.inf, self.random)

    def idle_slots(self) -> list[int]:
        """Idle slots, least recently used first."""
        return list(self._idle)

    def next_idle(self) -> int | None:
        """The idle slot `request` would lend next, if any."""
        return self._idle[-1] if self._idle else None

    def waiters(self) -> list[W]:
        """Waiting clients, in the order they will be served."""
        return list(self._waiters)

    @property
    def anyone_waiting(self) -> bool:
        """Is a client waiting (queued, or for a connection opened for it)?"""
        return bool(self._waiters)

    @property
    def statements_waiting(self) -> int:
        """One-shot statements among the waiting clients."""
        return self._statements_queued

    def ready(self) -> int:
        """Connections established (idle, lent, pipelining or being reset)."""
        return sum(1 for slot in self.slots.values() if slot.state in _READY)

    def next_deadline(self) -> float:
        """When `tick` next has work to do (``math.inf``: never, until an event)."""
        deadline = math.inf
        self._trim_in_order()
        if self._in_order:
            deadline = self._in_order[0][0]
        while self._deadlines and not self._queued_with(self._deadlines[0][::2]):
            heapq.heappop(self._deadlines)
        if self._deadlines:
            deadline = min(deadline, self._deadlines[0][0])
        if self._idle:
            if self._staying() > self.min_size:
                oldest = self.slots[self._idle[0]]
                deadline = oldest.idle_since + self.max_idle
            for slot_id in self._idle:
                deadline = min(deadline, self.slots[slot_id].expires_at)
        for slot in self._pipelining.values():
            if not slot.held:
                deadline = min(deadline, slot.expires_at)
        self._timer_at = deadline
        return deadline

    # -- lifetime ----------------------------------------------------------

    def open(self) -> list[Action[W]]:
        """Start: open connections up to ``min_size``."""
        self.opened = True
        actions: list[Action[W]] = []
        self._refill(actions)
        return actions

    # -- clients -----------------------------------------------------------

    def request(
        self, waiter: W, now: float, deadline: float = math.inf, *, statement: bool = False
    ) -> int | list[Action[W]]:
        """A client asks for a connection, waiting at most until `deadline`.

        `statement`: the client is a one-shot statement, to be sent on a
        PIPELINING slot (see the module docstring), not a borrower.

        Returns the slot lent to it (the statement's slot) at once, or the
        actions to carry out while it waits (it is queued: expect a `Grant`,
        `Expire` or `Reject` for it later, unless it `cancel`s first).  A
        client that would have to wait past its `deadline` gets its `Expire`
        among the actions at once; the pool still grows for it, so that a
        next request may be served.

        Raises:
            PolicyClosed: the pool is closed.
            QueueFull: ``max_waiting`` clients are already waiting.
        """
        if self.closed:
            self.counters.requests_errors += 1
            raise PolicyClosed
        if statement:
            if not self._waiters and (slot := self._place_statement(now)) is not None:
                self.counters.requests_num += 1
                return slot.id
        elif self._idle:
            slot = self.slots[self._idle.pop()]
            slot.state = LENT
            slot.lent_at = now
            self.counters.requests_num += 1
            return slot.id
        # A null pool with room opens a connection for this client: not queued.
        queued = self.keep_idle or not self._has_room()
        if queued and self.max_waiting and self._queued >= self.max_waiting:
            self.counters.requests_errors += 1
            raise QueueFull
        self.counters.requests_num += 1
        actions: list[Action[W]] = []
        if deadline <= now:
            self.counters.requests_errors += 1
            if self.keep_idle:
                self._grow(actions, extra=1)
            actions.append(Expire(waiter, 0.0))
            return actions
        if queued:
            self.counters.requests_queued += 1
            self._queued += 1
        waiters = self._waiters
        if not waiters:  # every deadline entry left is stale
            self._in_order.clear()
            self._deadlines.clear()
            self._latest_deadline = -math.inf
        waiters[waiter] = _Waiter(now, deadline, queued, statement)
        self._statements_queued += statement
        if deadline < math.inf:
            if deadline >= self._latest_deadline:  # the common case (see `_in_order`)
                self._latest_deadline = deadline
                self._in_order.append((deadline, waiter))
            else:
                self._push_deadline(deadline, waiter)
            if deadline < self._timer_at:
                self._timer_at = deadline
                actions.append(Wake())
        if self.max_size is None or len(self.slots) < self.max_size:  # (`_grow`'s first test)
            self._grow(actions)
        return actions

    def cancel(self, waiter: W, now: float, *, timed_out: bool = False) -> list[Action[W]]:
        """A queued client stopped waiting (cancelled, or its timeout expired).

        Harmless if it is not queued any more.  Returns the actions for the
        statements this lets through (a borrower at the head held them back).
        """
        entry = self._waiters.pop(waiter, None)
        actions: list[Action[W]] = []
        if entry is None:
            return actions
        self._left_queue(entry, now)
        if len(self._in_order) > 2 * len(self._waiters) + 64:
            # Mostly entries of waiters cancelled since: keep only live ones.
            self._in_order = deque(e for e in self._in_order if self._queued_with(e))
        if timed_out:
            self.counters.requests_errors += 1
        self._serve_statements(now, actions)
        return actions

    def release(
        self, slot_id: int, now: float, outcome: Outcome, *, by_pool: bool = False
    ) -> list[Action[W]]:
        """A lent connection comes back.

        `by_pool`: the pool itself had it (`take_idle`, a client's ``check``
        before the client gets it, or a grant its client could not take), so
        it counts as a connection found lost rather than a bad return, and
        not as usage.

        Raises:
            KeyError: `slot_id` is not lent.
        """
        slot = self.slots.get(slot_id)  # (`_slot_in` and `_ms`, inline: every request's path)
        if slot is None or slot.state is not LENT:
            raise KeyError(f"slot {slot_id} is not {LENT.value}")
        if not by_pool:
            self.counters.usage_ms += round((now - slot.lent_at) * 1000)
        actions: list[Action[W]] = []
        if outcome is CLEAN:  # the common case first
            self._dispatch(slot, now, actions)
        elif outcome is BROKEN:
            if by_pool:
                self.counters.connections_lost += 1
            else:
                self.counters.returns_bad += 1
            self._close(slot, actions)
        elif not self.closed and (self.keep_idle or self._waiters):  # dirty
            slot.state = SlotState.RESETTING
            self._incoming_count += 1
            actions.append(Reset(slot.id))
        else:  # dirty, and no one to reset it for
            self._close(slot, actions)
        return actions

    def reset_done(self, slot_id: int, now: float, *, ok: bool) -> list[Action[W]]:
        """The shell finished resetting a returned connection."""
        slot = self._slot_in(slot_id, SlotState.RESETTING)
        self._incoming_count -= 1  # (`_close` counts only CONNECTING slots out)
        actions: list[Action[W]] = []
        if ok:
            self._dispatch(slot, now, actions)
        else:
            self.counters.returns_bad += 1
            self._close(slot, actions)
        return actions

    def statements_done(self, slot_id: int, now: float, count: int) -> list[Action[W]]:
        """`count` statements in flight on a PIPELINING slot are done (answered,
        failed, or dropped for a cancelled caller).

        With none left the slot is dispatched (its connection is idle again:
        the next waiter, idle, or closed); else it takes waiting statements
        while it accepts more.

        Raises:
            KeyError: `slot_id` is not pipelining.
            ValueError: fewer than `count` statements are in flight on it.
        """
        slot = self._slot_in(slot_id, PIPELINING)
        if not 0 < count <= slot.in_flight:
            raise ValueError(f"{count} statements done, {slot.in_flight} in flight")
        slot.in_flight -= count
        actions: list[Action[W]] = []
        if slot.in_flight:
            self._serve_statements(now, actions)
        else:
            self._end_pipelining(slot, now)
            self._dispatch(slot, now, actions)
        return actions

    def statement_cancelled(self, slot_id: int, *, last: bool) -> bool:
        """The caller of a statement in flight on `slot_id` was cancelled.

        `last`: its statement is the last one sent on that connection.
        Returns whether the shell may ask the server to cancel what runs
        there, once every statement in flight on it is one whose caller was
        cancelled: only then, and only if the slot takes no new statement
        meanwhile (it is held until none is left), can the request hit no
        statement of another caller.
        """
        slot = self.slots.get(slot_id)
        if not last or slot is None or slot.state is not PIPELINING:
            return False
        slot.held = True
        return True

    def pipeline_broken(self, slot_id: int, now: float) -> list[Action[W]]:
        """A PIPELINING slot's connection broke: every statement in flight on it
        failed; close it (it counts as lost) and replace it.
        """
        slot = self._slot_in(slot_id, PIPELINING)
        self._end_pipelining(slot, now)
        return self._lost(slot)

    def take_idle(self, slot_id: int, now: float) -> None:
        """Lend a specific idle connection to the pool itself (for `check()`).

        Give it back with `release` like any lent connection.
        """
        slot = self._slot_in(slot_id, SlotState.IDLE)
        self._idle.remove(slot_id)
        slot.state = SlotState.LENT
        slot.lent_at = now

    def idle_lost(self, slot_id: int) -> list[Action[W]]:
        """An idle connection was found dead: close it (it counts as lost)."""
        slot = self._slot_in(slot_id, SlotState.IDLE)
        self._idle.remove(slot_id)
        return self._lost(slot)

    def _lost(self, slot: Slot) -> list[Action[W]]:
        """`slot`'s connection was found broken by the pool: close and replace it."""
        self.counters.connections_lost += 1
        actions: list[Action[W]] = []
        self._close(slot, actions)
        self._refill(actions)
        self._grow(actions)
        return actions

    # -- connections -------------------------------------------------------

    def connected(self, slot_id: int, now: float, connect_seconds: float) -> list[Action[W]]:
        """A connection attempt succeeded (connection configured).

        A new connection serves a waiting client even if its lifetime is
        already over (a tiny ``max_lifetime``): every connection made serves.
        """
        slot = self._slot_in(slot_id, SlotState.CONNECTING)
        if slot.for_waiters:  # not incoming any more
            slot.for_waiters = False
            self._incoming_count -= 1
        self.counters.connections_num += 1
        self.counters.connections_ms += _ms(connect_seconds)
        self.last_error = None
        slot.backoff = None
        slot.expires_at = now + self.max_lifetime * (1 - LIFETIME_JITTER * self.random())
        # Of the generation it was made in: one established after a `drain` is new, as
        # psycopg_pool's (else drains faster than a connection is made starve every client).
        slot.generation = self._generation
        actions: list[Action[W]] = []
        self._dispatch(slot, now, actions, fresh=True)
        return actions

    def connect_failed(
        self, slot_id: int, now: float, error: object
    ) -> tuple[float | None, list[Action[W]]]:
        """A connection attempt failed.

        Returns the delay before the next attempt, or None when the slot gives
        up (it is then removed; the actions say what follows: a slot that
        replaces it waits a first backoff delay before its first attempt).
        """
        slot = self._slot_in(slot_id, SlotState.CONNECTING)
        self.counters.connections_num += 1
        self.counters.connections_errors += 1
        self.last_error = error
        actions: list[Action[W]] = []
        if self.closed or not self._needed(excluding=slot):
            self._forget(slot)
            return None, actions
        if slot.backoff is None:
            slot.backoff = Backoff(self.reconnect_timeout, self.random)
        delay = slot.backoff.failed(now)
        if delay is None:
            self._forget(slot)
            actions.append(ReconnectFailed())
            after = Backoff(math.inf, self.random).next()
            self._refill(actions, after)
            self._grow(actions, after=after)
        return delay, actions

    def attempted(self, connect_seconds: float, error: object = None) -> None:
        """Count a connection attempt made outside any slot (a null pool's `wait`).

        `error` is None if it succeeded.
        """
        self.counters.connections_num += 1
        if error is None:
            self.counters.connections_ms += _ms(connect_seconds)
        else:
            self.counters.connections_errors += 1
            self.last_error = error

    def closed_slot(self, slot_id: int) -> list[Action[W]]:
        """A slot's connection is closed (or its connect abandoned): forget it."""
        slot = self.slots[slot_id]
        self._forget(slot)
        if slot.state is SlotState.IDLE:
            self._idle.remove(slot_id)
        actions: list[Action[W]] = []
        if slot.state is SlotState.CLOSING:
            self._closing -= 1
        else:
            # Lost without being asked to close (e.g. found broken when idle).
            self.counters.connections_lost += 1
        self._refill(actions)
        self._grow(actions)
        return actions

    def tick(self, now: float) -> list[Action[W]]:
        """Time passed: fail waiters past their deadline, close expired and surplus idle."""
        actions: list[Action[W]] = []
        in_order, deadlines = self._in_order, self._deadlines
        while in_order and in_order[0][0] <= now:
            self._expire(in_order.popleft(), now, actions)
        while deadlines and deadlines[0][0] <= now:
            self._expire(heapq.heappop(deadlines)[::2], now, actions)
        for slot_id in list(self._idle):
            slot = self.slots[slot_id]
            if slot.expires_at <= now:
                self._idle.remove(slot_id)
                self._close(slot, actions)
        for slot in self._pipelining.values():
            if slot.expires_at <= now:
                slot.held = True  # closed once its statements are done
        while self._idle and self._staying() > self.min_size:
            oldest = self.slots[self._idle[0]]
            if oldest.idle_since + self.max_idle > now:
                break
            self._idle.pop(0)
            self._close(oldest, actions)
        self._refill(actions)
        self._serve_statements(now, actions)
        return actions

    # -- administration ----------------------------------------------------

    def resize(self, min_size: int, max_size: int | None) -> list[Action[W]]:
        """Change the sizes (already validated by the caller).

        Over the new ``max_size``, idle connections and connection attempts
        are closed at once, lent ones when they come back.
        """
        self.min_size, self.max_size = min_size, max_size
        actions: list[Action[W]] = []
        while self._idle and self.max_size is not None and self._staying() > self.max_size:
            self._close(self.slots[self._idle.pop(0)], actions)
        # Then connection attempts over the new limit, newest first.
        for slot in reversed(list(self.slots.values())):
            if self.max_size is None or self._staying() <= self.max_size:
                break
            if slot.state is SlotState.CONNECTING:
                self._close(slot, actions)
        if self.max_size is not None and self._staying() > self.max_size:
            # Still above: pipelining slots drain (the surplus is closed then).
            for slot in self._pipelining.values():
                slot.held = True
        self._refill(actions)
        self._grow(actions)
        actions.append(Wake())
        return actions

    def drain(self, since_slot: int | None = None) -> list[Action[W]]:
        """Replace every connection: idle ones now, lent ones when they come back.

        Connections being opened are kept once established (they are made
        after the drain, as psycopg_pool's rule has it).

        With `since_slot`, only if that slot belongs to the newest generation of
        connections (so that many connections failing together drain once).
        """
        if since_slot is not None:
            slot = self.slots.get(since_slot)
            if slot is None or slot.generation != self._generation:
                return []
        self._generation += 1
        actions: list[Action[W]] = []
        for slot_id in list(self._idle):
            self._idle.remove(slot_id)
            self._close(self.slots[slot_id], actions)
        self._refill(actions)
        return actions

    def close(self) -> list[Action[W]]:
        """Stop serving: fail every waiter, close idle and connecting slots.

        Lent, pipelining and resetting connections are closed when they come
        back (pipelining ones when their statements are done).
        """
        if self.closed:
            return []
        self.closed = True
        actions: list[Action[W]] = [Reject(waiter) for waiter in self._waiters]
        self.counters.requests_errors += len(self._waiters)
        self._waiters.clear()
        self._queued = 0
        self._statements_queued = 0
        self._in_order.clear()
        self._deadlines.clear()
        for slot in list(self.slots.values()):
            if slot.state in (SlotState.IDLE, SlotState.CONNECTING):
                if slot.state is SlotState.IDLE:
                    self._idle.remove(slot.id)
                self._close(slot, actions)
        return actions

    def pop_counters(self) -> Counters:
        counters, self.counters = self.counters, Counters()
        return counters

    # -- internals ---------------------------------------------------------

    def _slot_in(self, slot_id: int, state: SlotState) -> Slot:
        slot = self.slots.get(slot_id)
        if slot is None or slot.state is not state:
            raise KeyError(f"slot {slot_id} is not {state.value}")
        return slot

    def _left_queue(self, waiter: _Waiter, now: float) -> None:
        """Book-keeping for a waiter leaving the queue (served, expired, cancelled)."""
        if waiter.queued:
            self._queued -= 1
            self.counters.requests_wait_ms += _ms(now - waiter.since)
        self._statements_queued -= waiter.statement

    def _dispatch(
        self, slot: Slot, now: float, actions: list[Action[W]], *, fresh: bool = False
    ) -> None:
        """`slot`'s connection is ready: serve a waiter, keep it idle, or close it.

        `fresh`: it was just made, so it serves a waiter even if expired.
        """
        max_size = self.max_size
        if (
            self.closed
            or slot.generation != self._generation
            or (slot.expires_at <= now and not (fresh and self._waiters))
            or (max_size is not None and len(self.slots) - self._closing > max_size)
        ):
            self._close(slot, actions)
            self._refill(actions)
            self._grow(actions)
        elif waiters := self._waiters:
            slot.lent_at = now
            if self._statements_queued and next(iter(waiters.values())).statement:
                slot.state = PIPELINING
                self._pipelining[slot.id] = slot
                self._grant_statement(slot, now, actions)  # the first, even if slot expired
                self._serve_statements(now, actions)
                if slot.expires_at < self._timer_at:  # held then (see `tick`)
                    self._timer_at = slot.expires_at
                    actions.append(Wake())
            else:
                waiter, entry = waiters.popitem(last=False)
                if entry.queued:  # (`_left_queue`, inline: every waiter's path)
                    self._queued -= 1
                    self.counters.requests_wait_ms += round((now - entry.since) * 1000)
                in_order = self._in_order
                if in_order and in_order[0][1] is waiter:  # its deadline entry, as a rule
                    in_order.popleft()
                elif in_order:
                    self._trim_in_order()
                slot.state = LENT
                actions.append(Grant(waiter, slot.id))
                if self._statements_queued and next(iter(waiters.values())).statement:
                    self._serve_statements(now, actions)
        elif self.keep_idle:
            slot.state = IDLE
            slot.idle_since = now
            deadline = slot.expires_at
            if not self._idle and self._staying() > self.min_size:
                deadline = min(deadline, now + self.max_idle)
            self._idle.append(slot.id)
            if deadline < self._timer_at:
                self._timer_at = deadline
                actions.append(Wake())
        else:
            self._close(slot, actions)

    def _accepts(self, slot: Slot) -> bool:
        """Can PIPELINING `slot` take one more statement?"""
        return (
            slot.in_flight < self.pipeline_depth
            and not slot.held
            and slot.generation == self._generation
        )

    def _place_statement(self, now: float) -> Slot | None:
        """The slot for a new statement nobody waits before, if one takes it.

        An idle connection first (no wait behind other statements), else the
        pipelining connection with the fewest statements in flight.
        """
        if self._idle:
            slot = self.slots[self._idle.pop()]
            slot.state = PIPELINING
            slot.lent_at = now
            self._pipelining[slot.id] = slot
        else:
            busy = self._least_busy()
            if busy is None:
                return None
            slot = busy
        slot.in_flight += 1
        return slot

    def _least_busy(self) -> Slot | None:
        """The pipelining slot that accepts a statement with the fewest in flight."""
        best: Slot | None = None
        for slot in self._pipelining.values():
            if self._accepts(slot) and (best is None or slot.in_flight < best.in_flight):
                best = slot
        return best

    def _grant_statement(self, slot: Slot, now: float, actions: list[Action[W]]) -> None:
        """The first waiter, a statement, is sent on PIPELINING `slot`."""
        waiter, entry = self._waiters.popitem(last=False)
        self._left_queue(entry, now)
        self._trim_in_order()
        slot.in_flight += 1
        actions.append(Grant(waiter, slot.id))

    def _serve_statements(self, now: float, actions: list[Action[W]]) -> None:
        """Place the statements at the head of the queue while slots accept them.

        Called wherever the head of the queue or a slot's room may change.
        """
        waiters = self._waiters
        while self._statements_queued and next(iter(waiters.values())).statement:
            slot = self._least_busy()
            if slot is None:
                return
            self._grant_statement(slot, now, actions)

    def _end_pipelining(self, slot: Slot, now: float) -> None:
        """`slot` has no statement in flight any more (done, or broken)."""
        del self._pipelining[slot.id]
        slot.in_flight = 0
        slot.held = False
        self.counters.usage_ms += _ms(now - slot.lent_at)

    def _queued_with(self, entry: tuple[float, W]) -> bool:
        """Is `entry` (deadline, waiter) the deadline of a waiter still queued?"""
        waiter = self._waiters.get(entry[1])
        return waiter is not None and waiter.deadline == entry[0]

    def _trim_in_order(self) -> None:
        """Drop the first entries of `_in_order` while their waiters left the queue."""
        in_order = self._in_order
        while in_order and not self._queued_with(in_order[0]):
            in_order.popleft()

    def _push_deadline(self, deadline: float, waiter: W) -> None:
        """Keep a deadline earlier than one queued before it (see `_in_order`)."""
        if len(self._deadlines) > 2 * len(self._waiters) + 64:
            # Mostly entries of waiters served since: keep only live ones.
            self._deadlines = [e for e in self._deadlines if self._queued_with(e[::2])]
            heapq.heapify(self._deadlines)
        self._sequence += 1
        heapq.heappush(self._deadlines, (deadline, self._sequence, waiter))

    def _expire(self, entry: tuple[float, W], now: float, actions: list[Action[W]]) -> None:
        """`entry`'s deadline has passed: its waiter, if still queued, fails."""
        if self._queued_with(entry):
            waiter = self._waiters.pop(entry[1])
            self._left_queue(waiter, now)
            self.counters.requests_errors += 1
            actions.append(Expire(entry[1], waiter.deadline - waiter.since))

    def _staying(self) -> int:
        """Slots not being closed: what shrinking decisions count."""
        return len(self.slots) - self._closing

    def _has_room(self) -> bool:
        return self.max_size is None or self.size < self.max_size

    def _close(self, slot: Slot, actions: list[Action[W]]) -> None:
        if slot.state is SlotState.CONNECTING and slot.for_waiters:
            self._incoming_count -= 1
        self._closing += 1
        slot.state = SlotState.CLOSING
        actions.append(Close(slot.id))

    def _open(self, actions: list[Action[W]], after: float, *, for_waiters: bool) -> None:
        # Clients waiting now count on any attempt: one started while nobody
        # waited (to keep min_size) may hang, and must not hold later ones back.
        for_waiters = for_waiters or bool(self._waiters)
        slot = Slot(self._next_slot, self._generation, for_waiters=for_waiters)
        self._next_slot += 1
        self.slots[slot.id] = slot
        self._incoming_count += for_waiters
        actions.append(Open(slot.id, after))

    def _incoming(self) -> int:
        """Connections that will serve waiters without a client returning one:
        attempts started for waiters, and returned connections being reset.

        Attempts started while nobody waited (to keep ``min_size``) do not
        count: one that hangs (a ``configure`` callback stuck, say) must not
        keep the pool from growing for the clients that wait.  A running
        count (kept where slots enter and leave those states), so that a
        burst of requests costs linear time.
        """
        return self._incoming_count

    def _forget(self, slot: Slot) -> None:
        """Remove `slot` from the books, however it ends."""
        del self.slots[slot.id]
        if (slot.state is SlotState.CONNECTING and slot.for_waiters) or (
            slot.state is SlotState.RESETTING
        ):
            self._incoming_count -= 1

    def _needed(self, excluding: Slot) -> bool:
        """Would the pool open a new connection if `excluding` did not exist?"""
        size = self.size - 1
        if size < self.min_size:
            return True
        return len(self._waiters) > self._incoming() - excluding.for_waiters

    def _refill(self, actions: list[Action[W]], after: float = 0.0) -> None:
        while self.opened and not self.closed and self.size < self.min_size:
            self._open(actions, after, for_waiters=False)

    def _grow(self, actions: list[Action[W]], *, extra: int = 0, after: float = 0.0) -> None:
        """Open connections for waiters (and `extra` clients) nothing in progress serves."""
        if not self.opened or self.closed or not self._has_room():
            return
        missing = len(self._waiters) + extra - self._incoming()
        while missing > 0 and self._has_room():
            self._open(actions, after, for_waiters=True)
            missing -= 1


_READY: Final = (SlotState.IDLE, SlotState.LENT, SlotState.PIPELINING, SlotState.RESETTING)
