"""Connection actors: one task per pooled connection, from connect to close.

An actor owns one slot of the pool (see `triopool._policy`) and the psycopg
connection made for it.  It takes commands from its mailbox, sent by the
scheduler actor (`triopool._scheduler`), and reports what happened back to
the scheduler's inbox; it never decides anything itself::

    [wait `after`] ─► connect + configure ──ok──► Connected ─► serve commands:
         ▲                 │                                    RESET ─► ResetDone
         │              failed                                  CHECK ─► Checked
         │                 ▼                                    PIPELINE ─► StatementsDone...
         └── Retry(at) ◄─ ConnectFailed  (or CLOSE: end)                    (or PipelineBroken)
                                                                CLOSE ─► (end)
                                                        at the end: Ended

While its connection is lent to a client the actor has nothing to do: the
client owns the connection until it gives it back to the scheduler.  An
actor cancelled (the pool stopping) closes its connection, unless a client
holds it: then the pool closes it when it comes back.

**One-shot statements** (the pool's ``fetch``, ``execute``...) are the
actor's own work: the scheduler hands it each statement the policy placed on
its slot (`ConnectionActor.submit`, in the scheduler's turn: adapting and
writing into libpq's output buffer never waits) and writes the buffer once
per turn (`ConnectionActor.flush`); the actor reads, in one loop while any is
in flight (the PIPELINE command starts it), delivers each result to its
caller (`trio.lowlevel.reschedule`) and reports how many are done
(`StatementsDone`).  Statements go out in libpq pipeline mode, each with its
own Sync (`triopool.connection.StatementPipeline`): one write and one read
carry many, and one statement's error touches no other.

* A caller cancelled while its statement is in flight is not waited for:
  its result is dropped when it comes.  A cancel request goes to the server
  only when every statement in flight on the connection is one whose caller
  was cancelled, and only if the policy held the slot (no statement is sent
  after the cancelled one): it cannot hit another caller's statement.
  Otherwise the statement runs to its end on the server (and commits if it
  succeeds).
* A connection that breaks with statements in flight (read, write, or a
  statement that left a transaction open) is closed at once and reported
  (`PipelineBroken`); the scheduler fails every statement still in flight
  on it and the policy replaces it.  Statements in flight when the pool
  stops get `PoolClosed`.

`Connector` makes connections (for actors, a null pool's ``wait`` and the
listener): it resolves the conninfo and kwargs (callables are called for
every connection), connects with the pool's connection class and runs the
``configure`` callback, the whole attempt bounded by the pool's timeout.
"""

from __future__ import annotations

import inspect
import logging
import math
import select
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from traceback import StackSummary
from typing import Any, Final, Protocol, TypeAlias

import outcome
import psycopg
import trio
from psycopg import pq
from trio.lowlevel import Task, reschedule

from ._policy import BROKEN, CLEAN, DIRTY, Outcome
from .connection import (
    _CANCEL_RETRY_DELAY,
    TOTAL_ROWCOUNT,
    BrokenPipeline,
    Connection,
    StatementPipeline,
)
from .errors import PoolClosed

logger = logging.getLogger("triopool")

AnyConnection: TypeAlias = Connection[Any]
ConnectionCallback: TypeAlias = Callable[[AnyConnection], Awaitable[None]]
ConninfoParam: TypeAlias = str | Callable[[], str | Awaitable[str]]
KwargsParam: TypeAlias = (
    Mapping[str, Any] | Callable[[], Mapping[str, Any] | Awaitable[Mapping[str, Any]]] | None
)
#: How an actor tells the scheduler something (never waits, never fails).
Report: TypeAlias = Callable[[object], None]

_IDLE = pq.TransactionStatus.IDLE
#: A connection in a transaction (ended by a rollback, then reusable).
DIRTY_STATES = (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR)
_OK = pq.ConnStatus.OK
#: Most reads `alive` makes (a session's end is an error message, then end of stream).
_PROBE_READS = 4
_SEVERITY = pq.DiagnosticField.SEVERITY_NONLOCALIZED
_SESSION_ENDING = (b"FATAL", b"PANIC")
#: Bound of `check_connection`'s shielded restoring of autocommit.
_RESTORE_TIMEOUT = 5.0


