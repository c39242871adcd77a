"""`ConnectionPool`, `NullConnectionPool` and `open_pool`: the trio shell.

The pool's decisions are made by `triopool._policy.PoolPolicy`, a pure state
machine; this module carries them out with trio:

* a **supervisor nursery** (opened by `ConnectionPool.run`) owns every
  background task, so none outlives the pool;
* one **connection actor** task per connection owns it end to end: connect
  (with backoff), configure, then serve commands from its mailbox (reset on
  return, close), and close it when it ends;
* a **scheduler actor** wakes at the policy's next deadline (idle shrink,
  max_lifetime) and feeds it the time;
* **clients** talk to the policy directly with synchronous calls, which are
  atomic under trio.  A client that finds an idle connection gets it without a
  task switch; one that must wait parks itself with
  `trio.lowlevel.wait_task_rescheduled` and is woken with its connection by
  whoever makes one available.  A connection reaches a waiter only through that
  wake-up, which trio guarantees is delivered once it is sent, and a waiter that
  is cancelled first is removed from the queue in the same step: so a
  connection can be neither lost nor lent twice when a wait is cancelled.
  (A request/reply round trip through memory channels to a scheduler task cost
  more than twice as much as the whole fast path; see ``docs/performance``.)
"""

from __future__ import annotations

import inspect
import logging
import math
import random
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import Any, Final, NoReturn, TypeAlias

import outcome
import psycopg
import trio
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict
from trio.lowlevel import (
    Abort,
    Task,
    cancel_shielded_checkpoint,
    checkpoint,
    checkpoint_if_cancelled,
    current_task,
    reschedule,
    wait_task_rescheduled,
)

from ._groups import single_exception
from ._policy import (
    BROKEN,
    CLEAN,
    DIRTY,
    Action,
    Backoff,
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
    WaitTimeout,
    Wake,
)
from .connection import Connection
from .errors import PoolClosed, PoolTimeout, TooManyRequests
from .listener import Notifications, open_listener
from .stats import Holder, PoolStatus, stats_dict

__all__ = ["ConnectionPool", "NullConnectionPool", "open_pool"]

logger = logging.getLogger("triopool")

AnyConnection: TypeAlias = Connection[Any]
ConnectionCallback: TypeAlias = Callable[[AnyConnection], Awaitable[None]]
ConninfoParam: TypeAlias = str | Callable[[], str | Awaitable[str]]
KwargsParam: TypeAlias = (
    Mapping[str, Any] | Callable[[], Mapping[str, Any] | Awaitable[Mapping[str, Any]]] | None
)

_IDLE = pq.TransactionStatus.IDLE
#: Bound of `ConnectionPool.check_connection`'s shielded restoring of autocommit.
_RESTORE_TIMEOUT = 5.0
_DIRTY_STATES = (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR)

#: SQLSTATEs after which a pool with ``drain_on_failover`` replaces the
#: connections of the failing one's generation (classes are prefixes).
_FAILOVER_SQLSTATES = ("25006", "57P01", "08")

_RESET: Final = "reset"
_CLOSE: Final = "close"
_Command: TypeAlias = str

_pool_numbers = iter(range(1, 1 << 62))


