"""`ConnectionPool`, `NullConnectionPool` and `open_pool`: the public face of the pool.

This module holds the parameters and their validation, the pool's lifetime
(`ConnectionPool.run` and ``async with``), and the client side of requests.
The inside is a trio shell of actors around a pure policy:

* a **supervisor nursery**, opened by `ConnectionPool.run`, owns every task
  of the pool, so none outlives it;
* the **scheduler actor** (`triopool._scheduler`) is the only owner of the
  pool's state, the pure `triopool._policy.PoolPolicy`: every acquire,
  release, resize, check, drain and close reaches it as a message;
* one **connection actor** per connection (`triopool._actor`) owns it from
  connect to close and does what the scheduler tells it (reset, check,
  close).

See the architecture page of the docs for a message's life from `getconn`
to the connection and back.
"""

from __future__ import annotations

import logging
import math
import random
import traceback
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import Any, LiteralString, NoReturn, TypeAlias

import psycopg
import trio
from psycopg import pq, sql
from psycopg.abc import Params
from psycopg.conninfo import conninfo_to_dict
from trio.lowlevel import (
    cancel_shielded_checkpoint,
    checkpoint,
    checkpoint_if_cancelled,
    current_task,
    wait_task_rescheduled,
)

from ._actor import (
    DIRTY_STATES,
    AnyConnection,
    ConnectionActor,
    ConnectionCallback,
    Connector,
    ConninfoParam,
    KwargsParam,
    check_connection,
    maybe_await,
    outcome_of,
)
from ._groups import raise_from_group
from ._policy import BROKEN, Backoff, Outcome, PoolPolicy, SlotState
from ._runtime import require_trio
from ._scheduler import (
    Attempted,
    CheckIdle,
    Drain,
    Request,
    Resize,
    Scheduler,
    Shutdown,
    Statement,
    WaitReady,
)
from .connection import FIRST_ROW, FIRST_VALUE, ROWCOUNT, ROWS, TOTAL_ROWCOUNT, Connection
from .errors import PoolClosed, PoolTimeout
from .listener import Notifications, Source, open_listener
from .stats import Holder, PoolStatus, stats_dict

__all__ = ["ConnectionPool", "NullConnectionPool", "open_pool"]

logger = logging.getLogger("triopool")

#: Where leaving `ConnectionPool.connection` ends the transaction: ACTIVE too (another
#: task's command runs on the connection: the exit waits for it, then commits).
_UNFINISHED_STATES = (*DIRTY_STATES, pq.TransactionStatus.ACTIVE)
#: The SQLSTATE that shows a failover: a write refused by a server that became
#: a standby (``read_only_sql_transaction``).
_FAILOVER_SQLSTATE = "25006"

#: A statement for the one-shot calls (what psycopg's ``execute`` takes).
Query: TypeAlias = LiteralString | bytes | sql.SQL | sql.Composed

_pool_numbers = iter(range(1, 1 << 62))


#: Most connections a pool keeps open (``min_size``): PostgreSQL's ``MAX_BACKENDS``,
#: the most any server accepts.  ``min_size`` connections are opened at once, so
#: a bigger one could only exhaust memory and sockets (``max_size`` is reached on
#: demand only, and has no bound).
MAX_MIN_SIZE = 2**18 - 1


def _check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def _check_seconds(
    name: str, value: object, *, allow_none: bool = False, positive: bool = False
) -> float:
    if value is None and allow_none:
        return math.inf
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:  # an int too big for a float: longer than any float of seconds
        seconds = math.inf if value > 0 else -math.inf
    if math.isnan(seconds) or seconds < 0 or (positive and seconds == 0):
        raise ValueError(f"{name} must be {'>' if positive else '>='} 0, got {value}")
    return seconds


def _check_callable(name: str, value: object) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable or None, got {type(value).__name__}")