async def maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value  # noqa: ASYNC910  # callers checkpoint


def outcome_of(conn: AnyConnection, *, reset: bool) -> Outcome:
    """How `conn` comes back to the pool (`reset`: a ``reset`` callback is set)."""
    # libpq reports UNKNOWN unless the connection is OK: no status call needed.
    status = conn.pgconn.transaction_status
    if status == _IDLE:
        return DIRTY if reset else CLEAN
    if status in DIRTY_STATES:
        return DIRTY
    return BROKEN


def alive(conn: AnyConnection, poller: select.poll) -> bool:
    """Whether an idle connection still looks usable, without waiting.

    A server that ends a session (a terminated backend, a restart) sends a
    FATAL error, then closes the socket.  Whatever there is to read on an idle
    connection is read (a ``poll``, and only if something is there, ``recv``
    until nothing is left) and parsed by libpq, which hands an error that
    arrives outside a query to the notice handler.  The connection is dead if
    a FATAL error came, or the end of the stream, or it is not idle.  A
    notification or an ordinary notice leaves it alive (the notice goes on to
    the connection's own handler).  `poller` has the connection's socket
    registered for reading.
    """
    pgconn = conn.pgconn
    if conn.closed or pgconn.status != _OK:
        return False
    ended = False
    handler = pgconn.notice_handler

    def on_notice(notice: pq.abc.PGresult) -> None:
        nonlocal ended
        if notice.error_field(_SEVERITY) in _SESSION_ENDING:
            ended = True
        elif handler is not None:
            handler(notice)

    try:
        if not poller.poll(0):
            return pgconn.transaction_status == _IDLE  # nothing came: the common case
    except OSError:
        return False
    pgconn.notice_handler = on_notice
    try:
        for _ in range(_PROBE_READS):
            if not poller.poll(0):
                break
            pgconn.consume_input()  # OperationalError at the end of the stream
            pgconn.is_busy()  # parses what came (notices go to the handler)
    except (psycopg.OperationalError, OSError):
        return False
    finally:
        pgconn.notice_handler = handler
    return not ended and pgconn.status == _OK and pgconn.transaction_status == _IDLE


@asynccontextmanager
async def autocommit(conn: AnyConnection) -> AsyncIterator[AnyConnection]:
    """`conn` in autocommit mode for a block, then as it was.

    psycopg's autocommit is the client's choice of sending ``BEGIN``: switching
    it on an idle connection sends nothing.  It is restored even if the block
    is cancelled or fails (shielded, bounded; unless the connection is closed).

    A transaction the block left open (a ``BEGIN`` sent in autocommit mode) is
    rolled back, and `psycopg.ProgrammingError` raised if the block raised
    nothing else: autocommit can only change on an idle connection, and a
    statement run this way is its own transaction.  A connection the block left
    busy (a ``COPY`` begun by ``execute``) is closed.
    """
    was_autocommit = conn.autocommit
    if not was_autocommit:
        await conn.set_autocommit(True)
    left_open = False
    try:
        yield conn
    finally:
        # Even if cancelled: the connection must not go back autocommit.  (Not
        # bounded by conn.cancel_timeout, which the pool zeroes while checking: on
        # an idle connection this does no I/O.)
        with trio.move_on_after(_RESTORE_TIMEOUT, shield=True):  # noqa: ASYNC912  # shielded cleanup
            if not conn.closed and not conn.broken:
                status = conn.pgconn.transaction_status
                try:
                    if status in DIRTY_STATES:
                        left_open = True
                        await conn.rollback()
                    elif status != _IDLE:  # ACTIVE: unusable
                        conn._close_now()
                    if not was_autocommit and not conn.closed:
                        await conn.set_autocommit(False)
                except psycopg.Error:  # the connection failed: it is discarded
                    conn._close_now()
        if conn.autocommit != was_autocommit and not conn.closed:  # not restored in time
            conn._close_now()
    if left_open:
        raise psycopg.ProgrammingError(
            "the statement left a transaction open (a BEGIN?): it was rolled back;"
            " a one-shot statement is its own transaction"
        )


