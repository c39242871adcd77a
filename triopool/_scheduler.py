"""The scheduler actor: the one task that decides who gets which connection.

Every request reaches the scheduler as a message on its inbox, an unbounded
trio memory channel: clients' acquires (`Request`), one-shot statements
(`Statement`) and releases (`Release`), the connection actors' reports
(`triopool._actor`), and the administrative calls (`Resize`, `Drain`,
`CheckIdle`, `Shutdown`, `WaitReady`, `Attempted`).
The scheduler is the only owner of the pool's state, the pure policy
(`triopool._policy.PoolPolicy`): each turn it waits for one message, drains
whatever else arrived since its last turn, feeds the whole batch to the
policy, and carries out the policy's actions: it wakes served clients with
their connection, starts connection actors and sends them commands.  It
waits for the next message under one ``trio.move_on_at`` set to the policy's
next deadline, which is how request timeouts, idle shrink and
``max_lifetime`` happen: requests need no cancel scope of their own.

Where each guarantee lives:

* **FIFO and ``max_waiting``**: the policy's queue (`PoolPolicy.request`,
  `PoolPolicy._dispatch`); the inbox keeps arrival order.
* **Deadlines**: the policy's deadline heap, fired by this actor's
  ``move_on_at`` (`Scheduler.run`).
* **Hand-off without loss**: a client parks in
  `trio.lowlevel.wait_task_rescheduled` after sending its `Request`; the
  scheduler wakes it with ``reschedule`` (a connection, or an error).  trio
  calls a parked task's abort function only if it was not rescheduled, so
  exactly one of "served" and "cancelled" happens.  The abort marks the
  request dead and sends it again, so the policy forgets it; a connection
  the policy granted to a dead request goes back through the policy (to
  the next waiter or to idle).  The scheduler never wakes a dead request.
* **Releases never wait**: `Scheduler.release` is a ``send_nowait``, safe in
  cancelled cleanup; once the scheduler has stopped, the connection is
  closed at once instead.
* **No broken connection handed out from idle**: before lending an idle
  connection the scheduler looks at its socket without waiting
  (`triopool._actor.alive`); a dead one is closed and replaced.
* **One-shot statements**: a `Statement` is queued and placed by the policy
  like an acquire (one FIFO for both kinds); once placed on a slot it is
  sent there at once (`triopool._actor.ConnectionActor.submit`), every
  connection written to is flushed once at the end of the turn, and the
  actor delivers its outcome to the caller.  A caller cancelled with its
  statement in flight re-sends it dead: the policy says whether the actor
  may send a cancel request (`PoolPolicy.statement_cancelled`).  A broken
  pipeline (found by the actor, or here while writing) fails every
  statement in flight on it, each caller with its own error, and its slot
  is replaced.

Two bypasses of the inbox, each taken only when it does exactly what the
scheduler's next turn would, so FIFO and the policy's books hold:
`Scheduler.lend_idle` lends an idle connection from the client's task (no
message waiting, so nobody queued); `Scheduler.release` gives a clean one
back to idle (no message waiting, nobody queued) or hands it to the borrower
heading the queue (only requests waiting in the inbox: they queue behind it
whatever the order).  A client alone on the pool then never waits for the
scheduler's turn, and under load a return is no message (see the
architecture docs for what they buy).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from traceback import StackSummary
from typing import Any

import outcome
import psycopg
import trio
from trio.lowlevel import Abort, Task, reschedule, wait_task_rescheduled

from ._actor import (
    CHECK,
    CLOSE,
    RESET,
    AnyConnection,
    Checked,
    Connected,
    ConnectFailed,
    ConnectionActor,
    ConnectionCallback,
    Connector,
    Ended,
    PipelineBroken,
    ResetDone,
    Retry,
    StatementsDone,
    alive,
    fail,
)
from ._policy import (
    CLEAN,
    PIPELINING,
    Action,
    Close,
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
from .connection import BrokenPipeline
from .errors import PoolClosed, PoolTimeout, TooManyRequests

logger = logging.getLogger("triopool")


class Request:
    """A client's request for a connection (see the module docstring).

    Made at `at`; once served, it is the loan (`triopool._actor.Lease`): `at`
    is then when the connection was lent, `stack` where (for leak reports).
    """

    __slots__ = ("_post", "alive", "at", "deadline", "stack", "task")

    def __init__(
        self, task: Task, at: float, deadline: float, post: Callable[[Request], bool]
    ) -> None:
        self.task = task
        self.at = at
        self.deadline = deadline
        self.alive = True
        self.stack: StackSummary | None = None
        self._post = post

    def abort(self, _: object) -> Abort:
        """The parked client was cancelled first: withdraw the request.

        It is marked dead and sent again, so that the scheduler forgets it
        (once stopped, there is nothing to forget).
        """
        self.alive = False
        self._post(self)
        return Abort.SUCCEEDED


class Statement(Request):
    """A one-shot statement: its caller's request, and what to send (see `Scheduler.execute`).

    `shape` is what the caller gets back (`triopool.connection.ROWS`...);
    `actor` is set once the statement is sent on that actor's connection.
    """

    __slots__ = ("actor", "params", "query", "shape")

    def __init__(
        self,
        task: Task,
        at: float,
        deadline: float,
        post: Callable[[Request], bool],
        query: Any,
        params: Any,
        shape: int,
    ) -> None:
        super().__init__(task, at, deadline, post)
        self.query = query
        self.params = params
        self.shape = shape
        self.actor: ConnectionActor | None = None


class Release:
    """A lent connection comes back at `at` (`by_pool`: the pool had it, not a user).

    The time is the client's: the policy's books (usage, idle since) do not
    depend on when the scheduler's turn comes.
    """

    __slots__ = ("actor", "at", "by_pool", "outcome")

    def __init__(self, actor: ConnectionActor, outcome: Outcome, by_pool: bool, at: float) -> None:
        self.actor = actor
        self.outcome = outcome
        self.by_pool = by_pool
        self.at = at


@dataclass(eq=False)
class Resize:
    min_size: int
    max_size: int | None
    done: trio.Event = field(default_factory=trio.Event)


@dataclass(eq=False)
class Drain:
    """Replace every connection (`since_slot`: only if that one is of the newest generation)."""

    since_slot: int | None = None
    done: trio.Event = field(default_factory=trio.Event)


@dataclass(eq=False)
class CheckIdle:
    """Check every idle connection; `done` once all checks are over."""

    done: trio.Event = field(default_factory=trio.Event)
    pending: int = 0


@dataclass(eq=False)
class Shutdown:
    """Stop serving; the scheduler ends once the connections not lent are closed."""

    timeout: float  # noqa: ASYNC109  # seconds, then the remaining actors are cancelled


@dataclass(eq=False)
class WaitReady:
    """`done` once ``min_size`` connections are established (or the pool closed)."""

    done: trio.Event = field(default_factory=trio.Event)


@dataclass(frozen=True, slots=True)
class Attempted:
    """A connection attempt made outside the pool's slots (a null pool's ``wait``)."""

    seconds: float
    error: Exception | None


class Scheduler:
    """The scheduler actor of one pool (see the module docstring).

    Client-side methods (`submit`, `lend_idle`, `execute`, `release`, `call`,
    `tell`) are called from
    client tasks; `run` is the actor.
    """

    def __init__(
        self,
        policy: PoolPolicy[Request],
        name: str,
        connector: Connector,
        reset: ConnectionCallback | None,
        timeout: float,  # noqa: ASYNC109  # bounds resets and checks
        reconnect_failed: Callable[[], None],
        timeout_error: Callable[[float], PoolTimeout],
    ) -> None:
        self.policy = policy
        self.name = name
        self._connector = connector
        self._reset = reset
        self._timeout = timeout
        self._reconnect_failed = reconnect_failed
        self._timeout_error = timeout_error
        #: Actors by slot: every slot the policy knows has one (until it ends).
        self.actors: dict[int, ConnectionActor] = {}
        #: The actor owning each connection (once connected, until it ends).
        self.actor_of: dict[AnyConnection, ConnectionActor] = {}
        self._inbox, self._messages = trio.open_memory_channel[object](math.inf)
        self._nursery: trio.Nursery | None = None
        self._checks: dict[int, CheckIdle] = {}  # slot -> the CheckIdle it is part of
        self._ready_waiters: list[trio.Event] = []
        self._to_flush: list[ConnectionActor] = []  # written to in this turn
        self._close_deadline = math.inf
        #: Messages sent and not handled yet (the bypass needs none: `lend_idle`).
        self.pending = 0
        #: Of those, the ones that are not requests (the hand-off needs none: `release`).
        self._pending_others = 0
        #: Set (by the pool) as soon as it is told to close: nothing more is lent.
        self.closing = False
        #: The trio run's clock (set by the pool when it opens, before any request).
        self.clock: trio.abc.Clock
        self.stopped = False
        #: The cancel scope of the scheduler's wait for messages (None while it
        #: is not waiting in it: before it runs, while it ticks, once stopped).
        self._timer: trio.CancelScope | None = None

    # -- client side (never waits but where it says) ----------------------------

    def submit(self, task: Task, now: float, deadline: float) -> Request:
        """Queue a request made at `now` by `task` (the caller), to be served by
        `deadline` at most; the caller then parks itself::

            actor = await wait_task_rescheduled(scheduler.submit(...).abort)

        and is rescheduled with the `ConnectionActor` whose connection it is
        lent, or with `PoolTimeout`, `TooManyRequests` or `PoolClosed`.  If
        cancelled first: the request is withdrawn (`Request.abort`); a
        connection the policy had already granted to it goes to the next
        waiter or back to idle.  Never waits.

        Raises:
            PoolClosed: the scheduler has stopped.
        """
        request = Request(task, now, deadline, self.post)
        try:  # (`post`, inline: this is every request's path)
            self._inbox.send_nowait(request)
        except trio.ClosedResourceError:
            raise PoolClosed(f"the pool {self.name!r} is closed") from None
        self.pending += 1
        return request

    async def execute(self, statement: Statement) -> Any:
        """Queue a one-shot statement and wait for its outcome.

        Checkpoints: always (the calling task parks until the outcome).  If
        cancelled: a statement not sent yet never is; one sent is not waited
        for (its result is dropped, and only if every statement in flight on
        its connection is one whose caller was cancelled, a cancel request is
        sent: the statement may still complete, and commit, on the server).

        Raises:
            psycopg.Error: the statement failed, or its connection broke.
            PoolTimeout, TooManyRequests, PoolClosed: as for a `submit`-ted request.
        """
        self.tell(statement)
        return await wait_task_rescheduled(statement.abort)

    def lend_idle(self, task: Task, now: float) -> ConnectionActor | None:
        """The one bypass of the inbox: lend an idle connection at once, if that is
        what the scheduler's next turn would do.

        When no message waits to be handled and a connection is idle (so
        nobody is queued: the policy never keeps one idle while a client
        waits), the scheduler's next turn would do exactly this: the same
        policy call, on the same state, after the same look at the
        connection's socket.  So it is done here, from the caller's task, and
        FIFO and LIFO reuse hold.  Otherwise (None) the caller goes through the
        inbox; a closing pool lends nothing.  Worth it for a client alone on a
        pool that does anything between two requests: one task switch and
        one scheduler turn less per request (see the architecture docs for
        the numbers).  Under load the inbox is rarely empty and this path is
        rarely taken.
        """
        if self.pending or self.closing or self.stopped:
            return None
        policy = self.policy
        slot = policy.next_idle()
        if slot is None:
            return None
        actor = self.actors[slot]
        if actor.conn is None or not alive(actor.conn, actor.poller):
            return None  # the scheduler replaces it
        request = Request(task, now, now, self.post)
        lent = policy.request(request, now)
        assert lent == slot
        actor.lease = request
        return actor

    def release(self, actor: ConnectionActor, outcome: Outcome, *, by_pool: bool = False) -> None:
        """Give back the connection of `actor` (the caller held it).  Never waits.

        The other bypass of the inbox: a clean connection given back when the
        scheduler's next turn would do with it exactly what the policy does
        now is given to the policy here, from the caller's task:

        * nobody waits and no message waits to be handled: it goes idle (or
          is closed, if it expired); a client alone on the pool then never
          waits for the scheduler's turn;
        * a borrower heads the queue, no statement is queued, no deadline is
          due and only requests wait in the inbox (they queue behind that
          borrower whatever the order): it is handed to that borrower (or,
          if it was cancelled meanwhile, to the next one).  Under load, a
          return is then no message and a client is woken by the one who
          gave the connection back.

        Otherwise the release is a message.  Once the scheduler has stopped,
        the connection is closed here.
        """
        actor.lease = None
        now = self.clock.current_time()
        timer = self._timer
        if outcome is CLEAN and timer is not None and not self.closing:
            policy = self.policy
            if policy.anyone_waiting:
                bypass = (
                    not self._pending_others
                    and not policy.statements_waiting
                    and now < timer.deadline
                )
            else:
                bypass = not self.pending
            if bypass:
                self._execute(policy.release(actor.slot, now, CLEAN, by_pool=by_pool), now)
                if self._wake:  # a deadline moved earlier: the scheduler's timer follows
                    self._wake = False
                    timer.deadline = self._next_deadline()
                return
        try:  # (`post`, inline: this is every request's path)
            self._inbox.send_nowait(Release(actor, outcome, by_pool, now))
        except trio.ClosedResourceError:  # stopped: closed here
            self.settle(self.policy.release(actor.slot, now, outcome, by_pool=by_pool), now)
        else:
            self.pending += 1
            self._pending_others += 1

    def tell(self, message: object) -> None:
        """Send `message` without waiting for it to be handled.

        Raises:
            PoolClosed: the scheduler has stopped.
        """
        if not self.post(message):
            raise PoolClosed(f"the pool {self.name!r} is closed")

    def post(self, message: object) -> bool:
        """Put `message` on the inbox; False if the scheduler has stopped."""
        try:
            self._inbox.send_nowait(message)
        except trio.ClosedResourceError:
            return False
        self.pending += 1
        if not isinstance(message, Request):
            self._pending_others += 1
        return True

    async def call(self, message: Resize | Drain | CheckIdle | WaitReady) -> None:
        """Send `message` and wait until it is handled.

        Checkpoints: always.  If cancelled: the message is still handled.
        """
        self.tell(message)
        await message.done.wait()

    # -- the actor -----------------------------------------------------------------

    async def run(self, nursery: trio.Nursery) -> None:  # noqa: ASYNC910  # its loop awaits messages
        """Serve until the pool is closed, then cancel `nursery` (the pool's).

        The pool's connection actors run in `nursery`.  If cancelled, the
        pool is closed at once: waiting clients get `PoolClosed`,
        connections not lent are closed (by their actors, being cancelled
        too), lent ones when they come back.
        """
        self._nursery = nursery
        policy = self.policy
        messages = self._messages
        clock = self.clock
        try:
            self._execute(policy.open(), clock.current_time())
            while not self._finished():
                # One cancel scope for as long as no deadline passes: its deadline
                # moves with the policy's (a scope per turn would cost more than
                # the rest of the turn).
                with trio.CancelScope(deadline=self._next_deadline()) as timer:
                    self._timer = timer
                    while True:
                        first = await messages.receive()
                        self._wake = False
                        now = clock.current_time()
                        self._handle(first, now)
                        while True:
                            try:
                                message = messages.receive_nowait()
                            except trio.WouldBlock:
                                break
                            self._handle(message, now)
                        if self._to_flush:
                            self._flush(now)
                        if self._ready_waiters:
                            self._notify_ready()
                        if policy.closed and self._finished():
                            break
                        if self._wake:
                            timer.deadline = self._next_deadline()
                self._timer = None
                now = clock.current_time()
                self._execute(policy.tick(now), now)
                if self._to_flush:
                    self._flush(now)
                if self._ready_waiters:
                    self._notify_ready()
        finally:
            self._stop()
            nursery.cancel_scope.cancel()

    def _next_deadline(self) -> float:
        """When the scheduler must act without a message: the policy's next deadline."""
        return min(self.policy.next_deadline(), self._close_deadline)

    _wake = False  # a handled message moved a deadline earlier (or closed the pool)

    def _finished(self) -> bool:
        """After `Shutdown`: every connection not lent to a client is closed, or time is up."""
        policy = self.policy
        if not policy.closed:
            return False
        remaining = policy.size - policy.count(SlotState.LENT) + len(self._checks)
        return remaining == 0 or trio.current_time() >= self._close_deadline

    def _handle(self, message: object, now: float) -> None:
        """Feed one message to the policy and carry out what it decides."""
        self.pending -= 1
        if not isinstance(message, Request):
            self._pending_others -= 1
        policy = self.policy
        match message:  # the frequent ones first
            case Request():  # a statement too
                if message.alive:
                    self._serve(message)
                elif isinstance(message, Statement) and message.actor is not None:
                    # Its caller was cancelled with the statement in flight.
                    actor = message.actor
                    if policy.statement_cancelled(actor.slot, last=actor.is_last(message)):
                        actor.want_cancel()
                else:
                    self._execute(policy.cancel(message, now), now)
            case Release(actor=actor, at=at):
                actions = policy.release(actor.slot, at, message.outcome, by_pool=message.by_pool)
                if actions:
                    self._execute(actions, at)
            case StatementsDone(actor=actor, count=count):
                if policy.state_of(actor.slot) is PIPELINING:
                    self._execute(policy.statements_done(actor.slot, now, count), now)
            case PipelineBroken(actor=actor, error=error):
                self._pipeline_broken(actor, error, now)
            case Connected(actor=actor):
                if policy.state_of(actor.slot) is SlotState.CONNECTING:
                    assert actor.conn is not None
                    self.actor_of[actor.conn] = actor
                    self._execute(policy.connected(actor.slot, now, message.seconds), now)
                # else: being closed; CLOSE is in its mailbox.
            case ConnectFailed(actor=actor, error=error):
                self._connect_failed(actor, error, now)
            case ResetDone(actor=actor, ok=ok):
                self._execute(policy.reset_done(actor.slot, now, ok=ok), now)
            case Checked(actor=actor):
                self._execute(policy.release(actor.slot, now, message.outcome, by_pool=True), now)
                check = self._checks.pop(actor.slot)
                check.pending -= 1
                if not check.pending:
                    check.done.set()
            case Ended(actor=actor):
                self._ended(actor, now)
            case _:
                self._administer(message, now)

    def _administer(self, message: object, now: float) -> None:
        policy = self.policy
        if isinstance(message, Resize):
            self._execute(policy.resize(message.min_size, message.max_size), now)
            message.done.set()
        elif isinstance(message, Drain):
            actions = policy.drain(message.since_slot)
            if actions and message.since_slot is not None:
                logger.warning("%s: server changed role (failover?): draining the pool", self.name)
            self._execute(actions, now)
            message.done.set()
        elif isinstance(message, CheckIdle):
            self._check_idle(message, now)
        elif isinstance(message, WaitReady):
            self._ready_waiters.append(message.done)
        elif isinstance(message, Attempted):
            policy.attempted(message.seconds, message.error)
        elif isinstance(message, Shutdown):
            self._close_deadline = trio.current_time() + message.timeout
            self._execute(policy.close(), now)
            self._wake = True
        else:  # pragma: no cover  # a bug in the shell
            raise AssertionError(f"unknown message {message!r}")

    def _serve(self, request: Request) -> None:
        """A live request: lend an idle connection (if alive), else queue it.

        A statement may also be sent on a connection pipelining already.
        """
        policy = self.policy
        now = request.at
        while (slot := policy.next_idle()) is not None:
            actor = self.actors[slot]
            if actor.conn is not None and alive(actor.conn, actor.poller):
                break
            logger.warning("%s: idle connection found dead: replacing it", self.name)
            self._execute(policy.idle_lost(slot), now)
        statement = type(request) is Statement
        try:
            result = policy.request(request, now, request.deadline, statement=statement)
        except PolicyClosed:
            reschedule(request.task, outcome.Error(self._closed_error()))
            return
        except QueueFull:
            error = TooManyRequests(
                f"the pool {self.name!r} has already {policy.waiting} requests waiting"
            )
            reschedule(request.task, outcome.Error(error))
            return
        if not isinstance(result, int):  # queued
            if result:
                self._execute(result, now)
        elif statement:
            assert isinstance(request, Statement)
            self._send(request, result, now)
        else:  # lent at once (at `now`, its `at`)
            actor = self.actors[result]
            actor.lease = request
            reschedule(request.task, outcome.Value(actor))

    def _send(self, statement: Statement, slot: int, now: float) -> None:
        """Send `statement` on `slot`, where the policy placed it."""
        actor = self.actors[slot]
        try:
            actor.submit(statement)
        except BrokenPipeline as error:
            fail([statement], error)
            self._pipeline_broken(actor, error, now)
        except Exception as error:  # refused (could not be adapted): nothing sent
            statement.alive = False
            reschedule(statement.task, outcome.Error(error))
            self._execute(self.policy.statements_done(slot, now, 1), now)
        else:
            statement.actor = actor
            if actor not in self._to_flush:
                self._to_flush.append(actor)

    def _flush(self, now: float) -> None:
        """Write what this turn sent, one write per connection."""
        while self._to_flush:
            actor = self._to_flush.pop()
            try:
                actor.flush()
            except BrokenPipeline as error:
                self._pipeline_broken(actor, error, now)

    def _pipeline_broken(self, actor: ConnectionActor, error: BrokenPipeline, now: float) -> None:
        """`actor`'s connection broke with statements in flight: fail them, replace it."""
        if self.policy.state_of(actor.slot) is not PIPELINING:
            return  # handled already
        if actor.conn is not None:
            actor.conn._close_now()
        assert actor.pipeline is not None
        callers, cause = actor.pipeline.abandon()
        logger.warning(
            "%s: connection lost with %d statements in flight: %s",
            self.name,
            len(callers),
            cause or error,
        )
        fail(
            callers,
            cause
            or psycopg.OperationalError(
                f"the connection broke with the statement in flight: {error}"
            ),
        )
        self._execute(self.policy.pipeline_broken(actor.slot, now), now)

    def _connect_failed(self, actor: ConnectionActor, error: Exception, now: float) -> None:
        policy = self.policy
        if policy.state_of(actor.slot) is not SlotState.CONNECTING:
            return  # being closed; CLOSE is in its mailbox
        delay, actions = policy.connect_failed(actor.slot, now, error)
        actor.command(CLOSE if delay is None else Retry(now + delay))
        self._execute(actions, now)

    def _ended(self, actor: ConnectionActor, now: float) -> None:
        slot = actor.slot
        if self.actors.get(slot) is actor:
            del self.actors[slot]
        if actor.conn is not None:
            self.actor_of.pop(actor.conn, None)
        check = self._checks.pop(slot, None)
        if check is not None:
            check.pending -= 1
            if not check.pending:
                check.done.set()
        if slot in self.policy.slots:
            self._execute(self.policy.closed_slot(slot), now)

    def _check_idle(self, message: CheckIdle, now: float) -> None:
        policy = self.policy
        for slot in policy.idle_slots():
            policy.take_idle(slot, now)
            self._checks[slot] = message
            message.pending += 1
            self.actors[slot].command(CHECK)
        if not message.pending:
            message.done.set()

    def _notify_ready(self) -> None:
        if self.policy.closed or self.policy.ready() >= self.policy.min_size:
            for event in self._ready_waiters:
                event.set()
            self._ready_waiters.clear()

    def _closed_error(self) -> PoolClosed:
        return PoolClosed(f"the pool {self.name!r} is closed")

    def _execute(self, actions: list[Action[Request]], now: float) -> None:
        """Carry out `actions`, in order, without waiting."""
        for action in actions:
            match action:  # the frequent one first
                case Grant(waiter=request, slot=slot):
                    if type(request) is Statement:
                        assert isinstance(request, Statement)
                        if request.alive:
                            self._send(request, slot, now)
                        else:  # cancelled meanwhile: not sent
                            self._execute(self.policy.statements_done(slot, now, 1), now)
                    elif request.alive:  # lend it
                        actor = self.actors[slot]
                        request.at = now
                        actor.lease = request
                        reschedule(request.task, outcome.Value(actor))
                    else:  # cancelled meanwhile: the next waiter, or idle
                        self._execute(self.policy.release(slot, now, CLEAN, by_pool=True), now)
                case Expire(waiter=request, waited=waited):
                    if request.alive:
                        reschedule(request.task, outcome.Error(self._timeout_error(waited)))
                case Reject(waiter=request):
                    if request.alive:
                        reschedule(request.task, outcome.Error(self._closed_error()))
                case _:
                    self._carry_out(action)

    def _carry_out(self, action: Action[Request]) -> None:
        """The actions that concern no client (see `_execute`)."""
        match action:
            case Open(slot=slot, after=after):
                self._start_actor(slot, after)
            case Close(slot=slot):
                self.actors[slot].command(CLOSE)
            case Reset(slot=slot):
                self.actors[slot].command(RESET)
            case Wake():
                self._wake = True
            case ReconnectFailed():
                self._reconnect_failed()

    def _start_actor(self, slot: int, after: float) -> None:
        assert self._nursery is not None
        actor = ConnectionActor(slot, f"{self.name} conn {slot}")
        self.actors[slot] = actor
        self._nursery.start_soon(
            actor.run,
            self._connector,
            self._reset,
            self._timeout,
            self._report,
            after,
            name=actor.name,
        )

    def _report(self, message: object) -> None:
        """What connection actors tell the scheduler; ignored once it has stopped."""
        self.post(message)

    def _stop(self) -> None:
        """The scheduler ends: fail every request, forget what is not lent.

        Synchronous (it runs when the scheduler is cancelled too).  The pool's
        nursery is cancelled next: the connection actors, cancelled, close
        their connections (a command in progress is cancelled as any
        interrupted query is).  From now on `tell` raises `PoolClosed`, and a
        connection given back is closed by `release` itself, which keeps the
        policy's books.
        """
        self.stopped = True
        self._timer = None
        self._inbox.close()
        policy = self.policy
        now = self.clock.current_time()
        self.settle(policy.close(), now, close=False)
        while True:
            try:
                message = self._messages.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            if isinstance(message, Request):
                if message.alive:
                    message.alive = False
                    reschedule(message.task, outcome.Error(self._closed_error()))
            elif isinstance(message, Release):
                actions = policy.release(message.actor.slot, message.at, message.outcome)
                self.settle(actions, now, close=False)
            elif isinstance(message, (Resize, Drain, CheckIdle, WaitReady)):
                message.done.set()
        self._messages.close()
        # Checks and resets in progress are abandoned (cut by the cancellation).
        for slot, check in list(self._checks.items()):
            del self._checks[slot]
            self.settle(policy.release(slot, now, CLEAN, by_pool=True), now, close=False)
            check.done.set()
        for slot in [s.id for s in policy.slots.values() if s.state is SlotState.RESETTING]:
            self.settle(policy.reset_done(slot, now, ok=True), now, close=False)
        # Statements in flight: their actors, cancelled, fail them (PoolClosed).
        for pipelining in [s for s in policy.slots.values() if s.state is PIPELINING]:
            actions = policy.statements_done(pipelining.id, now, pipelining.in_flight)
            self.settle(actions, now, close=False)
        for event in self._ready_waiters:
            event.set()

    def settle(self, actions: list[Action[Request]], now: float, *, close: bool = True) -> None:
        """Carry out `actions` once stopped: nothing starts, nothing waits.

        `close`: close the connections the actions close (else their actors,
        being cancelled, do).
        """
        for action in actions:
            if isinstance(action, Reject) and action.waiter.alive:
                action.waiter.alive = False
                reschedule(action.waiter.task, outcome.Error(self._closed_error()))
            elif isinstance(action, Close):
                actor = self.actors.pop(action.slot, None)
                if actor is not None and actor.conn is not None:
                    self.actor_of.pop(actor.conn, None)
                    if close:
                        actor.conn._close_now()
                self.policy.closed_slot(action.slot)