class ConnectionPool:
    """A pool of `triopool.Connection` objects, with psycopg_pool's contract.

    Construct it anywhere (no I/O happens), then open it with ``async with
    pool``, `open_pool`, or ``await nursery.start(pool.run)``.  Parameters and
    defaults are psycopg_pool's ``AsyncConnectionPool``'s (see the user guide
    for each); invalid values raise `ValueError` or `TypeError` naming the
    parameter.  A conninfo string is parsed at once, so a malformed one raises
    `psycopg.ProgrammingError` here.

    Args:
        conninfo: connection string, or a callable (sync or async) returning
            one, called for every new connection.
        kwargs: extra `Connection.connect` parameters, or a callable (sync or
            async) returning them, called for every new connection.
        connection_class: `triopool.Connection` or a subclass.
        configure: ``async def configure(conn)``, run once on each new
            connection; if it raises, or if the connection attempt with it
            takes longer than ``timeout``, the connection is discarded and the
            attempt counts as failed.
        reset: ``async def reset(conn)``, run when a connection comes back; it
            must leave the connection idle (within ``timeout``) or it is
            discarded.
        check: ``async def check(conn)``, run before a connection is handed
            out; if it raises, the connection is discarded and the client gets
            another.  `ConnectionPool.check_connection` is a ready-made one.
        min_size: connections kept open (opened at once, so at most
            262143, PostgreSQL's ``MAX_BACKENDS``).
        max_size: most connections open (``None``: ``min_size``); reached
            only on demand.
        name: used in logs (default ``pool-1``, ``pool-2``...).
        timeout: default seconds a client waits for a connection; also the
            bound of each connection attempt (connect and ``configure``) and
            of each ``reset``, so it must be > 0 (a request's own ``timeout``
            may be 0).  Seconds elsewhere may be ``math.inf``; an int too
            big for a float counts as ``math.inf``.
        max_waiting: most clients queued (0: no limit); past it,
            `TooManyRequests`.
        max_lifetime: seconds after which a connection is replaced (each
            connection's is reduced by a random 0-10 %); must be > 0.  A new
            connection always serves a waiting client first, so even a tiny
            lifetime serves clients (at the cost of reconnecting all the time).
        max_idle: seconds after which an idle connection above ``min_size`` is
            closed.
        reconnect_timeout: seconds of failing attempts after which a
            connection attempt is abandoned and ``reconnect_failed`` called;
            a new attempt then starts after a backoff delay (about 1 s), so
            even 0 makes no busy loop.
        reconnect_failed: ``reconnect_failed(pool)``, sync or async (cut
            after ``timeout``).
        close_returns: if true, ``await conn.close()`` on a lent connection
            returns it to the pool.
        leak_timeout: seconds a connection may stay lent before a warning is
            logged, with the stack that acquired it (None: never).
        drain_on_failover: if true, a query failing with
            ``read_only_sql_transaction`` (25006: the server became a standby)
            inside `connection` (or a one-shot statement failing so) drains
            the connections opened up to then (see `drain`): after a failover,
            none keeps talking to the old primary.  A single failing
            connection (a terminated backend, a network error) is replaced
            alone.
        pipeline_depth: most one-shot statements (`fetch`, `execute`...) in
            flight on one connection at a time; 1 sends the next only once
            the previous is answered.  Pipelining works behind PgBouncer in
            transaction mode too (tested with 1.18, ``prepare_threshold=None``
            as for any query there).
    """

    _keep_idle: bool = True

    def __init__(
        self,
        conninfo: ConninfoParam = "",
        *,
        kwargs: KwargsParam = None,
        connection_class: type[AnyConnection] = Connection,
        configure: ConnectionCallback | None = None,
        reset: ConnectionCallback | None = None,
        check: ConnectionCallback | None = None,
        min_size: int = 4,
        max_size: int | None = None,
        name: str | None = None,
        timeout: float = 30.0,  # noqa: ASYNC109  # psycopg_pool compatibility
        max_waiting: int = 0,
        max_lifetime: float = 3600.0,
        max_idle: float = 600.0,
        reconnect_timeout: float = 300.0,
        reconnect_failed: Callable[[ConnectionPool], Any] | None = None,
        close_returns: bool = False,
        leak_timeout: float | None = None,
        drain_on_failover: bool = True,
        pipeline_depth: int = 16,
    ) -> None:
        if not (isinstance(conninfo, str) or callable(conninfo)):
            raise TypeError(f"conninfo must be a str or a callable, got {type(conninfo).__name__}")
        if not (kwargs is None or isinstance(kwargs, Mapping) or callable(kwargs)):
            raise TypeError(f"kwargs must be a dict or a callable, got {type(kwargs).__name__}")
        if isinstance(conninfo, str):
            static_kwargs = dict(kwargs) if isinstance(kwargs, Mapping) else {}
            conninfo_to_dict(conninfo, **static_kwargs)  # malformed: ProgrammingError now
        if not (isinstance(connection_class, type) and issubclass(connection_class, Connection)):
            raise TypeError(
                f"connection_class must be triopool.Connection or a subclass,"
                f" got {connection_class!r}"
            )
        for cb_name, cb in (
            ("configure", configure),
            ("reset", reset),
            ("check", check),
            ("reconnect_failed", reconnect_failed),
        ):
            _check_callable(cb_name, cb)
        min_size, max_size = self._check_sizes(min_size, max_size)
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {type(name).__name__}")

        self.conninfo = conninfo
        self.kwargs = kwargs
        self.connection_class = connection_class
        self.name: str = name or f"pool-{next(_pool_numbers)}"
        # > 0: it also bounds every connection attempt (a request may still pass 0).
        self.timeout = _check_seconds("timeout", timeout, positive=True)
        self.max_waiting = _check_int("max_waiting", max_waiting, 0)
        self.max_lifetime = _check_seconds("max_lifetime", max_lifetime, positive=True)
        self.max_idle = _check_seconds("max_idle", max_idle)
        self.reconnect_timeout = _check_seconds("reconnect_timeout", reconnect_timeout)
        self.leak_timeout = _check_seconds("leak_timeout", leak_timeout, allow_none=True)
        self.close_returns = bool(close_returns)
        self.drain_on_failover = bool(drain_on_failover)
        self.pipeline_depth = _check_int("pipeline_depth", pipeline_depth, 1)
        self._check = check
        self._reconnect_failed = reconnect_failed
        self._reset = reset

        self._policy: PoolPolicy[Request] = PoolPolicy(
            min_size=min_size,
            max_size=self._policy_max(max_size),
            max_waiting=self.max_waiting,
            max_idle=self.max_idle,
            max_lifetime=self.max_lifetime,
            reconnect_timeout=self.reconnect_timeout,
            keep_idle=self._keep_idle,
            pipeline_depth=self.pipeline_depth,
            random=random.random,
        )
        self._max_size = max_size
        self._connector = Connector(
            conninfo, kwargs, connection_class, configure, self.timeout, owner=self
        )
        self._scheduler = Scheduler(
            self._policy,
            self.name,
            self._connector,
            reset,
            self.timeout,
            self._on_reconnect_failed,
            self._timeout_error,
        )
        self._actor_of = self._scheduler.actor_of
        self._nursery: trio.Nursery | None = None
        self._opened = False
        self._closing = trio.Event()
        self._stopped = trio.Event()
        self._exit_stack: AsyncExitStack | None = None
        self._leak_wake = trio.Event()
        self._leak_watch_at = math.inf
        self._leaks_reported: set[ConnectionActor] = set()

    # -- sizes ----------------------------------------------------------------

    def _check_sizes(self, min_size: object, max_size: object) -> tuple[int, int]:
        min_size = _check_int("min_size", min_size, 0, MAX_MIN_SIZE)
        if max_size is None:
            max_size = min_size
        max_size = _check_int("max_size", max_size, 0)
        if max_size < min_size:
            raise ValueError("max_size must be greater or equal than min_size")
        if max_size == 0:
            raise ValueError("if min_size is 0 max_size must be greater than 0")
        return min_size, max_size

    @staticmethod
    def _policy_max(max_size: int) -> int | None:
        return max_size

    @property
    def min_size(self) -> int:
        """Connections the pool keeps open."""
        return self._policy.min_size

    @property
    def max_size(self) -> int:
        """Most connections the pool opens."""
        return self._max_size

    @property
    def closed(self) -> bool:
        """True once the pool is closed, or closing (it cannot be reopened)."""
        return self._closing.is_set() or self._policy.closed

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open" if self._opened else "new"
        return f"<{type(self).__name__} {self.name!r} ({state}) at 0x{id(self):x}>"

    # -- lifetime -------------------------------------------------------------

    async def run(  # noqa: ASYNC910  # the nursery's exit waits for the pool's tasks
        self, *, task_status: trio.TaskStatus[ConnectionPool] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Open the pool and serve until it is closed.

        For ``await nursery.start(pool.run)``: ``started(pool)`` is reported
        once the supervisor runs (filling to ``min_size`` continues in the
        background; use `wait` to wait for it).  Returns after `close`.  If the
        task running it is cancelled, the pool is closed and its connections
        (but those lent out, closed when they come back) are closed.

        Raises:
            PoolClosed: the pool was already opened or closed.
            RuntimeError: not called from a trio task.
        """
        require_trio("ConnectionPool.run")
        if self._opened or self.closed:
            raise PoolClosed(f"{self.name}: a pool can be opened only once")
        self._opened = True
        self._scheduler.clock = trio.lowlevel.current_clock()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._scheduler.run, nursery, name=f"{self.name} scheduler")
                if self.leak_timeout < math.inf:
                    nursery.start_soon(self._watch_leaks, name=f"{self.name} leak watch")
                task_status.started(self)
        except BaseExceptionGroup as group:
            raise_from_group(group)
        finally:
            self._nursery = None
            self._stopped.set()

    async def __aenter__(self) -> ConnectionPool:  # noqa: ASYNC910  # nursery.start waits
        """Open the pool (see `run`); filling starts in the background.

        Raises:
            PoolClosed: the pool was already opened or closed.
            RuntimeError: not called from a trio task.
        """
        require_trio("async with ConnectionPool")
        try:
            async with AsyncExitStack() as stack:
                nursery = await stack.enter_async_context(trio.open_nursery())
                await nursery.start(self.run)
                self._exit_stack = stack.pop_all()
        except BaseExceptionGroup as group:
            raise_from_group(group)
        return self  # noqa: ASYNC910  # nursery.start waited

    async def __aexit__(  # noqa: ASYNC910  # close() checkpoints; raise_from_group raises
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool:
        """Close the pool, then wait for its background tasks to end.

        An exception from the block comes out unchanged (an `ExceptionGroup`
        included); one the pool's own tasks raised comes out alone, not
        wrapped in a group, unless the block raised something else too.
        """
        stack, self._exit_stack = self._exit_stack, None
        assert stack is not None, "pool exited without being entered"
        try:
            with trio.CancelScope(shield=exc_type is not None):
                await self.close()  # noqa: ASYNC102  # close() is bounded by its timeout
        except BaseException as close_exc:  # cancelled while closing  # noqa: ASYNC103  # handed to the nursery's exit, which re-raises it
            exc_type, exc_val, exc_tb = type(close_exc), close_exc, close_exc.__traceback__
        try:
            return bool(await stack.__aexit__(exc_type, exc_val, exc_tb))  # noqa: ASYNC102  # the nursery exit waits for tasks close() bounded
        except BaseExceptionGroup as group:
            raise_from_group(group, body=exc_val)

    async def close(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109  # psycopg_pool API
        """Close the pool.

        Waiting and future requests fail with `PoolClosed`; idle connections
        are closed; connections lent out are closed when they come back;
        background tasks are given `timeout` seconds to end, then cancelled.
        Closing a closed pool does nothing.

        Checkpoints: always; waits for the background tasks to end.  If
        cancelled: the pool is closed all the same (background tasks keep
        ending in their nursery).
        """
        wait_for = _check_seconds("timeout", timeout)
        if not self._opened:
            self._policy.close()
            await checkpoint()
            return
        if not self._closing.is_set():
            self._closing.set()
            self._scheduler.closing = True
            try:
                self._scheduler.tell(Shutdown(wait_for))
            except PoolClosed:
                pass  # stopped already
        await self._stopped.wait()

    async def wait(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109  # psycopg_pool API
        """Wait until ``min_size`` connections are ready.

        Checkpoints: always.  If cancelled: nothing changes.

        Raises:
            PoolTimeout: not ready in time; the pool is then closed and the
                last connection error, if any, is the ``__cause__``.
            PoolClosed: the pool is closed or not open.
        """
        wait_for = _check_seconds("timeout", timeout)
        self._check_open()
        if self._policy.ready() >= self._policy.min_size:
            await checkpoint()
            return
        with trio.move_on_after(wait_for) as scope:
            await self._scheduler.call(WaitReady())
        if self.closed:
            # Closed by the cancellation that also ends this wait: Cancelled wins.
            await checkpoint_if_cancelled()
            raise PoolClosed(f"the pool {self.name!r} is closed")
        if scope.cancelled_caught:
            cause = self._policy.last_error
            await self.close()
            raise PoolTimeout(f"pool initialization incomplete after {timeout} sec") from (
                cause if isinstance(cause, BaseException) else None
            )

    def _check_open(self) -> None:
        require_trio(f"{type(self).__name__} methods")
        if self.closed:
            raise PoolClosed(f"the pool {self.name!r} is closed")
        if not self._opened:
            raise PoolClosed(f"the pool {self.name!r} is not open")

    # -- getting connections --------------------------------------------------

    def connection(
        self,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> AbstractAsyncContextManager[AnyConnection]:
        """Borrow a connection for an ``async with`` block.

        ``async with pool.connection() as conn:`` gets a connection as
        `getconn` does.  When the block ends, a transaction in progress is
        committed (or rolled back if the block raised) and the connection goes
        back to the pool.  If the block gave the connection back itself
        (``await conn.close()`` with ``close_returns``), leaving it does not
        touch the connection again.  If another task's command is running on
        the connection, leaving waits for it, then commits; but if the block's
        own task still holds it (a ``stream()`` it left suspended, say),
        nothing can be committed: the connection is closed and replaced, and
        leaving raises `psycopg.OperationalError` (unless the block raised: its
        exception propagates).

        Checkpoints: entering always (see `getconn`); leaving only when a
        transaction is to be ended.  If cancelled while leaving: the
        transaction is rolled back (bounded, shielded) and the connection
        returned.
        """
        return _PooledConnection(self, timeout)

    async def getconn(self, timeout: float | None = None) -> AnyConnection:  # noqa: ASYNC109
        """Take a connection from the pool; give it back with `putconn`.

        Serves an idle connection at once; otherwise waits, first come first
        served, for at most `timeout` seconds (default: the pool's
        ``timeout``) and for as long as the caller's cancel scopes allow.
        With ``timeout=0`` only a connection idle now is served (the pool
        still grows, so that a next request may find one).  With a ``check``
        callback, a connection failing it is discarded and another one is
        tried within the same time: at once after the first failure, then
        after 1 s, 2 s, 4 s... (±10 %), as psycopg_pool does, so that a check
        failing on every new connection is no busy loop.  A check still
        running at the deadline is cut there: the connection it was checking
        is closed (not cancelled politely on the server, which could take
        `Connection.cancel_timeout` more).

        Checkpoints: always.  If cancelled: no connection is taken (one
        already on its way to this caller goes to the next waiter or back to
        idle).

        Raises:
            PoolTimeout: no connection within `timeout`.
            TooManyRequests: ``max_waiting`` clients are already waiting.
            PoolClosed: the pool is closed, or was closed while waiting.
            RuntimeError: not called from a trio task.
        """
        try:
            task = current_task()
        except RuntimeError:
            require_trio("ConnectionPool.getconn")
            raise
        wait_for = self._request_timeout(timeout)
        if not self._opened:
            raise PoolClosed(f"the pool {self.name!r} is not open")
        scheduler = self._scheduler
        clock = scheduler.clock
        now = clock.current_time()
        deadline = now + wait_for
        failed_checks: Backoff | None = None  # after the first failed check
        while True:  # noqa: ASYNC913  # each turn awaits the scheduler or checkpoints
            lent = None
            if not scheduler.pending:  # maybe the bypass: trio's three steps, the first
                await checkpoint_if_cancelled()
                lent = scheduler.lend_idle(task, now)
            if lent is None:
                request = scheduler.submit(task, now, deadline)
                actor: ConnectionActor = await wait_task_rescheduled(request.abort)
            else:
                actor = lent
                await cancel_shielded_checkpoint()  # a scheduling point that keeps the loan
            conn = actor.conn
            assert conn is not None
            if self._check is None:
                if self.leak_timeout < math.inf:
                    self._watch(actor)
                return conn
            try:
                with trio.move_on_at(deadline) as scope:
                    await self._run_check(conn)
                    if self._outcome(conn) is BROKEN:  # closed or broken, yet no error
                        raise psycopg.OperationalError("the check left the connection unusable")
            except Exception as ex:
                self._log(logging.WARNING, "connection failed check, discarding it: %s", ex)
                scheduler.release(actor, BROKEN, by_pool=True)
                check_error = ex
                now = trio.current_time()
            except BaseException:
                scheduler.release(actor, self._outcome(conn), by_pool=True)
                raise
            else:
                if scope.cancelled_caught:
                    scheduler.release(actor, self._outcome(conn), by_pool=True)
                    raise self._timeout_error(wait_for)
                if self.closed:  # closed while checking: a waiting request fails
                    scheduler.release(actor, self._outcome(conn), by_pool=True)
                    raise PoolClosed(f"the pool {self.name!r} is closed")
                if self.leak_timeout < math.inf:
                    self._watch(actor)
                return conn
            # The check failed: try another connection, backing off after the first.
            if failed_checks is None:
                failed_checks = self._policy.retry_delays()
                continue
            await trio.sleep_until(min(now + failed_checks.next(), deadline))
            now = trio.current_time()
            if now >= deadline:
                raise self._timeout_error(wait_for) from check_error

    def _request_timeout(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else _check_seconds("timeout", timeout)

    async def _request_deadline(self, timeout: float | None) -> tuple[float, float]:  # noqa: ASYNC109
        """Now, and the deadline of a request waiting at most `timeout` (checkpoints if cancelled).

        Raises:
            PoolClosed: the pool is not open.
        """
        await checkpoint_if_cancelled()
        wait_for = self._request_timeout(timeout)
        if not self._opened:
            raise PoolClosed(f"the pool {self.name!r} is not open")
        now = self._scheduler.clock.current_time()
        return now, now + wait_for

    async def _run_check(self, conn: AnyConnection) -> None:
        """The ``check`` callback on `conn`, cut short without ado.

        A query it runs that is cancelled (the request's deadline, the
        caller's scope) is not cancelled politely on the server (that can
        take up to `Connection.cancel_timeout`, say on a frozen server): the
        connection is closed at once, and so discarded.
        """
        assert self._check is not None
        polite = conn.cancel_timeout
        conn.cancel_timeout = 0.0
        try:
            await self._check(conn)
        finally:
            conn.cancel_timeout = polite

    def _watch(self, actor: ConnectionActor) -> None:
        """Record where `actor`'s connection was taken, for the leak watch."""
        lease = actor.lease
        assert lease is not None
        lease.stack = traceback.StackSummary.from_list(traceback.extract_stack()[:-2])
        if self._leak_watch_at == math.inf:
            self._leak_wake.set()

    def _timeout_error(self, wait_for: float) -> PoolTimeout:
        """psycopg_pool's message, then what the pool looked like."""
        policy = self._policy
        cause = policy.last_error
        lent = sum(1 for actor in self._scheduler.actors.values() if actor.lease is not None)
        details = (
            f"pool {self.name!r}: {policy.size} connections, {policy.available} idle,"
            f" {lent} lent, {policy.count(SlotState.CONNECTING)} connecting;"
            f" {policy.waiting} requests waiting"
        )
        if isinstance(cause, BaseException):
            details += f"; last connection error: {type(cause).__name__}: {cause}"
        error = PoolTimeout(f"couldn't get a connection after {wait_for:.2f} sec ({details})")
        if isinstance(cause, BaseException):
            error.__cause__ = cause
        return error

    async def putconn(self, conn: AnyConnection) -> None:  # noqa: ASYNC910  # never waits
        """Give back a connection obtained with `getconn`.

        A connection in a transaction is rolled back (by its connection
        actor, in the background); one that is closed, broken or in an
        unknown state is discarded and replaced.

        Not a checkpoint: it never waits, so it is safe in cleanup code of a
        cancelled task.

        Raises:
            ValueError: `conn` is not currently lent by this pool (a foreign
                connection, or one already returned).
        """
        actor = self._actor_of.get(conn)
        if actor is None or actor.lease is None:
            raise ValueError(f"can't return connection to pool {self.name!r}: it is not lent by it")
        self._put_back(actor, conn)

    def acquire(
        self,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> AbstractAsyncContextManager[AnyConnection]:
        """`connection`, under the name asyncpg and psqlpy users type."""
        return self.connection(timeout)

    # -- one-shot statements --------------------------------------------------

    async def fetch(
        self,
        query: Query,
        params: Params | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> list[Any]:
        """Run one statement on a pooled connection; return all its rows.

        A statement that returns no rows (an ``INSERT`` without ``RETURNING``,
        DDL) returns ``[]``: it succeeded (and was committed).

        The statement is its own transaction, committed if it succeeds
        (whatever the connections' ``autocommit``), and its rows are all read
        before this returns (rows as the connections' row factory makes
        them).  `timeout` bounds the wait for a connection, as `getconn`'s.
        The pool sends one-shot statements on its connections in pipeline
        mode, many per write (see the architecture docs): a statement must be
        one SQL command (no ``;``-separated list) and may not open a
        transaction (``BEGIN``: use `connection` and ``conn.transaction()``).

        Checkpoints: always.  If cancelled: a statement not sent yet is never
        sent; one sent is not waited for, and its result is dropped.  It may
        still run to its end on the server, and commit if it succeeds: a
        cancel request is sent only when nothing but statements of cancelled
        callers runs on that connection (so that it can hit no other
        caller's); bound long statements with ``statement_timeout``.

        Raises:
            psycopg.Error: the statement failed (that caller only); or its
                connection broke while it was in flight
                (`psycopg.OperationalError`: it may have run).
            PoolTimeout, TooManyRequests, PoolClosed: as `getconn`;
                `PoolClosed` also if the pool closes with it in flight.
        """
        rows: list[Any] = await self._statement(query, params, ROWS, timeout)
        return rows

    async def fetchrow(
        self,
        query: Query,
        params: Params | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Any:
        """As `fetch`, but return the first row, or None if there is none."""
        return await self._statement(query, params, FIRST_ROW, timeout)

    async def fetchval(
        self,
        query: Query,
        params: Params | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Any:
        """As `fetch`, but return the first column of the first row (None if no row or column).

        The value is the same whatever the connections' row factory.
        """
        return await self._statement(query, params, FIRST_VALUE, timeout)

    async def execute(
        self,
        query: Query,
        params: Params | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> int:
        """As `fetch`, but return the statement's ``rowcount`` (-1 where none applies)."""
        rowcount: int = await self._statement(query, params, ROWCOUNT, timeout)
        return rowcount

    async def executemany(
        self,
        query: Query,
        params_seq: Iterable[Params],
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> int:
        """Run one statement once per parameter set, all in one transaction.

        Returns the total ``rowcount``.  Committed if every execution succeeds,
        rolled back otherwise (they go out together, in one transaction).  The
        parameters are all adapted before anything is sent.  Otherwise as
        `fetch`.
        """
        rowcount: int = await self._statement(query, params_seq, TOTAL_ROWCOUNT, timeout)
        return rowcount

    async def _statement(
        self,
        query: Query,
        params: Any,
        shape: int,
        timeout: float | None,  # noqa: ASYNC109
    ) -> Any:
        """A one-shot statement through the scheduler (see `Scheduler.execute`)."""
        require_trio("ConnectionPool one-shot statements")
        now, deadline = await self._request_deadline(timeout)
        scheduler = self._scheduler
        statement = Statement(current_task(), now, deadline, scheduler.post, query, params, shape)
        try:
            return await self._scheduler.execute(statement)
        except psycopg.Error as ex:
            if ex.sqlstate == _FAILOVER_SQLSTATE and statement.actor is not None:
                self._failover_suspected(statement.actor)
            raise

    def _put_back(self, actor: ConnectionActor, conn: AnyConnection) -> None:
        """`conn`, lent to a user, comes back."""
        if self._leaks_reported and actor in self._leaks_reported:
            lease = actor.lease
            assert lease is not None
            self._leaks_reported.discard(actor)
            self._log(
                logging.INFO,
                "connection acquired by task %r returned after %.1f sec",
                lease.task.name,
                trio.current_time() - lease.at,
            )
        conn._free_results()
        self._scheduler.release(actor, outcome_of(conn, reset=self._reset is not None))

    def _outcome(self, conn: AnyConnection) -> Outcome:
        return outcome_of(conn, reset=self._reset is not None)

    def _failover_suspected(self, actor: ConnectionActor) -> None:
        if self.drain_on_failover:
            try:
                self._scheduler.tell(Drain(since_slot=actor.slot))
            except PoolClosed:
                pass

    def holders(self) -> list[Holder]:
        """Who holds the connections lent out now, longest held first."""
        now = trio.current_time()
        holders = [
            Holder(lease.task.name, now - lease.at)
            for actor in self._scheduler.actors.values()
            if (lease := actor.lease) is not None
        ]
        return sorted(holders, key=lambda holder: -holder.held_for)

    # -- maintenance ----------------------------------------------------------

    async def resize(self, min_size: int, max_size: int | None = None) -> None:
        """Change the pool's sizes.

        Growing opens connections in the background; shrinking closes idle
        connections at once and lent ones as they come back.  Before the pool
        is opened, the new sizes are what it opens with.

        Checkpoints: always.  If cancelled: the sizes did not change.
        """
        min_size, max_size = self._check_sizes(min_size, max_size)
        if self._serving():
            await self._apply(Resize(min_size, self._policy_max(max_size)))
        else:  # nothing to open or close: only the numbers change
            await checkpoint()
            self._policy.resize(min_size, self._policy_max(max_size))
        self._max_size = max_size

    async def check(self) -> None:
        """Check every idle connection; discard and replace those that fail.

        Each is tested with `check_connection` by its connection actor while
        it is taken out of the pool.  Does nothing before the pool is opened.

        Checkpoints: always.  If cancelled: the checks go on; each connection
        goes back to the pool, or is replaced if it failed.
        """
        if self._serving():
            await self._scheduler.call(CheckIdle())
        else:
            await checkpoint()

    async def drain(self) -> None:
        """Replace every connection: idle ones now, lent ones when they come back.

        For example after a failover or a credentials rotation.  A connection
        being opened is kept once established: it is made after the drain (as
        psycopg_pool's rule has it).  Does nothing before the pool is opened.

        Checkpoints: always.  If cancelled: nothing was replaced.
        """
        if self._serving():
            await self._apply(Drain())
        else:
            await checkpoint()

    def _serving(self) -> bool:
        """Opened, and its scheduler not stopped (it handles messages sent now)."""
        return self._opened and not self._scheduler.stopped

    async def _apply(self, message: Resize | Drain) -> None:
        """Have the scheduler handle `message`, all or nothing.

        Checkpoints: always.  If cancelled: nothing happened.
        """
        await checkpoint_if_cancelled()
        self._scheduler.tell(message)
        # The scheduler's next turn handles it (it never waits while handling).
        with trio.CancelScope(shield=True):
            await message.done.wait()

    def listener(
        self, *channels: str, buffer_size: int = 1000
    ) -> AbstractAsyncContextManager[Notifications]:
        """LISTEN to `channels` on a dedicated connection, for an ``async with`` block.

        ``async with pool.listener("jobs") as notifications: async for n in
        notifications: ...`` yields `psycopg.Notify` objects, and a
        `ListenerGap` after each reconnection (notifications sent while
        disconnected are lost) or when more than `buffer_size` notifications
        were waiting for the consumer (the oldest are dropped).  The
        connection is the pool's kind but outside ``max_size``; it is
        reconnected with the pool's backoff.  Iteration ends when the pool is
        closed.  Channels can be changed with ``notifications.listen()`` and
        ``notifications.unlisten()``.

        Checkpoints: entering waits until the server listens (at most the
        pool's ``timeout``, else `PoolTimeout`).  Not for PgBouncer in
        transaction mode: connect the pool to the server directly.
        """
        source = Source(
            name=self.name,
            timeout=self.timeout,
            reconnect_timeout=self.reconnect_timeout,
            random=self._policy.random,
            connect=self._connector.connect_unpooled,  # autocommit, not configured
            closing=self._closing,
            closed=self.closed,
        )
        return open_listener(source, channels, buffer_size)

    check_connection = staticmethod(check_connection)

    # -- observability --------------------------------------------------------

    def status(self) -> PoolStatus:
        """A snapshot of sizes (not a checkpoint).

        The scheduler applies a request or a return at its next turn: right
        after `putconn`, say, the snapshot may not show it yet.
        """
        policy = self._policy
        return PoolStatus(
            max_size=self.max_size,
            size=policy.size,
            available=policy.available,
            waiting=policy.waiting,
        )

    def get_stats(self) -> dict[str, int]:
        """psycopg_pool's 15 stats: current gauges and counters since the last pop."""
        return stats_dict(self.status(), self.min_size, self._policy.counters)

    def pop_stats(self) -> dict[str, int]:
        """Like `get_stats`, and reset the counters."""
        return stats_dict(self.status(), self.min_size, self._policy.pop_counters())

    def _log(self, level: int, msg: str, *args: object) -> None:
        logger.log(level, "%s: " + msg, self.name, *args, extra={"pool": self.name})

    # -- background tasks -------------------------------------------------------

    def _on_reconnect_failed(self) -> None:
        self._log(
            logging.WARNING, "reconnection attempts failed for %s sec", self.reconnect_timeout
        )
        if self._reconnect_failed is not None and self._nursery is not None:
            self._nursery.start_soon(self._call_reconnect_failed)

    async def _call_reconnect_failed(self) -> None:  # noqa: ASYNC910  # a background task
        # Bounded as the other callbacks: one that hangs must not pile up a
        # task per round of failed attempts for as long as the server is down.
        with trio.move_on_after(self.timeout) as scope:  # noqa: ASYNC912  # the callback is the cancel point
            try:
                assert self._reconnect_failed is not None
                await maybe_await(self._reconnect_failed(self))
            except Exception:
                logger.exception("%s: error in reconnect_failed callback", self.name)
        if scope.cancelled_caught:
            self._log(logging.WARNING, "reconnect_failed callback cut after %s sec", self.timeout)

    async def _watch_leaks(self) -> NoReturn:
        """Warn once about each connection lent for longer than leak_timeout."""
        while True:
            self._leak_wake = trio.Event()
            leases = [
                (actor, lease)
                for actor in self._scheduler.actors.values()
                if (lease := actor.lease) is not None
            ]
            self._leak_watch_at = min(
                (
                    lease.at + self.leak_timeout
                    for actor, lease in leases
                    if actor not in self._leaks_reported
                ),
                default=math.inf,
            )
            with trio.move_on_at(self._leak_watch_at):
                await self._leak_wake.wait()
            now = trio.current_time()
            for actor, lease in leases:
                if (
                    actor.lease is lease
                    and actor not in self._leaks_reported
                    and lease.at + self.leak_timeout <= now
                ):
                    self._leaks_reported.add(actor)
                    self._log(
                        logging.WARNING,
                        "connection held by task %r for more than %s sec; acquired at:\n%s",
                        lease.task.name,
                        self.leak_timeout,
                        "".join(lease.stack.format()) if lease.stack else "(unknown)",
                    )


class _PooledConnection:
    """The async context manager returned by `ConnectionPool.connection`.

    One block at a time: entering it again before it is left (from another
    task, say) raises `RuntimeError`, as its exit would give back the wrong loan.
    """

    __slots__ = ("_actor", "_busy", "_conn", "_lease", "_pool", "_timeout")

    def __init__(self, pool: ConnectionPool, timeout: float | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._conn: AnyConnection | None = None
        self._actor: ConnectionActor | None = None
        self._lease: object = None
        self._busy = False

    async def __aenter__(self) -> AnyConnection:
        if self._busy:
            raise RuntimeError(
                "this pool.connection() context manager is in use already:"
                " call pool.connection() for each block"
            )
        self._busy = True
        try:
            conn = await self._pool.getconn(self._timeout)
        except BaseException:
            self._busy = False
            raise
        self._actor = actor = self._pool._actor_of[conn]
        self._lease = actor.lease  # identifies this loan of the connection
        self._conn = conn
        return conn

    async def __aexit__(  # noqa: ASYNC910  # leaving without a transaction does not wait, by design
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        conn, self._conn = self._conn, None
        actor, lease = self._actor, self._lease
        assert conn is not None
        assert actor is not None
        try:
            if actor.lease is not lease:
                return  # noqa: ASYNC910  # the block gave it back (``close_returns``): not ours
            pool = self._pool
            if isinstance(exc_val, psycopg.Error) and exc_val.sqlstate == _FAILOVER_SQLSTATE:
                pool._failover_suspected(actor)
            try:
                if conn.pgconn.transaction_status in _UNFINISHED_STATES and not conn.closed:
                    await conn.__aexit__(exc_type, exc_val, exc_tb)  # commit or roll back  # noqa: ASYNC102  # commit after success stays cancellable; rollback is shielded
            finally:
                # Unless given back meanwhile (another task closing it, say):
                if actor.lease is lease:
                    pool._put_back(actor, conn)
        finally:
            self._busy = False


class NullConnectionPool(ConnectionPool):
    """A pool that keeps no idle connection: one connection per request.

    Same interface as `ConnectionPool`.  ``min_size`` must be 0.
    ``max_size`` ``None`` or 0 means no limit; above 0, at most that many
    connections exist and further clients queue.  A request for which the
    pool opens a connection at once is not counted as queued (as
    psycopg_pool's).  ``reset`` runs only when a client is waiting for the
    returned connection (otherwise it is closed); ``max_idle`` is ignored;
    `check` does nothing; `wait` opens one test connection and closes it.
    """

    _keep_idle = False

    def __init__(
        self,
        conninfo: ConninfoParam = "",
        *,
        min_size: int = 0,
        max_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(conninfo, min_size=min_size, max_size=max_size, **kwargs)

    def _check_sizes(self, min_size: object, max_size: object) -> tuple[int, int]:
        min_size = _check_int("min_size", min_size, 0)
        if min_size != 0:
            raise ValueError("null pools have min_size always 0")
        max_size = _check_int("max_size", 0 if max_size is None else max_size, 0)
        return 0, max_size

    @staticmethod
    def _policy_max(max_size: int) -> int | None:
        return max_size or None

    def _request_timeout(self, timeout: float | None) -> float:
        wait_for = super()._request_timeout(timeout)
        if wait_for == 0:
            raise ValueError(
                "timeout must be > 0 for a NullConnectionPool: it keeps no connection"
                " ready, so a request always waits for one to be opened"
            )
        return wait_for

    async def check(self) -> None:
        """Does nothing: a null pool has no idle connection.  Checkpoints."""
        await checkpoint()

    async def wait(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109, ASYNC910  # psycopg_pool API; the attempt checkpoints
        """Open one test connection and close it (counted in the stats).

        Checkpoints: always.  If cancelled: the test connection is closed.

        Raises:
            PoolTimeout: it could not be opened in time (the pool is closed;
                the connection error is the ``__cause__``).
            PoolClosed: the pool is closed or not open.
            ValueError: ``timeout`` is 0 (no connection can be opened in no
                time; the pool is left open).
        """
        wait_for = _check_seconds("timeout", timeout)
        if wait_for == 0:  # as for getconn: it could only fail, and close the pool
            raise ValueError(
                "timeout must be > 0 for a NullConnectionPool's wait: it opens a connection"
            )
        self._check_open()
        error: Exception | None = None
        started = trio.current_time()
        with trio.move_on_after(wait_for) as scope:  # noqa: ASYNC912  # the attempt is the cancel point
            try:
                conn = await self._connector.connect()
            except Exception as ex:
                error = ex
            else:
                conn._close_now()
        if scope.cancelled_caught:
            error = psycopg.errors.ConnectionTimeout(f"connection not made in {timeout} sec")
        self._scheduler.tell(Attempted(trio.current_time() - started, error))
        if error is not None:
            await self.close()
            raise PoolTimeout(f"pool initialization incomplete after {timeout} sec") from error


@asynccontextmanager
async def open_pool(
    conninfo: ConninfoParam = "", *, wait: bool = False, **kwargs: Any
) -> AsyncIterator[ConnectionPool]:
    """Open a `ConnectionPool` for the duration of an ``async with`` block.

    ``async with open_pool(dsn, min_size=2) as pool:`` -- keyword arguments are
    the pool's.  With ``wait=True``, the block starts once ``min_size``
    connections are ready (within the pool's ``timeout``, else `PoolTimeout`).
    The pool is closed when the block ends.

    Raises:
        RuntimeError: not used from a trio task.
    """
    require_trio("triopool.open_pool")
    async with ConnectionPool(conninfo, **kwargs) as pool:
        if wait:
            await pool.wait(pool.timeout)
        yield pool