def fail(callers: list[Caller], error: psycopg.Error) -> None:
    """Wake `callers` (those still waiting) with `error`, each with an error of its own."""
    for caller in callers:
        if caller.alive:
            caller.alive = False
            mine = type(error)(*error.args)
            mine.__cause__ = error.__cause__
            reschedule(caller.task, outcome.Error(mine))


async def check_connection(conn: AnyConnection) -> None:
    """A ready-made ``check`` callback: one cheap round trip to the server.

    Raises if the connection does not work.

    Checkpoints: always.  If cancelled: the round trip is abandoned as any
    cancelled query is (see `Connection`; as the pool's ``check`` the
    connection is then closed at once), and the connection's autocommit
    setting is restored unless it was closed.
    """
    async with autocommit(conn):
        await conn.execute("")


class Connector:
    """Makes the pool's connections (see the module docstring)."""

    def __init__(
        self,
        conninfo: ConninfoParam,
        kwargs: KwargsParam,
        connection_class: type[AnyConnection],
        configure: ConnectionCallback | None,
        attempt_timeout: float,
        owner: object,
    ) -> None:
        self.conninfo = conninfo
        self.kwargs = kwargs
        self.connection_class = connection_class
        self.configure = configure
        self.attempt_timeout = attempt_timeout
        #: Set as the pooled connections' ``_pool`` (``close_returns`` asks it).
        self.owner = owner

    async def _params(self) -> tuple[str, dict[str, Any]]:
        """The conninfo and kwargs for a new connection (callables called now)."""
        conninfo = self.conninfo
        if callable(conninfo):
            conninfo = await maybe_await(conninfo())
            if not isinstance(conninfo, str):
                returned = type(conninfo).__name__
                raise TypeError(f"the conninfo callable returned {returned}, not str")
        kwargs = self.kwargs
        if callable(kwargs):
            kwargs = await maybe_await(kwargs())
            if not (kwargs is None or isinstance(kwargs, Mapping)):
                raise TypeError(f"the kwargs callable returned {type(kwargs).__name__}, not a dict")
        return conninfo, dict(kwargs or {})  # noqa: ASYNC910  # nothing to wait for unless callables are async

    async def connect(self) -> AnyConnection:
        """One connection attempt for the pool: conninfo/kwargs, connect, ``configure``.

        Bounded by the pool's timeout (a ``configure`` that hangs fails the
        attempt).  The connection must be left idle by ``configure``.  The
        connection's ``_pool`` is the `owner`, as psycopg_pool sets it.

        Raises:
            psycopg.OperationalError: the attempt failed or took too long.
            Exception: whatever a callback raised.
        """
        with trio.move_on_after(self.attempt_timeout) as scope:
            conninfo, kwargs = await self._params()
            conn = await self.connection_class.connect(conninfo, **kwargs)
            try:
                if self.configure is not None:
                    await self.configure(conn)
                if conn.pgconn.transaction_status != _IDLE:
                    status = pq.TransactionStatus(conn.pgconn.transaction_status)
                    raise psycopg.ProgrammingError(
                        f"connection left in status {status.name} by configure function: discarded"
                    )
            except BaseException:
                conn._close_now()
                raise
            conn._pool = self.owner  # type: ignore[assignment]  # as psycopg_pool: for close_returns
            return conn
        assert scope.cancelled_caught
        raise psycopg.errors.ConnectionTimeout(
            f"connection attempt (connect and configure) not complete after"
            f" {self.attempt_timeout} sec"
        )

    async def connect_unpooled(self) -> AnyConnection:
        """A connection for a listener: autocommit, not configured."""
        conninfo, kwargs = await self._params()
        kwargs["autocommit"] = True
        return await self.connection_class.connect(conninfo, **kwargs)