def _check_int(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_seconds(name: str, value: object, *, allow_none: bool = False) -> float:
    if value is None and allow_none:
        return math.inf
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return float(value)


def _check_callable(name: str, value: object) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable or None, got {type(value).__name__}")


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value  # noqa: ASYNC910  # callers checkpoint


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
            connection; if it raises, the connection is discarded and the
            attempt counts as failed.
        reset: ``async def reset(conn)``, run when a connection comes back; it
            must leave the connection idle or it is discarded.
        check: ``async def check(conn)``, run before a connection is handed
            out; if it raises, the connection is discarded and the client gets
            another.  `ConnectionPool.check_connection` is a ready-made one.
        min_size: connections kept open.
        max_size: most connections open (``None``: ``min_size``).
        name: used in logs (default ``pool-1``, ``pool-2``...).
        timeout: default seconds a client waits for a connection.
        max_waiting: most clients queued (0: no limit); past it,
            `TooManyRequests`.
        max_lifetime: seconds after which a connection is replaced (each
            connection's is reduced by a random 0-10 %).
        max_idle: seconds after which an idle connection above ``min_size`` is
            closed.
        reconnect_timeout: seconds of failing attempts after which a
            connection attempt is abandoned and ``reconnect_failed`` called.
        reconnect_failed: ``reconnect_failed(pool)``, sync or async.
        close_returns: if true, ``await conn.close()`` on a lent connection
            returns it to the pool.
        leak_timeout: seconds a connection may stay lent before a warning is
            logged, with the stack that acquired it (None: never).
        drain_on_failover: if true, a query failing with
            ``read_only_sql_transaction`` (25006), ``admin_shutdown`` (57P01) or
            a connection exception (class 08) inside `connection`, or a broken
            connection given back, drains the connections opened up to then
            (see `drain`): after a failover, none keeps talking to the old
            primary.
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
        self.timeout = _check_seconds("timeout", timeout)
        self.max_waiting = _check_int("max_waiting", max_waiting, 0)
        self.max_lifetime = _check_seconds("max_lifetime", max_lifetime)
        self.max_idle = _check_seconds("max_idle", max_idle)
        self.reconnect_timeout = _check_seconds("reconnect_timeout", reconnect_timeout)
        self.leak_timeout = _check_seconds("leak_timeout", leak_timeout, allow_none=True)
        self.close_returns = bool(close_returns)
        self.drain_on_failover = bool(drain_on_failover)
        self._configure = configure
        self._reset = reset
        self._check = check
        self._reconnect_failed = reconnect_failed

        self._policy: PoolPolicy[Task] = PoolPolicy(
            min_size=min_size,
            max_size=self._policy_max(max_size),
            max_waiting=self.max_waiting,
            max_idle=self.max_idle,
            max_lifetime=self.max_lifetime,
            reconnect_timeout=self.reconnect_timeout,
            keep_idle=self._keep_idle,
            random=random.random,
        )
        self._max_size = max_size
        self._conns: dict[int, AnyConnection] = {}
        self._slot_of: dict[AnyConnection, int] = {}
        self._mailboxes: dict[int, trio.MemorySendChannel[_Command]] = {}
        self._connect_scopes: dict[int, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self._clock: trio.abc.Clock  # the trio run's clock, from `run` on
        self._opened = False
        self._closing = trio.Event()
        self._stopped = trio.Event()
        self._wake = trio.Event()
        self._changed = trio.Event()
        self._exit_stack: AsyncExitStack | None = None
        # slot -> (holder task, lent at, stack at acquisition if leak_timeout)
        self._leases: dict[int, tuple[Task, float, traceback.StackSummary | None]] = {}
        self._leaks_reported: set[int] = set()
        self._leak_wake = trio.Event()
        self._leak_watch_at = math.inf

    # -- sizes ----------------------------------------------------------------

    def _check_sizes(self, min_size: object, max_size: object) -> tuple[int, int]:
        min_size = _check_int("min_size", min_size, 0)
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
        """True once the pool is closed (it cannot be reopened)."""
        return self._policy.closed

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open" if self._opened else "new"
        return f"<{type(self).__name__} {self.name!r} ({state}) at 0x{id(self):x}>"

    # -- lifetime -------------------------------------------------------------

    async def run(
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
        """
        if self._opened or self.closed:
            raise PoolClosed(f"{self.name}: a pool can be opened only once")
        self._opened = True
        self._clock = trio.lowlevel.current_clock()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._scheduler, name=f"{self.name} scheduler")
                if self.leak_timeout < math.inf:
                    nursery.start_soon(self._watch_leaks, name=f"{self.name} leak watch")
                self._execute(self._policy.resize(self._policy.min_size, self._policy.max_size))
                task_status.started(self)
                try:
                    await self._closing.wait()
                finally:
                    # From now on nothing is reopened, whatever ended the wait.
                    self._execute(self._policy.close())
                with trio.move_on_after(self._close_timeout):  # noqa: ASYNC912  # nothing to wait for is fine
                    while len(self._mailboxes) > self._policy.count(SlotState.LENT):
                        await self._changed.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self._execute(self._policy.close())
            self._stopped.set()

    _close_timeout: float = 5.0

    async def __aenter__(self) -> ConnectionPool:
        """Open the pool (see `run`); filling starts in the background.

        Raises:
            PoolClosed: the pool was already opened or closed.
        """
        try:
            async with AsyncExitStack() as stack:
                nursery = await stack.enter_async_context(trio.open_nursery())
                await nursery.start(self.run)
                self._exit_stack = stack.pop_all()
        except BaseExceptionGroup as group:
            single = single_exception(group)
            if single is None:
                raise
            raise single from single.__cause__
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool:
        """Close the pool, then wait for its background tasks to end."""
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
            single = single_exception(group)
            if single is None:
                raise
            raise single from single.__cause__

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
        self._close_timeout = _check_seconds("timeout", timeout)
        self._execute(self._policy.close())
        self._closing.set()
        if self._opened:
            await self._stopped.wait()
        else:
            await checkpoint()

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
        if self._ready_count() >= self._policy.min_size:
            await checkpoint()
            return
        with trio.move_on_after(wait_for) as scope:
            while self._ready_count() < self._policy.min_size:
                if self.closed:
                    # Closed by the cancellation that also ends this wait: Cancelled wins.
                    await checkpoint_if_cancelled()
                    raise PoolClosed(f"the pool {self.name!r} is closed")
                await self._changed.wait()
            await checkpoint()
        if scope.cancelled_caught:
            cause = self._policy.last_error
            await self.close()
            raise PoolTimeout(f"pool initialization incomplete after {timeout} sec") from (
                cause if isinstance(cause, BaseException) else None
            )

    def _check_open(self) -> None:
        if self.closed:
            raise PoolClosed(f"the pool {self.name!r} is closed")
        if not self._opened:
            raise PoolClosed(f"the pool {self.name!r} is not open")

    def _ready_count(self) -> int:
        return sum(
            1
            for slot in self._policy.slots.values()
            if slot.state in (SlotState.IDLE, SlotState.LENT, SlotState.RESETTING)
        )

    # -- getting connections --------------------------------------------------

    def connection(
        self,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> AbstractAsyncContextManager[AnyConnection]:
        """Borrow a connection for an ``async with`` block.

        ``async with pool.connection() as conn:`` gets a connection as
        `getconn` does.  When the block ends, a transaction in progress is
        committed (or rolled back if the block raised) and the connection goes
        back to the pool.

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
        With a ``check`` callback, a connection failing it is discarded and
        another one is tried within the same time: at once after the first
        failure, then after 1 s, 2 s, 4 s... (±10 %), as psycopg_pool does, so
        that a check failing on every new connection is no busy loop.  A
        check still running at the deadline is cut there: the connection it
        was checking is closed (not cancelled politely on the server, which
        could take `Connection.cancel_timeout` more).

        Checkpoints: always.  If cancelled: no connection is taken (one
        already on its way to this caller goes to the next waiter or back to
        idle).

        Raises:
            PoolTimeout: no connection within `timeout`.
            TooManyRequests: ``max_waiting`` clients are already waiting.
            PoolClosed: the pool is closed, or was closed while waiting.
        """
        await checkpoint_if_cancelled()
        wait_for = self.timeout if timeout is None else _check_seconds("timeout", timeout)
        if self._nursery is None:
            raise PoolClosed(f"the pool {self.name!r} is not open")
        now = self._clock.current_time()
        deadline = now + wait_for
        task = current_task()
        failed_checks: Backoff | None = None  # after the first failed check
        while True:  # noqa: ASYNC913  # each turn awaits the policy or the check
            got = self._request(task, now, deadline, wait_for)
            if isinstance(got, int):
                slot = got
                if self._check is None:
                    self._lend(slot, task, now)
                    await cancel_shielded_checkpoint()  # the fast path's schedule point
                    return self._conns[slot]
            else:
                slot = await self._wait_for_grant(task, got)
            conn = self._conns[slot]
            if self._check is None:
                self._lend(slot, task, trio.current_time())
                return conn
            try:
                with trio.move_on_at(deadline) as scope:
                    await self._run_check(conn)
            except Exception as ex:
                self._log(logging.WARNING, "connection failed check, discarding it: %s", ex)
                now = trio.current_time()
                self._execute(self._policy.release(slot, now, BROKEN, by_pool=True))
                check_error = ex
            except BaseException:
                self._give_back(slot, conn)
                raise
            else:
                if scope.cancelled_caught:
                    self._give_back(slot, conn)
                    raise self._timeout_error(wait_for)
                self._lend(slot, task, trio.current_time())
                return conn
            # The check failed: try another connection, backing off after the first.
            if failed_checks is None:
                failed_checks = self._policy.retry_delays()
                continue
            await trio.sleep_until(min(now + failed_checks.next(), deadline))
            now = trio.current_time()
            if now >= deadline:
                raise self._timeout_error(wait_for) from check_error

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

    def _lend(self, slot: int, task: Task, now: float) -> None:
        """Record who holds `slot` (for `holders` and leak detection)."""
        if self.leak_timeout < math.inf:
            stack = traceback.StackSummary.from_list(traceback.extract_stack()[:-2])
            self._leases[slot] = (task, now, stack)
            if self._leak_watch_at == math.inf:
                self._leak_wake.set()
        else:
            self._leases[slot] = (task, now, None)

    def _request(
        self, task: Task, now: float, deadline: float, wait_for: float
    ) -> int | list[Action[Task]]:
        """Ask the policy for a slot for `task` (see `getconn`)."""
        try:
            return self._policy.request(task, now, deadline)
        except WaitTimeout:
            raise self._timeout_error(wait_for) from None
        except PolicyClosed:
            raise PoolClosed(f"the pool {self.name!r} is closed") from None
        except QueueFull:
            raise TooManyRequests(
                f"the pool {self.name!r} has already {self._policy.waiting} requests waiting"
            ) from None

    async def _wait_for_grant(self, task: Task, actions: list[Action[Task]]) -> int:
        """Wait, queued, for the policy to grant a slot to the calling task.

        The wait is bounded by the caller's cancel scopes and by the deadline
        given to the policy, which enforces it (the scheduler wakes up for it):
        this spares each wait a cancel scope of its own.
        """
        self._execute(actions)
        policy = self._policy

        def abort(_: Any) -> Abort:
            policy.cancel(task, trio.current_time())
            return Abort.SUCCEEDED

        slot: int = await wait_task_rescheduled(abort)
        return slot

    def _timeout_error(self, wait_for: float) -> PoolTimeout:
        """psycopg_pool's message, then what the pool looked like."""
        policy = self._policy
        cause = policy.last_error
        details = (
            f"pool {self.name!r}: {policy.size} connections, {policy.available} idle,"
            f" {len(self._leases)} lent, {policy.count(SlotState.CONNECTING)} connecting;"
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
        slot = self._slot_of.get(conn, -1)  # -1: no slot has this id
        if slot not in self._leases:
            raise ValueError(f"can't return connection to pool {self.name!r}: it is not lent by it")
        self._put_back(slot, conn)

    def _put_back(self, slot: int, conn: AnyConnection) -> None:
        """`conn`, lent on `slot` to a user, comes back."""
        result = self._outcome(conn)
        now = self._clock.current_time()
        actions = self._policy.release(slot, now, result)
        task, lent_at, _ = self._leases.pop(slot)
        if slot in self._leaks_reported:
            self._leaks_reported.discard(slot)
            self._log(
                logging.INFO,
                "connection acquired by task %r returned after %.1f sec",
                task.name,
                now - lent_at,
            )
        if result is BROKEN and conn.broken:
            self._failover_suspected(slot)
        if actions:
            self._execute(actions)

    def _give_back(self, slot: int, conn: AnyConnection) -> None:
        """Return a slot the calling code took but never handed to its user."""
        self._leases.pop(slot, None)
        self._execute(self._policy.release(slot, trio.current_time(), self._outcome(conn)))

    def _failover_suspected(self, slot: int) -> None:
        if self.drain_on_failover:
            actions = self._policy.drain(since_slot=slot)
            if actions:
                self._log(logging.WARNING, "possible failover: draining the pool")
                self._execute(actions)

    def holders(self) -> list[Holder]:
        """Who holds the connections lent out now, longest held first."""
        now = trio.current_time()
        holders = [Holder(task.name, now - at) for task, at, _ in self._leases.values()]
        return sorted(holders, key=lambda holder: -holder.held_for)

    def _outcome(self, conn: AnyConnection) -> Outcome:
        # libpq reports UNKNOWN unless the connection is OK: no status call needed.
        status = conn.pgconn.transaction_status
        if status == _IDLE:
            return CLEAN if self._reset is None else DIRTY
        if status in _DIRTY_STATES:
            return DIRTY
        return BROKEN

    # -- maintenance ----------------------------------------------------------

    async def resize(self, min_size: int, max_size: int | None = None) -> None:
        """Change the pool's sizes.

        Growing opens connections in the background; shrinking closes idle
        connections at once and lent ones as they come back.

        Checkpoints: always.
        """
        min_size, max_size = self._check_sizes(min_size, max_size)
        await checkpoint()
        self._max_size = max_size
        self._execute(self._policy.resize(min_size, self._policy_max(max_size)))

    async def check(self) -> None:
        """Check every idle connection; discard and replace those that fail.

        Each is tested with `check_connection` while it is taken out of the
        pool.

        Checkpoints: always.  If cancelled: the connection being checked goes
        back to the pool (or is discarded if its state is unknown).
        """
        await checkpoint()
        for slot in self._policy.idle_slots():
            if self._policy.state_of(slot) is not SlotState.IDLE:
                continue
            self._policy.take_idle(slot, trio.current_time())
            conn = self._conns[slot]
            result = Outcome.BROKEN  # unless the check completes
            try:
                with trio.move_on_after(self.timeout):
                    await self.check_connection(conn)
                    result = self._outcome(conn)
            except Exception as ex:
                self._log(logging.WARNING, "discarding broken connection: %s", ex)
            finally:
                self._execute(self._policy.release(slot, trio.current_time(), result, by_pool=True))

    async def drain(self) -> None:
        """Replace every connection: idle ones now, lent ones when they come back.

        For example after a failover or a credentials rotation.

        Checkpoints: always.
        """
        await checkpoint()
        self._execute(self._policy.drain())

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
        return open_listener(self, channels, buffer_size)

    @staticmethod
    async def check_connection(conn: AnyConnection) -> None:
        """A ready-made ``check`` callback: one cheap round trip to the server.

        Raises if the connection does not work.

        Checkpoints: always.  If cancelled: the round trip is abandoned as any
        cancelled query is (see `Connection`; as the pool's ``check`` the
        connection is then closed at once), and the connection's autocommit
        setting is restored unless it was closed.
        """
        if conn.autocommit:
            await conn.execute("")
            return
        await conn.set_autocommit(True)
        try:
            await conn.execute("")
        finally:
            # Even if cancelled: the connection must not go back autocommit.  (Not
            # bounded by conn.cancel_timeout, which the pool zeroes while checking: on
            # an idle connection this does no I/O.)
            with trio.move_on_after(_RESTORE_TIMEOUT, shield=True):  # noqa: ASYNC912  # shielded cleanup
                if not conn.closed:
                    await conn.set_autocommit(False)

    # -- observability --------------------------------------------------------

    def status(self) -> PoolStatus:
        """A snapshot of sizes (not a checkpoint)."""
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

    # -- carrying out the policy's actions ------------------------------------

    def _execute(self, actions: list[Action[Task]]) -> None:
        """Carry out `actions`, in order, without waiting."""
        for action in actions:
            if isinstance(action, Grant):
                reschedule(action.waiter, outcome.Value(action.slot))
            elif isinstance(action, Expire):
                reschedule(action.waiter, outcome.Error(self._timeout_error(action.waited)))
            elif isinstance(action, Reject):
                reschedule(
                    action.waiter, outcome.Error(PoolClosed(f"the pool {self.name!r} is closed"))
                )
            elif isinstance(action, Open):
                # The policy opens nothing once closed, and it is closed before
                # the supervisor nursery goes away.
                assert self._nursery is not None
                self._nursery.start_soon(
                    self._connection_actor, action.slot, name=f"{self.name} conn {action.slot}"
                )
            elif isinstance(action, Close):
                self._send(action.slot, _CLOSE)
            elif isinstance(action, Reset):
                self._send(action.slot, _RESET)
            elif isinstance(action, Wake):
                self._wake.set()
            elif isinstance(action, ReconnectFailed):
                self._log(
                    logging.WARNING,
                    "reconnection attempts failed for %s sec",
                    self.reconnect_timeout,
                )
                if self._reconnect_failed is not None and self._nursery is not None:
                    self._nursery.start_soon(self._call_reconnect_failed)

    def _send(self, slot: int, command: _Command) -> None:
        mailbox = self._mailboxes.get(slot)
        if mailbox is None:
            # The actor is gone (pool stopped while the connection was lent).
            conn = self._conns.pop(slot, None)
            if conn is not None:
                del self._slot_of[conn]
                conn._close_now()
            if slot in self._policy.slots:
                self._policy.closed_slot(slot)
            return
        mailbox.send_nowait(command)
        if command is _CLOSE and (scope := self._connect_scopes.get(slot)) is not None:
            scope.cancel()

    async def _call_reconnect_failed(self) -> None:  # noqa: ASYNC910  # a background task
        try:
            assert self._reconnect_failed is not None
            await _maybe_await(self._reconnect_failed(self))
        except Exception:
            logger.exception("%s: error in reconnect_failed callback", self.name)

    def _notify_changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- actors -----------------------------------------------------------------

    async def _watch_leaks(self) -> NoReturn:
        """Warn once about each connection lent for longer than leak_timeout."""
        while True:
            self._leak_wake = trio.Event()
            self._leak_watch_at = min(
                (
                    at + self.leak_timeout
                    for slot, (_, at, _) in self._leases.items()
                    if slot not in self._leaks_reported
                ),
                default=math.inf,
            )
            with trio.move_on_at(self._leak_watch_at):
                await self._leak_wake.wait()
            now = trio.current_time()
            for slot, (task, at, stack) in self._leases.items():
                if slot not in self._leaks_reported and at + self.leak_timeout <= now:
                    self._leaks_reported.add(slot)
                    self._log(
                        logging.WARNING,
                        "connection held by task %r for more than %s sec; acquired at:\n%s",
                        task.name,
                        self.leak_timeout,
                        "".join(stack.format()) if stack else "(unknown)",
                    )

    async def _scheduler(self) -> NoReturn:
        """Feed the policy the time at each of its deadlines."""
        while True:
            self._wake = trio.Event()
            with trio.move_on_at(self._policy.next_deadline()):
                await self._wake.wait()
            self._execute(self._policy.tick(trio.current_time()))

    async def _connection_actor(self, slot: int) -> None:
        """Own slot `slot`'s connection from connect to close."""
        mailbox, commands = trio.open_memory_channel[_Command](math.inf)
        self._mailboxes[slot] = mailbox
        conn: AnyConnection | None = None
        try:
            with commands:
                conn = await self._establish(slot)
                if conn is None:
                    return
                async for command in commands:
                    if command is _CLOSE:
                        break
                    await self._reset_connection(slot, conn)
        finally:
            del self._mailboxes[slot]
            if conn is not None and self._policy.state_of(slot) is SlotState.LENT:
                pass  # pool stopped while lent: closed when it comes back (see _send)
            else:
                if conn is not None:
                    del self._conns[slot]
                    del self._slot_of[conn]
                    conn._close_now()
                if slot in self._policy.slots:
                    self._execute(self._policy.closed_slot(slot))
            self._notify_changed()

    async def _establish(self, slot: int) -> AnyConnection | None:
        """Connect (retrying with the policy's backoff) and configure.

        Returns None if the slot gave up or was closed meanwhile.
        """
        with trio.CancelScope() as scope:
            self._connect_scopes[slot] = scope
            try:
                while True:
                    started = trio.current_time()
                    try:
                        conn = await self._connect()
                    except Exception as ex:
                        if self._policy.state_of(slot) is not SlotState.CONNECTING:
                            return None  # noqa: ASYNC910  # after a connection attempt
                        self._log(logging.WARNING, "error connecting: %s", ex)
                        delay, actions = self._policy.connect_failed(slot, trio.current_time(), ex)
                        self._execute(actions)
                        self._notify_changed()
                        if delay is None:
                            return None  # noqa: ASYNC910  # after a connection attempt
                        await trio.sleep(delay)
                        continue
                    if self._policy.state_of(slot) is not SlotState.CONNECTING:
                        conn._close_now()
                        return None
                    break
            finally:
                del self._connect_scopes[slot]
        if scope.cancelled_caught:
            return None
        conn._pool = self  # type: ignore[assignment]  # as psycopg_pool: for close_returns
        self._conns[slot] = conn
        self._slot_of[conn] = slot
        now = trio.current_time()
        self._execute(self._policy.connected(slot, now, now - started))
        self._notify_changed()
        return conn

    async def _connect_params(self) -> tuple[str, dict[str, Any]]:
        """The conninfo and kwargs for a new connection (callables called now)."""
        conninfo = self.conninfo
        if callable(conninfo):
            conninfo = await _maybe_await(conninfo())
        kwargs = self.kwargs
        if callable(kwargs):
            kwargs = await _maybe_await(kwargs())
        return conninfo, dict(kwargs or {})  # noqa: ASYNC910  # nothing to wait for unless callables are async

    async def _connect_listener(self) -> AnyConnection:
        """A connection for `listener`: autocommit, not configured, not pooled."""
        conninfo, kwargs = await self._connect_params()
        kwargs["autocommit"] = True
        return await self.connection_class.connect(conninfo, **kwargs)

    async def _connect(self) -> AnyConnection:
        """One connection attempt: resolve conninfo/kwargs, connect, configure."""
        conninfo, kwargs = await self._connect_params()
        conn = await self.connection_class.connect(conninfo, **kwargs)
        try:
            if self._configure is not None:
                await self._configure(conn)
            if conn.pgconn.transaction_status != _IDLE:
                status = pq.TransactionStatus(conn.pgconn.transaction_status)
                raise psycopg.ProgrammingError(
                    f"connection left in status {status.name} by configure function: discarded"
                )
        except BaseException:
            conn._close_now()
            raise
        return conn

    async def _reset_connection(self, slot: int, conn: AnyConnection) -> None:  # noqa: ASYNC910  # a background task
        """Bring a returned connection back to idle; report to the policy."""
        ok = False
        with trio.move_on_after(self.timeout):  # noqa: ASYNC912  # nothing to reset is fine
            try:
                if conn.pgconn.transaction_status in _DIRTY_STATES:
                    await conn.rollback()
                if self._reset is not None:
                    await self._reset(conn)
                ok = not conn.closed and conn.pgconn.transaction_status == _IDLE
                if not ok:
                    self._log(logging.WARNING, "connection left not idle by reset: discarded")
            except Exception as ex:
                self._log(logging.WARNING, "error resetting connection: %s", ex)
        self._execute(self._policy.reset_done(slot, trio.current_time(), ok=ok))


class _PooledConnection:
    """The async context manager returned by `ConnectionPool.connection`."""

    __slots__ = ("_conn", "_lease", "_pool", "_slot", "_timeout")

    def __init__(self, pool: ConnectionPool, timeout: float | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._conn: AnyConnection | None = None
        self._slot = -1
        self._lease: object = None

    async def __aenter__(self) -> AnyConnection:
        pool = self._pool
        self._conn = conn = await pool.getconn(self._timeout)
        self._slot = slot = pool._slot_of[conn]
        self._lease = pool._leases[slot]  # identifies this loan of the connection
        return conn

    async def __aexit__(  # noqa: ASYNC910  # leaving without a transaction does not wait, by design
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        conn, self._conn = self._conn, None
        assert conn is not None
        pool, slot = self._pool, self._slot
        if isinstance(exc_val, psycopg.Error) and (exc_val.sqlstate or "").startswith(
            _FAILOVER_SQLSTATES
        ):
            pool._failover_suspected(slot)
        try:
            if conn.pgconn.transaction_status in _DIRTY_STATES and not conn.closed:
                await conn.__aexit__(exc_type, exc_val, exc_tb)  # commit or roll back  # noqa: ASYNC102  # commit after success stays cancellable; rollback is shielded
        finally:
            # Unless the block gave it back already (e.g. ``close_returns``):
            if pool._leases.get(slot) is self._lease:
                pool._put_back(slot, conn)


class NullConnectionPool(ConnectionPool):
    """A pool that keeps no idle connection: one connection per request.

    Same interface as `ConnectionPool`.  ``min_size`` must be 0.
    ``max_size`` ``None`` or 0 means no limit; above 0, at most that many
    connections exist and further clients queue.  ``reset`` runs only when a
    client is waiting for the returned connection (otherwise it is closed);
    ``max_idle`` is ignored; `check` does nothing; `wait` opens one test
    connection and closes it.
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

    async def check(self) -> None:
        """Does nothing: a null pool has no idle connection.  Checkpoints."""
        await checkpoint()

    async def wait(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109  # psycopg_pool API
        """Open one test connection and close it.

        Raises:
            PoolTimeout: it could not be opened in time (the pool is closed;
                the connection error is the ``__cause__``).
            PoolClosed: the pool is closed or not open.
        """
        wait_for = _check_seconds("timeout", timeout)
        self._check_open()
        error: BaseException | None = None
        with trio.move_on_after(wait_for) as scope:  # noqa: ASYNC912  # the connection attempt is the cancel point
            try:
                conn = await self._connect()
            except Exception as ex:
                error = ex
            else:
                conn._close_now()
                return
        if error is None and not scope.cancelled_caught:
            return  # noqa: ASYNC910  # after a connection attempt
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
    """
    async with ConnectionPool(conninfo, **kwargs) as pool:
        if wait:
            await pool.wait(pool.timeout)
        yield pool