class Lease(Protocol):
    """One loan of a connection: to whom, since when, from where (for leaks)."""

    task: Task
    at: float
    stack: StackSummary | None


# -- what the scheduler tells an actor ------------------------------------------


@dataclass(frozen=True, slots=True)
class Retry:
    """Try connecting again at `at` (trio time)."""

    at: float


RESET: Final = "reset"  # roll back / run ``reset``, then report ResetDone
CHECK: Final = "check"  # run `check_connection`, then report Checked
PIPELINE: Final = "pipeline"  # read the statements in flight until none is left
CLOSE: Final = "close"  # close the connection and end
Command: TypeAlias = Retry | str


class Caller(Protocol):
    """A one-shot statement's caller, as the scheduler gives it (`ConnectionActor.submit`).

    `alive` is true while the caller waits for its outcome; the actor wakes
    it (``reschedule(task, ...)``) and clears it.
    """

    alive: bool
    task: Task
    query: Any
    params: Any
    shape: int


# -- what an actor tells the scheduler ------------------------------------------


@dataclass(frozen=True, slots=True)
class Connected:
    actor: ConnectionActor
    seconds: float


@dataclass(frozen=True, slots=True)
class ConnectFailed:
    actor: ConnectionActor
    error: Exception


@dataclass(frozen=True, slots=True)
class ResetDone:
    actor: ConnectionActor
    ok: bool


@dataclass(frozen=True, slots=True)
class Checked:
    actor: ConnectionActor
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class StatementsDone:
    """`count` statements in flight on the actor's connection are done."""

    actor: ConnectionActor
    count: int


@dataclass(frozen=True, slots=True)
class PipelineBroken:
    """The connection broke with statements in flight (it is closed)."""

    actor: ConnectionActor
    error: BrokenPipeline


@dataclass(frozen=True, slots=True)
class Ended:
    actor: ConnectionActor


class ConnectionActor:
    """The task owning one slot's connection (see the module docstring).

    Attributes the scheduler and clients read or set (never across a
    checkpoint of this actor): `conn` (once connected), `lease` (the loan of
    the connection to a client: set by the scheduler when it lends it,
    cleared when the client gives it back), `poller` (for `alive`),
    `pipeline` (one-shot statements, once it carried one) and `reading`
    (its loop reading statements runs, or is asked to).
    """

    __slots__ = (
        "_cancel_wanted",
        "_close_requested",
        "_commands",
        "_connect_scope",
        "_wake_scope",
        "conn",
        "lease",
        "mailbox",
        "name",
        "pipeline",
        "poller",
        "reading",
        "slot",
    )

    def __init__(self, slot: int, name: str) -> None:
        self.slot = slot
        self.name = name
        self.conn: AnyConnection | None = None
        self.lease: Lease | None = None
        #: The connection's socket, registered for reading (see `alive`).
        self.poller = select.poll()
        self.mailbox, self._commands = trio.open_memory_channel[Command](math.inf)
        self._connect_scope = trio.CancelScope()  # the attempt in progress
        self._close_requested = False
        self.pipeline: StatementPipeline[Caller] | None = None
        self.reading = False
        # Around the waits of the reading loop: cancelled to wake it (output to
        # write that the socket did not take; a cancel request wanted).
        self._wake_scope: trio.CancelScope | None = None
        self._cancel_wanted = False

    def __repr__(self) -> str:
        return f"<ConnectionActor {self.name!r} slot {self.slot}>"

    def command(self, command: Command) -> None:
        """Queue `command` (never waits).  CLOSE also abandons a connection attempt."""
        try:
            self.mailbox.send_nowait(command)
        except trio.BrokenResourceError:
            return  # ended already
        if command is CLOSE:
            self._close_requested = True
            self._connect_scope.cancel()

    async def run(
        self,
        connector: Connector,
        reset: ConnectionCallback | None,
        timeout: float,  # noqa: ASYNC109  # bounds each reset and check
        report: Report,
        after: float,
    ) -> None:
        """Connect, then serve commands until CLOSE; report `Ended` at the end."""
        try:
            with self._commands:
                if after > 0:
                    told_to_close = not await self._wait_until(trio.current_time() + after)
                    if told_to_close:
                        return
                if not await self._establish(connector, report):
                    return  # noqa: ASYNC910  # after a connection attempt
                assert self.conn is not None
                async for command in self._commands:
                    if command is CLOSE:
                        break
                    if command is PIPELINE:
                        await self._read_statements(report)
                    elif command is RESET:
                        report(ResetDone(self, await self._reset(self.conn, reset, timeout)))
                    elif command is CHECK:
                        report(Checked(self, await self._check(self.conn, timeout)))
        finally:
            if self.conn is not None and self.lease is None:
                self.conn._close_now()
            if self.pipeline is not None:  # the pool stopped: the scheduler is gone
                callers, _ = self.pipeline.abandon()
                fail(callers, PoolClosed("the pool was closed with the statement in flight"))
            report(Ended(self))

    # -- one-shot statements ---------------------------------------------------------

    def submit(self, caller: Caller) -> None:
        """Send `caller`'s statement on this actor's connection (the scheduler's turn).

        Never waits: the statement goes into libpq's output buffer (see `flush`)
        and the actor is asked to read (PIPELINE) unless it does already.

        Raises:
            BrokenPipeline: the connection is broken.
            Exception: the statement could not be adapted (nothing was sent).
        """
        pipeline = self.pipeline
        if pipeline is None:
            assert self.conn is not None
            pipeline = self.pipeline = StatementPipeline(self.conn)
        if caller.shape == TOTAL_ROWCOUNT:
            pipeline.send_many(caller, caller.query, caller.params)
        else:
            pipeline.send(caller, caller.query, caller.params, caller.shape)
        if not self.reading:
            self.reading = True
            self.command(PIPELINE)

    def flush(self) -> None:
        """Write the statements submitted this turn (never waits).

        What the socket does not take now the reading loop writes as it can.

        Raises:
            BrokenPipeline: the connection is broken.
        """
        assert self.pipeline is not None
        if not self.pipeline.flush() and self._wake_scope is not None:
            self._wake_scope.cancel()  # it waits to read only: wait to write too

    def is_last(self, caller: object) -> bool:
        """Whether `caller`'s statement is the last one sent on this connection."""
        return self.pipeline is not None and self.pipeline.last is caller

    def want_cancel(self) -> None:
        """Ask the server to cancel what runs, once every statement in flight is
        one whose caller was cancelled (the policy holds the slot meanwhile)."""
        self._cancel_wanted = True
        if self._wake_scope is not None:
            self._wake_scope.cancel()

    async def _read_statements(self, report: Report) -> None:  # noqa: ASYNC910  # runs with statements in flight: the loop awaits
        """Read and deliver the statements in flight until none is left (PIPELINE)."""
        pipeline = self.pipeline
        assert pipeline is not None
        try:
            while pipeline.in_flight:
                if self._cancel_wanted and self._only_abandoned():
                    await self._cancel_abandoned(pipeline, report)
                    continue
                with trio.CancelScope() as self._wake_scope:  # noqa: ASYNC912  # the wake-up scope: the scheduler cancels it
                    while pipeline.in_flight:
                        await pipeline.wait()
                        self._deliver(pipeline.read(), report)
                        if self._cancel_wanted and self._only_abandoned():
                            break
                self._wake_scope = None
        except BrokenPipeline as error:
            if self.conn is not None:
                self.conn._close_now()
            report(PipelineBroken(self, error))
        finally:
            self._wake_scope = None
            self._cancel_wanted = False
            self.reading = False

    def _only_abandoned(self) -> bool:
        """Every statement in flight is one whose caller was cancelled."""
        assert self.pipeline is not None
        return not any(caller.alive for caller in self.pipeline.tokens())

    async def _cancel_abandoned(self, pipeline: StatementPipeline[Caller], report: Report) -> None:  # noqa: ASYNC910  # runs with statements in flight: the loop awaits
        """Cancel on the server the statements of cancelled callers, all that is in flight.

        A cancel request that reaches the server before it started the
        statement is ignored: it is repeated (after 0.05 s, 0.1 s...) while
        such statements are in flight.  Nothing new is sent meanwhile (the
        policy holds the slot), so a request can hit none but them.
        """
        conn = self.conn
        assert conn is not None
        delay = _CANCEL_RETRY_DELAY
        while pipeline.in_flight and self._only_abandoned():
            with trio.move_on_after(conn.cancel_timeout):  # noqa: ASYNC912  # bounds the cancel request, which is the cancel point
                try:
                    await conn._send_cancel_request()
                except psycopg.Error as ex:
                    logger.debug("%s: cancel request failed: %s", self.name, ex)
            with trio.move_on_after(delay):  # noqa: ASYNC912  # bounds the wait for the answer
                while pipeline.in_flight:
                    await pipeline.wait()
                    self._deliver(pipeline.read(), report)
            delay *= 2

    def _deliver(self, done: list[tuple[Caller, outcome.Outcome[Any]]], report: Report) -> None:
        """Wake the callers of the statements `done`; tell the scheduler how many."""
        if not done:
            return
        for caller, result in done:
            if caller.alive:
                caller.alive = False
                reschedule(caller.task, result)
            elif isinstance(result, outcome.Error):
                logger.debug(
                    "%s: dropped the error of a cancelled caller: %s", self.name, result.error
                )
        report(StatementsDone(self, len(done)))

    async def _wait_until(self, at: float) -> bool:
        """Sleep until `at` unless told to close first; False if told to close."""
        with trio.move_on_at(at):
            command = await self._commands.receive()
            assert command is CLOSE, command
            return False
        return True

    async def _establish(self, connector: Connector, report: Report) -> bool:
        """Connect (retrying as the scheduler says); False if told to close first."""
        while not self._close_requested:
            started = trio.current_time()
            with trio.CancelScope() as self._connect_scope:  # noqa: ASYNC912  # the attempt is the cancel point
                try:
                    conn = await connector.connect()
                except Exception as ex:
                    logger.warning("%s: error connecting: %s", self.name, ex)
                    report(ConnectFailed(self, ex))
                else:
                    self.conn = conn
                    self.poller.register(conn.pgconn.socket, select.POLLIN)
                    report(Connected(self, trio.current_time() - started))
                    return True
            if self._connect_scope.cancelled_caught:
                return False  # noqa: ASYNC910  # after a connection attempt
            command = await self._commands.receive()
            if not isinstance(command, Retry) or not await self._wait_until(command.at):
                return False
        return False  # noqa: ASYNC910  # told to close before an attempt

    async def _reset(
        self,
        conn: AnyConnection,
        reset: ConnectionCallback | None,
        timeout: float,  # noqa: ASYNC109
    ) -> bool:
        """Bring a returned connection back to idle: whether that worked."""
        ok = False
        with trio.move_on_after(timeout):  # noqa: ASYNC912  # nothing to reset is fine
            try:
                if conn.pgconn.transaction_status in DIRTY_STATES:
                    await conn.rollback()
                if reset is not None:
                    await reset(conn)
                ok = not conn.closed and conn.pgconn.transaction_status == _IDLE
                if not ok:
                    logger.warning("%s: connection left not idle by reset: discarded", self.name)
            except Exception as ex:
                logger.warning("%s: error resetting connection: %s", self.name, ex)
        return ok  # noqa: ASYNC910  # a background task's step

    async def _check(self, conn: AnyConnection, timeout: float) -> Outcome:  # noqa: ASYNC109
        """`check_connection` for ``pool.check()``: how the connection comes back."""
        with trio.move_on_after(timeout):  # noqa: ASYNC912  # the check is the cancel point
            try:
                await check_connection(conn)
            except Exception as ex:
                logger.warning("%s: discarding broken connection: %s", self.name, ex)
                return BROKEN  # noqa: ASYNC910  # after the check's round trip
            return outcome_of(conn, reset=False)
        return BROKEN
