"""psycopg's `AsyncConnection`, running natively on trio.

psycopg 3 drives all its network I/O through generators that yield "wait for
this file descriptor to become readable/writable" and are resumed with what
became ready.  Its async connection consumes them with asyncio's loop; this
module consumes them with :func:`trio.lowlevel.wait_readable` and
:func:`trio.lowlevel.wait_writable`, so every wait is a trio checkpoint and
trio's cancel scopes apply.

What changes, compared with stock psycopg on asyncio:

* **Waiting**: `Connection.wait` (every query, commit, copy, pipeline, ...) and
  the connection/cancel generators are driven by trio.
* **Cancellation**: when a trio cancel scope fires while a command is running
  on the server, a cancel request is sent and the connection is drained back to
  a known state, both inside a shielded scope bounded by
  `Connection.cancel_timeout`; if that bound expires the connection is closed.
  Then `trio.Cancelled` propagates.  A connection is never left ``ACTIVE``.  In
  pipeline mode the interrupted operation is finished rather than abandoned, so
  psycopg matches every result to its command.
* **Cleanup always happens**: what ends something (the COMMIT or ROLLBACK of a
  transaction block, closing a server-side cursor, the Sync that ends a
  pipeline, ``async with conn``) runs even with a cancel pending or arriving,
  within `Connection.cancel_timeout` of the cancellation, else the connection is
  closed.  So the connection ends closed, or usable with psycopg's bookkeeping
  (open transaction blocks, pipeline queues, prepared statements) matching the
  server.  A block that ends normally with a cancel pending is rolled back, not
  committed: `trio.Cancelled` means "did not happen".  Waiting for `lock` (another
  task's command) is not part of any bound unless cancelled.
* **Name resolution**: host names are resolved by psycopg's own
  ``conninfo_attempts()`` in a trio worker thread (as `trio.socket.getaddrinfo`
  does); IP addresses and socket paths need no thread.
* **connect_timeout**: enforced per attempt with a trio cancel scope, so
  ``connect_timeout=1`` means one second (libpq alone has a 2 s minimum).
  Fractional values are accepted.
* **Locking**: `Connection.lock` is a FIFO trio lock that does not
  checkpoint when it is free (every locked operation checkpoints anyway, while
  waiting for the server).
* **Transactions and ``async with conn``**: see `Connection.transaction` and
  `Connection.__aexit__` for the exact rules.

psycopg non-public names used (all of them, and only in this module):

* methods overridden or called: ``AsyncConnection.wait``,
  ``AsyncConnection._connect_gen``, ``AsyncConnection._get_connection_params``,
  ``AsyncConnection._try_cancel`` and ``AsyncConnection._pipeline_nolock``
  (overridden), ``BaseConnection._cancel_gen`` (its ``timeout`` argument exists in
  3.2 only), ``BaseConnection._should_cancel``, ``._check_connection_ok``,
  ``._commit_gen``, ``._rollback_gen``; ``BaseCursor._execute_gen`` (what
  ``AsyncCursor.execute`` runs under the lock); ``BaseTransaction._enter_gen``,
  ``._exit_gen``, ``._check_enter`` (3.3 only); ``BasePipeline._enter_gen``,
  ``._exit_gen``, ``._exit``; ``ServerCursorMixin._close_gen``, ``BaseCursor._close``,
  ``._set_results``, ``._reset`` (to free a spare cursor's results);
* for one-shot statements (`StatementPipeline`): ``psycopg._queries.PostgresQuery``
  (``convert``, ``dump``, and its ``query``, ``params``, ``types``, ``formats``),
  ``psycopg._preparing.Prepare`` and the connection's ``BaseConnection._prepared``
  (its ``get``, ``maybe_add_to_cache``, ``validate`` and ``_to_flush``),
  ``psycopg.errors.error_from_result`` (undocumented), ``psycopg.adapt.Transformer``
  (its ``set_pgresult`` and ``load_rows``);
* attributes: ``AdaptersMap._dumpers``, ``._dumpers_by_oid``, ``._loaders`` and
  ``TypesRegistry._registry`` (the copy-on-write tables, compared: a cursor whose
  adapters are not the connection's any more is not reused by `Connection.execute`);
  ``AsyncConnection.lock`` (replaced),
  ``BaseConnection._autocommit``,
  ``._adapters``, ``._closed``, ``._pipeline``, ``._notify_handlers``,
  ``._notifies_backlog``, ``BaseTransaction._conn``, ``BaseCursor._conn``,
  ``._tx`` (set, as psycopg does for a new query), ``._make_row``,
  ``._last_query`` (cleared, so that a reused cursor gets a new transformer),
  ``BasePipeline.level`` and ``.result_queue`` (undocumented), the ``_no_lock``
  argument of `psycopg.AsyncPipeline`;
* the generator protocol: the ``psycopg.waiting.Wait``/``Ready`` values
  generators yield and receive (psycopg's generators take a wake-up with
  nothing to read as "wait again", as `_drive`'s first try needs);
* ``AsyncTransaction.__aenter__``/``__aexit__`` and ``AsyncPipeline.__aenter__``/
  ``__aexit__`` being the whole of a transaction block and of a pipeline level:
  they are reimplemented around the generators above.

Beyond psycopg: libpq's ``PQsendPipelineSync``, reached with ctypes in the libpq
psycopg loaded, through the public ``PGconn.pgconn_ptr`` (`_libpq_send_pipeline_sync`).

Everything else is psycopg's public API (including ``psycopg.pq`` for draining
an interrupted command and ``psycopg.conninfo.conninfo_attempts`` for names).
"""

from __future__ import annotations

import copy
import ctypes
import functools
import ipaddress
import logging
import math
import os
import re
import select
import sys
import warnings
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, suppress
from inspect import signature
from operator import is_
from types import TracebackType
from typing import Any, Generic, TypeVar, cast

import outcome
import psycopg
import trio
from psycopg import AsyncPipeline, AsyncServerCursor, pq
from psycopg import errors as e
from psycopg._preparing import Prepare
from psycopg._queries import PostgresQuery
from psycopg.abc import AdaptContext, ConnDict, ConnParam, Params, PQGen, PQGenConn
from psycopg.adapt import AdaptersMap, Transformer
from psycopg.conninfo import conninfo_attempts, make_conninfo, timeout_from_conninfo
from psycopg.cursor_async import AsyncCursor
from psycopg.rows import AsyncRowFactory, Row, tuple_row
from psycopg.transaction import AsyncTransaction
from psycopg.waiting import Ready, Wait
from trio.lowlevel import (
    cancel_shielded_checkpoint,
    checkpoint,
    checkpoint_if_cancelled,
    current_task,
    wait_readable,
    wait_writable,
)

from ._runtime import require_trio

__all__ = ["Connection"]

T = TypeVar("T")

logger = logging.getLogger("triopool")

_ACTIVE = pq.TransactionStatus.ACTIVE
_TEXT = pq.Format.TEXT
_BINARY = pq.Format.BINARY
_OK = pq.ConnStatus.OK
_COPY_OUT = pq.ExecStatus.COPY_OUT
_COPY_IN = pq.ExecStatus.COPY_IN
_TUPLE_ROW = cast(AsyncRowFactory[Any], tuple_row)
# First wait before repeating a cancel request the server may have missed (doubled each time).
_CANCEL_RETRY_DELAY = 0.05
_WAIT_R = int(Wait.R)
_WAIT_W = int(Wait.W)
_WAIT_RW = int(Wait.RW)
_READY_R = int(Ready.R)
_READY_W = int(Ready.W)

# psycopg 3.2 takes a (mandatory) deadline in the cancel generator; 3.3 does not:
# the deadline is ours to enforce, so pass "none" where the parameter exists.
_CANCEL_GEN_KWARGS: dict[str, float] = (
    {"timeout": 0.0}
    if "timeout" in signature(psycopg.AsyncConnection._cancel_gen).parameters
    else {}
)


class _ConnectionLock:
    """Mutual exclusion for one connection: FIFO, no checkpoint when free.

    The lock guards psycopg's use of the socket.  Acquiring a free lock does not
    yield to the scheduler: every operation done under the lock checkpoints while
    it waits for the server, and skipping a second scheduling round is worth
    15-35 % of throughput.  When the lock is held, waiters park and ownership is
    handed to the first of them on release, so a waiter cancelled before the
    hand-off leaves the queue and one woken by it always owns the lock.
    """

    __slots__ = ("_locked", "_owner", "_waiters")

    def __init__(self) -> None:
        self._locked = False
        self._owner: trio.lowlevel.Task | None = None
        self._waiters = trio.lowlevel.ParkingLot()

    def locked(self) -> bool:
        return self._locked

    def held_by_current_task(self) -> bool:
        """Whether the calling task holds the lock (say, in a stream it left suspended)."""
        return self._locked and self._owner is current_task()

    async def acquire(self) -> None:
        if not self._locked:
            self._locked = True
            self._owner = current_task()
            return  # noqa: ASYNC910  # free lock: no checkpoint by design
        await self._waiters.park()  # release() hands ownership over

    def release(self) -> None:
        if not self._locked:
            raise RuntimeError("release of an unlocked connection lock")
        if self._waiters:
            (self._owner,) = self._waiters.unpark()
        else:
            self._locked = False
            self._owner = None

    __aenter__ = acquire  # (not a coroutine awaiting it: every query's path)

    async def __aexit__(self, *exc_info: object) -> None:  # noqa: ASYNC910  # releasing never waits
        self.release()


def _poll_now(fd: int, state: int) -> int:
    """Return what of `state` the socket is ready for, without blocking."""
    poller = select.poll()
    poller.register(
        fd, (select.POLLIN if state & _WAIT_R else 0) | (select.POLLOUT if state & _WAIT_W else 0)
    )
    ready = 0
    for _, events in poller.poll(0):
        if events & (select.POLLIN | select.POLLERR | select.POLLHUP):
            ready |= _READY_R
        if events & (select.POLLOUT | select.POLLERR | select.POLLHUP):
            ready |= _READY_W
    return ready & state


async def _wait_ready(fd: int, state: int) -> int:
    """Wait until the socket is ready for (part of) `state`; return what is ready.

    Always a checkpoint.  Raises `trio.ClosedResourceError` if another task
    closes the connection meanwhile, and never an exception group.
    """
    if state == _WAIT_R:
        await wait_readable(fd)
        return _READY_R
    if state == _WAIT_W:
        await wait_writable(fd)
        return _READY_W
    # Read *or* write: libpq must be able to read while its output is stuck, or
    # client and server could both block sending.  Sockets are nearly always
    # writable, so look first and only race two waits when nothing is ready.
    ready = _poll_now(fd, state)
    if ready:
        await checkpoint()
        return ready
    winner = 0
    closed = False
    try:
        async with trio.open_nursery() as nursery:

            async def wait_for(waiter: Callable[[int], Any], flag: int) -> None:  # noqa: ASYNC910  # the wait checkpointed, or raised
                nonlocal winner, closed
                try:
                    await waiter(fd)
                except trio.ClosedResourceError:
                    closed = True  # both waiters get it: report it once, below
                else:
                    winner |= flag
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait_for, wait_readable, _READY_R)
            nursery.start_soon(wait_for, wait_writable, _READY_W)
    except BaseExceptionGroup as group:
        # Both waiters cancelled by an outer scope (or interrupted): one exception
        # for the caller, as from the single waits above.
        raise _one_exception(group) from None
    if closed:
        raise trio.ClosedResourceError("the connection was closed")
    return winner


def _one_exception(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception to raise for `group`: the first that is not `trio.Cancelled`, else one."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        item = pending.pop(0)
        if isinstance(item, BaseExceptionGroup):
            pending[:0] = item.exceptions
        else:
            leaves.append(item)
    return next((ex for ex in leaves if not isinstance(ex, trio.Cancelled)), leaves[0])


class _GenRun:
    """A psycopg generator being driven, and what it waits for next.

    Kept outside the driving loop so that a run interrupted by a cancellation can
    be resumed, shielded, where it stopped (see `Connection._finish`).
    """

    __slots__ = ("gen", "state")

    def __init__(self, gen: PQGen[Any], state: int) -> None:
        self.gen = gen
        self.state = state


async def _drive(run: _GenRun, fd: int) -> Any:
    """Run `run` to completion, waiting on `fd` as it asks; return its value.

    Checkpoints at every wait.  If cancelled, `run` is left as it was, ready to be
    driven again.
    """
    try:
        eager = True
        while True:
            if eager and run.state == _WAIT_R:
                # The first wait for the server's answer: let the other tasks run
                # first, then try reading; often the answer is there by then, and
                # registering with the poller is avoided.
                eager = False
                await checkpoint()
                run.state = run.gen.send(_READY_R)
                continue
            ready = await _wait_ready(fd, run.state)
            run.state = run.gen.send(ready)
    except StopIteration as ex:
        return ex.value  # noqa: ASYNC910  # every path through the loop awaited
    except trio.ClosedResourceError:
        raise e.OperationalError("the connection was closed") from None
    except OSError as ex:
        raise e.OperationalError("connection socket closed") from ex


_CURSOR_EXECUTE = AsyncCursor.execute

#: References to the spare cursor in `_as_new`: the connection's, the caller's
#: variable and getrefcount's argument.  One more is someone else's.
_SPARE_REFS = 3


def _as_new(cur: AsyncCursor[Any], conn: Connection[Any]) -> bool:
    """Whether `execute` may use `cur` again, and if so make it as a new one would be.

    Nobody else references it (CPython's reference count; a cursor whose
    results a pipeline still owes is referenced by the pipeline), it is open,
    of the connection's ``cursor_factory``, and its adapters are still the
    connection's (`_same_adapters`).  Its row factory is the connection's
    again, and it gets a new transformer at its next query, as a new cursor
    does: loaders and dumpers are made again, and read the session's settings
    (``client_encoding``, ``DateStyle``, ``TimeZone``...) as they are now.
    """
    if sys.getrefcount(cur) > _SPARE_REFS + 1 or cur.closed:  # (+1: our argument)
        return False
    if type(cur) is not conn.cursor_factory or not _same_adapters(cur.adapters, conn.adapters):
        return False
    if cur.row_factory is not conn.row_factory:
        cur.row_factory = conn.row_factory
    cur.arraysize = 1
    cur._last_query = None  # psycopg keeps the transformer for the same query object
    return True


def _same_adapters(mine: AdaptersMap, theirs: AdaptersMap) -> bool:
    """Whether a cursor's adapters (`mine`) are those its connection has now (`theirs`).

    A cursor's map shares the connection's tables when it is made, and either
    side copies a table before changing it (psycopg's copy-on-write): the
    same table objects mean nobody registered anything on either since.
    """
    # (Identities compared in C: these tables are in the same order on both sides.)
    return (
        mine.types._registry is theirs.types._registry
        and all(map(is_, mine._loaders, theirs._loaders))
        and all(map(is_, mine._dumpers_by_oid, theirs._dumpers_by_oid))
        and all(map(is_, mine._dumpers.values(), theirs._dumpers.values()))
    )


def _notifies_gen(pgconn: pq.abc.PGconn) -> PQGen[list[pq.PGnotify]]:
    """Wait for notifications and return them (psycopg's ``generators.notifies``, but a
    wake-up that brings none, such as `_drive`'s first try, waits on)."""
    while True:
        while not (yield Wait.R):
            continue
        pgconn.consume_input()
        received = []
        while notify := pgconn.notifies():
            received.append(notify)
        if received:
            return received


def _discard(gen: PQGen[Any]) -> None:
    """Close an abandoned generator (psycopg's may try to run more code on close)."""
    with suppress(Exception):
        gen.close()


def _cancel_pending() -> bool:
    """True if the current task is cancelled (its next checkpoint raises `trio.Cancelled`)."""
    return trio.current_effective_deadline() == -math.inf


async def _wait_conn_gen(gen: PQGenConn[Any]) -> Any:
    """Drive a generator that yields ``(fd, state)`` pairs (connect, cancel).

    The generator is closed however this ends, so a half-open libpq connection
    it owns is released at once.
    """
    try:
        fd, state = next(gen)
        while True:
            ready = await _wait_ready(fd, state)
            fd, state = gen.send(ready)
    except StopIteration as ex:
        return ex.value  # noqa: ASYNC910  # a generator that never waits
    except OSError as ex:
        raise e.OperationalError("connection socket closed") from ex
    finally:
        gen.close()


def _drain_command(pgconn: pq.abc.PGconn) -> PQGen[None]:
    """Consume whatever the server sends until the connection leaves ``ACTIVE``.

    Used outside pipeline mode after a cancel request, once the generator that was
    running has been abandoned: results are discarded, ``COPY TO`` data is read to
    its end and a ``COPY FROM`` is failed at once (the server waits for data and
    would never answer).  It only waits for the socket when libpq holds nothing
    more to process.
    """
    while pgconn.transaction_status == _ACTIVE:
        if pgconn.is_busy():
            if (yield Wait.R):
                pgconn.consume_input()
            continue
        result = pgconn.get_result()
        if result is None:
            continue
        if result.status == _COPY_OUT:
            while (nbytes := pgconn.get_copy_data(1)[0]) > 0:
                pass
            if nbytes == 0 and (yield Wait.R):  # more copy data to come
                pgconn.consume_input()
        elif result.status == _COPY_IN:
            while not pgconn.put_copy_end(b"command cancelled"):
                yield Wait.W
            while pgconn.flush():
                if (yield Wait.RW) & _READY_R:
                    pgconn.consume_input()


def _is_literal_host(host: str) -> bool:
    """True if libpq can use `host` without a name lookup."""
    if not host or host.startswith("/") or host[1:2] == ":":  # socket dir, or Windows path
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _needs_name_lookup(params: ConnDict) -> bool:
    if params.get("hostaddr") or os.environ.get("PGHOSTADDR"):
        return False
    hosts = str(params.get("host") or os.environ.get("PGHOST", ""))
    return not all(_is_literal_host(host) for host in hosts.split(","))


def _connect_timeout(params: ConnDict) -> float:
    """Seconds allowed for each connection attempt (``math.inf``: no limit)."""
    value = params.get("connect_timeout", os.environ.get("PGCONNECT_TIMEOUT"))
    if value is None or value == "":
        # psycopg's default when nothing is set.
        return float(timeout_from_conninfo(params))
    try:
        seconds = float(value)
    except ValueError:
        raise e.ProgrammingError(f"bad value for connect_timeout: {value!r}") from None
    return seconds if seconds > 0 else math.inf


def _describe(attempt: ConnDict) -> str:
    parts = (attempt.get("host"), attempt.get("port"), attempt.get("hostaddr"))
    return "host: {!r}, port: {!r}, hostaddr: {!r}".format(*parts)


def _connect_error(errors: list[tuple[e.Error, str]]) -> e.Error:
    """The error to raise when every attempt failed (psycopg's shape)."""
    last_ex = errors[-1][0]
    if len(errors) == 1:
        return last_ex.with_traceback(None)
    lines = [str(last_ex), "Multiple connection attempts failed. All failures were:"]
    lines.extend(f"- {descr}: {error}" for error, descr in errors)
    return type(last_ex)("\n".join(lines), pgconn=last_ex.pgconn)


class Connection(psycopg.AsyncConnection[Row]):
    """A psycopg `~psycopg.AsyncConnection` that runs under `trio.run`.

    The whole `~psycopg.AsyncConnection` API is available and behaves as
    documented by psycopg, with trio semantics for waiting and cancellation:

    * Every call that talks to the server is a trio checkpoint.
    * If a cancel scope fires while a command runs, a cancel request is sent to
      the server and the connection is drained back to a known state (idle, or
      in a failed transaction), bounded by `cancel_timeout`; if that is not
      possible in time the connection is closed.  `trio.Cancelled` then
      propagates.  A task already cancelled when it calls a method that would
      start a new command does not send it.
    * What ends something still happens when the task is cancelled: the COMMIT
      or ROLLBACK ending a ``transaction()`` block (a block ending with a cancel
      pending is rolled back: not committed), closing a server-side cursor, the
      end of a ``pipeline()`` block, ``async with conn`` (which always closes
      the connection).  It gets `cancel_timeout` from the cancellation, else
      the connection is closed.  So a connection comes out of a cancellation
      closed, or usable with psycopg's own bookkeeping right.
    * No exception group ever escapes: another task closing the connection
      gives `psycopg.OperationalError`, a cancellation `trio.Cancelled`.
    * ``connect_timeout`` (conninfo or keyword) is honoured to the fraction of a
      second, per host attempt.

    Create connections with `connect`.
    """

    #: Seconds allowed, from a cancellation, to cancel the interrupted command
    #: on the server and drain the connection, or to finish a cleanup (COMMIT or
    #: ROLLBACK ending a transaction block, closing a server-side cursor, ending a
    #: pipeline); past this the connection is closed.  Nothing is bounded while
    #: nobody cancels (waiting for another task's command included).  ``0``:
    #: close at once on cancellation.
    cancel_timeout: float = 5.0

    def __init__(
        self,
        pgconn: pq.abc.PGconn,
        row_factory: AsyncRowFactory[Row] = _TUPLE_ROW,
    ) -> None:
        super().__init__(pgconn, row_factory)
        self.lock = _ConnectionLock()  # type: ignore[assignment]
        self.server_cursor_factory = _ServerCursor
        # The cursor `execute` returned last: reused when nobody else holds it.
        self._spare_cursor: AsyncCursor[Row] | None = None

    @classmethod
    async def connect(
        cls,
        conninfo: str = "",
        *,
        autocommit: bool = False,
        prepare_threshold: int | None = 5,
        context: AdaptContext | None = None,
        row_factory: AsyncRowFactory[Row] | None = None,
        cursor_factory: type[AsyncCursor[Row]] | None = None,
        **kwargs: ConnParam,
    ) -> Connection[Row]:
        """Connect to a database server and return a new `Connection`.

        Arguments are those of `psycopg.AsyncConnection.connect`.  With several
        hosts (``host=a,b``), each is tried in turn (in random order with
        ``load_balance_hosts=random``), each within ``connect_timeout``.

        Checkpoints: always.  If cancelled: no connection is left open.

        Raises:
            psycopg.OperationalError: every attempt failed (the message lists
                them when there were several); `psycopg.errors.ConnectionTimeout`
                when the last one timed out.
            psycopg.ProgrammingError: malformed connection string or parameter.
        """
        require_trio("triopool.Connection.connect")
        params = await cls._get_connection_params(conninfo, **kwargs)
        timeout = _connect_timeout(params)
        if _needs_name_lookup(params):
            attempts = await trio.to_thread.run_sync(
                conninfo_attempts, params, abandon_on_cancel=True
            )
        else:
            attempts = conninfo_attempts(params)

        errors: list[tuple[e.Error, str]] = []
        for attempt in attempts:
            descr = _describe(attempt)
            logger.debug("connection attempt: %s", descr)
            try:
                with trio.move_on_after(timeout) as attempt_scope:
                    conn: Connection[Row] = await _wait_conn_gen(
                        cls._connect_gen(make_conninfo("", **attempt))
                    )
                if attempt_scope.cancelled_caught:
                    raise e.ConnectionTimeout("connection timeout expired")
            except e.Error as ex:
                logger.debug("connection failed: %s: %s", descr, ex)
                errors.append((ex, descr))
            else:
                break
        else:
            raise _connect_error(errors)

        conn._autocommit = bool(autocommit)
        if row_factory:
            conn.row_factory = row_factory
        if cursor_factory:
            conn.cursor_factory = cursor_factory
        if context:
            conn._adapters = AdaptersMap(context.adapters)
        conn.prepare_threshold = prepare_threshold
        return conn

    async def execute(
        self,
        query: Any,
        params: Params | None = None,
        *,
        prepare: bool | None = None,
        binary: bool = False,
    ) -> AsyncCursor[Row]:
        """Execute a query and return a cursor to read its results.

        As `psycopg.AsyncConnection.execute`.  The cursor the previous call
        returned is used again if nothing references it any more (the
        caller dropped it) and it can be as a new one would be (open, of the
        connection's ``cursor_factory``, the connection's adapters as they
        are now): it saves making a cursor per statement.  It is made new
        again: the connection's row factory, a new transformer (loaders and
        dumpers made again, seeing the session's settings as they are now).
        Until then it keeps its results, as a cursor the caller kept would:
        a pool frees them when the connection comes back.

        Checkpoints and cancellation: as `wait`.
        """
        cur = self._spare_cursor
        if cur is None or not _as_new(cur, self) or not isinstance(query, str | bytes):
            cur = await super().execute(query, params, prepare=prepare, binary=binary)
            self._spare_cursor = cur
            return cur
        cur.format = _BINARY if binary else _TEXT
        try:
            if type(cur).execute is not _CURSOR_EXECUTE:  # a cursor class of the user's
                return await cur.execute(query, params, prepare=prepare)
            # psycopg's `AsyncCursor.execute`, one coroutine less (every query's path):
            lock = self.lock
            await lock.acquire()
            try:
                await self.wait(cur._execute_gen(query, params, prepare=prepare))
            finally:
                lock.release()
        except e.Error as ex:
            raise ex.with_traceback(None) from None
        return cur

    def _locked_by_current_task(self) -> bool:
        """Whether the calling task holds `lock` (in a stream it left suspended, say)."""
        return cast(_ConnectionLock, self.lock).held_by_current_task()

    def _free_results(self) -> None:
        """Free what the cursor `execute` returned last holds, if nobody uses it.

        The pool calls this when a connection comes back, so that an idle
        connection keeps no result of its last borrower.
        """
        cur = self._spare_cursor
        if cur is not None and sys.getrefcount(cur) <= _SPARE_REFS:  # (see `_as_new`)
            cur._reset()
            cur._tx.set_pgresult(None)

    async def wait(
        self,
        gen: PQGen[Any],
        interval: float | None = None,
        timeout: float | None = None,  # noqa: ASYNC109  # psycopg's signature
    ) -> Any:
        """Consume a psycopg generator operating on this connection's socket.

        psycopg calls this for every operation, holding `lock`.  `interval` is
        accepted for compatibility and ignored: trio needs no polling.  With a
        `timeout`, raise `psycopg.OperationalError` if the generator has not
        finished in time (the command is then cancelled as below).

        Checkpoints: always.  If cancelled before the generator starts, nothing
        is sent; if a command is still in progress (e.g. between two rows of a
        stream), it is cancelled on the server.  If cancelled while waiting, the
        command is cancelled on the server and the connection brought back to a
        known state (see the class docstring).  `trio.Cancelled` propagates.

        Raises:
            psycopg.OperationalError: the connection is closed (say by another
                task, while this one was between two rows of a stream), or gets
                closed while waiting.
        """
        try:
            await checkpoint_if_cancelled()
        except BaseException:
            # A cancelled task starts nothing; if it is in the middle of a
            # command (e.g. between two rows of a stream), that command is
            # cancelled on the server before Cancelled propagates.
            _discard(gen)
            await self._interrupted(None)  # noqa: ASYNC102  # _interrupted shields itself, bounded
            raise
        if self._closed:
            # Closed by another task, maybe in the middle of a command: libpq
            # would answer "no more results" and end a stream early, silently.
            _discard(gen)
            raise e.OperationalError("the connection is closed")
        try:
            state = next(gen)
        except StopIteration as ex:
            await cancel_shielded_checkpoint()
            return ex.value
        run = _GenRun(gen, state)
        fd = self._socket(gen)
        # (`_drive` awaited here, not in a helper: this is every query's path.)
        try:
            if timeout is None:
                return await _drive(run, fd)
            with trio.move_on_after(timeout):
                return await _drive(run, fd)
        except Exception:
            _discard(run.gen)  # finished, or stopped by a closed socket
            raise
        except BaseException:  # trio.Cancelled, KeyboardInterrupt
            await self._interrupted(run)  # noqa: ASYNC102  # _interrupted shields itself, bounded
            raise
        await self._interrupted(run)  # timed out  # noqa: ASYNC102  # shielded, bounded
        raise e.OperationalError("wait timeout expired")

    def _socket(self, gen: PQGen[Any]) -> int:
        """The connection's socket, for `gen` to wait on (closed if there is none)."""
        try:
            return self.pgconn.socket
        except BaseException:
            _discard(gen)
            raise

    async def _interrupted(self, run: _GenRun | None) -> None:  # noqa: ASYNC910  # shielded on purpose
        """Bring the connection to a known state after an interruption.

        The task was running `run` (None: it was about to start a command).
        Outside pipeline mode the generator is abandoned and a command still in
        progress is cancelled and drained (`_abort_command`).  In pipeline mode
        it is finished instead (`_interrupted_pipeline`): psycopg matches every
        result to its queue of pending commands, so none may be lost.
        """
        pgconn = self.pgconn
        if self._closed or pgconn.status != _OK:
            if run is not None:
                _discard(run.gen)
            return  # noqa: ASYNC910  # cleanup: nothing to wait for
        if pgconn.pipeline_status:
            await self._interrupted_pipeline(run)
            return
        if run is not None:
            _discard(run.gen)
        if pgconn.transaction_status == _ACTIVE:
            await self._abort_command()

    async def _abort_command(self) -> None:  # noqa: ASYNC910  # shielded on purpose
        """Cancel the command running on the server and drain the connection.

        The caller abandoned the generator it was running: what the server
        still sends for the command is consumed at the libpq level
        (`_drain_command`).  Shielded and bounded by `cancel_timeout`; the
        connection is closed if it is still ``ACTIVE`` at the end.
        """
        pgconn = self.pgconn
        with trio.move_on_after(self.cancel_timeout, shield=True):  # noqa: ASYNC912  # cleanup: shielded and bounded on purpose
            try:
                drain = _drain_command(pgconn)
                with suppress(StopIteration):  # not active any more
                    run = _GenRun(drain, next(drain))
                    await self._drive_cancelling(run, pgconn.socket, queries_only=False)
            except e.Error as ex:
                logger.debug("error draining an interrupted command: %s", ex)
            except BaseException:  # our own deadline, or a KeyboardInterrupt
                if pgconn.transaction_status == _ACTIVE:
                    logger.warning("command not terminated after cancellation: closing connection")
                    self._close_now()
                raise
        if pgconn.transaction_status == _ACTIVE and not self.closed:
            logger.warning("command not terminated after cancellation: closing connection")
            self._close_now()

    async def _interrupted_pipeline(self, run: _GenRun | None) -> None:  # noqa: ASYNC910  # shielded on purpose
        """`_interrupted` in pipeline mode: finish `run` rather than abandon it.

        Statements of the caller's still running on the server are cancelled
        first, so the rest of the pipeline is quick: the server skips it until
        the next Sync.  That Sync comes when the pipeline block ends (its exit is
        a cleanup, see `_PipelineLevel`).  Shielded and bounded by
        `cancel_timeout`; past that the connection is closed.
        """
        with trio.move_on_after(self.cancel_timeout, shield=True) as scope:  # noqa: ASYNC912  # cleanup: shielded and bounded on purpose
            try:
                if run is not None:
                    await self._drive_cancelling(run, self.pgconn.socket, queries_only=True)
                elif self._pipeline_running_queries():
                    await self._send_cancel_request()
            except e.Error as ex:
                if run is not None:
                    _discard(run.gen)  # finished, or stopped by a closed socket
                logger.debug("error finishing an interrupted pipeline operation: %s", ex)
        if scope.cancelled_caught:
            if run is not None:
                _discard(run.gen)
            logger.warning("pipeline not terminated after cancellation: closing connection")
            self._close_now()

    async def _drive_cancelling(self, run: _GenRun, fd: int, *, queries_only: bool) -> Any:
        """Drive `run` to its end while asking the server to cancel what runs.

        A cancel request that reaches the server before it has read the command
        is ignored, so it is repeated, after 0.05 s, then 0.1, 0.2, ... while
        the command goes on (a failed request is logged and repeated too).
        With `queries_only` (pipeline mode), only while statements of the
        caller's are pending (`_pipeline_running_queries`).  Not bounded here.
        """
        delay = _CANCEL_RETRY_DELAY
        while True:
            if not queries_only or self._pipeline_running_queries():
                try:
                    await self._send_cancel_request()
                except e.Error as ex:  # the command may end anyway: keep reading
                    logger.debug("cancel request failed: %s", ex)
            with trio.move_on_after(delay):
                return await _drive(run, fd)
            delay *= 2

    def _pipeline_running_queries(self) -> bool:
        """True if statements of the caller's are in flight in pipeline mode.

        Only then is a cancel request sent: a pipeline whose pending results are
        only psycopg's own commands (COMMIT, ROLLBACK, Sync at the end of a
        transaction block) must run them, or its bookkeeping would be wrong.
        """
        if self.pgconn.transaction_status != _ACTIVE:
            return False
        pipeline = self._pipeline
        return pipeline is None or any(item is not None for item in pipeline.result_queue)

    async def _finish(self, gen: PQGen[Any], *, cancel_request: bool = False) -> Any:
        """Run a generator that ends something to its end, whatever the cancellation.

        For the commands that close what was opened (COMMIT or ROLLBACK of a
        transaction block, CLOSE of a server-side cursor, the final Sync of a
        pipeline) and BEGIN/SAVEPOINT: `wait` would abandon them when cancelled,
        and with them psycopg's own bookkeeping (its count of open transaction
        blocks, its pipeline queues).  Here a cancellation, pending or arriving,
        does not stop the generator: it goes on, shielded, for at most
        `cancel_timeout` from the cancellation.  No cancel request is sent for
        these quick commands (it could abort the ROLLBACK itself), except with
        `cancel_request`, for statements of the caller's still running in a
        pipeline.  If the time runs out the connection is closed and
        `trio.Cancelled` raised.

        Returns the generator's value even if cancelled meanwhile (the command
        happened: the next checkpoint raises `trio.Cancelled`); errors from the
        server propagate.  Without a cancellation nothing bounds the wait.

        Checkpoints: always.
        """
        try:
            state = next(gen)
        except StopIteration as ex:
            await cancel_shielded_checkpoint()
            return ex.value
        run = _GenRun(gen, state)
        fd = self._socket(gen)
        try:
            return await _drive(run, fd)
        except Exception:
            _discard(gen)  # finished, or stopped by a closed socket
            raise
        except trio.Cancelled as exc:  # noqa: ASYNC103  # re-raised below unless the command completes
            cancelled = exc
        except BaseException:  # KeyboardInterrupt: the state is unknown
            _discard(gen)
            self._close_now()
            raise
        with trio.move_on_after(self.cancel_timeout, shield=True):  # noqa: ASYNC912  # cleanup: shielded and bounded on purpose
            try:
                if cancel_request:
                    return await self._drive_cancelling(run, fd, queries_only=True)
                return await _drive(run, fd)
            except Exception:
                _discard(gen)
                raise
        _discard(gen)
        logger.warning("cleanup not acknowledged in time after cancellation: closing connection")
        self._close_now()
        raise cancelled

    @asynccontextmanager
    async def _cleanup_lock(self) -> AsyncIterator[None]:
        """Hold `lock` for a cleanup that must happen even if cancelled.

        Waiting for the lock (another task's command) is not bounded while
        nobody cancels; once cancelled, it goes on shielded for `cancel_timeout`.
        If the lock is still taken then, the connection is closed (the other task
        gets `psycopg.OperationalError`) and `trio.Cancelled` raised.  If the
        calling task holds the lock itself (a ``stream()`` it left suspended,
        say), waiting would never end: the connection is closed at once and
        `psycopg.OperationalError` raised.
        """
        if self._locked_by_current_task():
            self._close_now()
            raise e.OperationalError(
                "the connection is busy with an operation this task left unfinished"
                " (a suspended stream?): it was closed"
            )
        lock = self.lock
        try:
            await lock.acquire()
        except trio.Cancelled:  # noqa: ASYNC103, ASYNC104  # kept only once the lock is ours: the cleanup runs, the next checkpoint raises again
            acquired = False
            with trio.move_on_after(self.cancel_timeout, shield=True):  # noqa: ASYNC912  # cleanup: shielded and bounded on purpose
                await lock.acquire()
                acquired = True
            if not acquired:
                logger.warning("connection busy at cleanup after cancellation: closing it")
                self._close_now()
                raise
        try:
            yield
        finally:
            lock.release()

    async def _send_cancel_request(self) -> None:
        """Ask the server to cancel the current command (not bounded here)."""
        if psycopg.capabilities.has_cancel_safe():
            await _wait_conn_gen(self._cancel_gen(**_CANCEL_GEN_KWARGS))
        else:
            # libpq < 17: the blocking PQcancel, in a thread.
            await trio.to_thread.run_sync(self.cancel, abandon_on_cancel=True)

    async def cancel_safe(self, *, timeout: float = 30.0) -> None:  # noqa: ASYNC109  # psycopg API
        """Cancel the current operation on the connection, from any task.

        As `psycopg.AsyncConnection.cancel_safe`.  The task running the
        operation gets `psycopg.errors.QueryCanceled`.

        Checkpoints: always.  If cancelled: the request may or may not have
        reached the server.

        Raises:
            psycopg.errors.CancellationTimeout: not done within `timeout`
                seconds (``0`` or ``None``: no limit).
        """
        if not self._should_cancel():
            await checkpoint()
            return
        with trio.move_on_after(timeout or math.inf) as scope:
            await self._send_cancel_request()
        if scope.cancelled_caught:
            raise e.CancellationTimeout("cancellation timeout expired")

    async def _try_cancel(self, *, timeout: float = 5.0) -> None:  # noqa: ASYNC109, ASYNC910  # psycopg's signature; shielded on purpose
        """Ask the server to cancel the running command, for psycopg's cleanup code.

        psycopg calls this when a `~psycopg.AsyncCursor.stream` or a ``COPY TO``
        ends early (the caller's code raised, or the task was cancelled while the
        caller's code ran), then drains the connection.  Unlike `cancel_safe` it
        never raises, not even `trio.Cancelled` (which would skip that drain):
        the request is sent shielded, bounded by `cancel_timeout`.  A cancelled
        task drains the connection in `wait`.
        """
        with trio.move_on_after(min(timeout, self.cancel_timeout), shield=True):  # noqa: ASYNC912  # cleanup: shielded and bounded on purpose
            try:
                if self._should_cancel():
                    await self._send_cancel_request()
            except e.Error as ex:
                logger.warning("query cancellation failed: %s", ex)

    def _close_now(self) -> None:
        """Close the libpq connection, waking any task waiting on its socket."""
        if self._closed:
            return
        try:
            fd = self.pgconn.socket
        except e.OperationalError:
            pass  # no socket (connection already lost)
        else:
            trio.lowlevel.notify_closing(fd)
        self._closed = True
        self.pgconn.finish()

    async def close(self) -> None:  # noqa: ASYNC910  # closing never waits
        """Close the connection (or return it to its pool, see ``close_returns``).

        Closing does not checkpoint, so it is safe in cleanup code of a
        cancelled task.  A task waiting on this connection's socket gets
        `psycopg.OperationalError`.  With ``close_returns``, closing a
        connection given back already (closing twice, say) does nothing.
        """
        if self.closed:
            return  # noqa: ASYNC910  # closing never waits
        pool = getattr(self, "_pool", None)
        if pool is not None and getattr(pool, "close_returns", False):
            try:
                await pool.putconn(self)
            except ValueError:
                pass  # given back already (closed twice, say): the pool's, left alone
            return  # noqa: ASYNC910  # closing never waits
        self._close_now()

    async def __aexit__(  # noqa: ASYNC910  # a closed connection has nothing to end
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        """Commit (success) or roll back (exception), then close.

        The connection is closed however this ends (unless it belongs to a
        pool, as in psycopg).  The COMMIT or ROLLBACK is finished even if the
        task is cancelled meanwhile (bounded by `cancel_timeout` from the
        cancellation).

        Checkpoints: when talking to the server.  If cancelled before the block
        ends (an exception) or when it ends (a cancel pending): nothing is
        committed, the connection is closed and `trio.Cancelled` propagates.  A
        cancel arriving during the COMMIT lets it complete; the next checkpoint
        raises.
        """
        if self.closed:
            return  # noqa: ASYNC910  # nothing to end
        pooled = bool(getattr(self, "_pool", None))
        skip_commit = exc_type is None and _cancel_pending()
        try:
            # _cleanup_lock and _finish shield themselves once cancelled, bounded.
            if exc_type is None and not skip_commit:
                async with self._cleanup_lock():  # noqa: ASYNC102
                    await self._finish(self._commit_gen())  # noqa: ASYNC102
            elif pooled or not _cancel_pending():
                # Roll back before closing (as psycopg), or for the pool; a
                # cancelled task just closes, which rolls back on the server.
                try:
                    async with self._cleanup_lock():  # noqa: ASYNC102
                        await self._finish(self._rollback_gen())  # noqa: ASYNC102
                except Exception as ex:
                    logger.warning("error ignored in rollback on %s: %s", self, ex)
        finally:
            if not pooled:
                self._close_now()
        if skip_commit:
            await checkpoint_if_cancelled()  # noqa: ASYNC102  # raises: the block is not committed

    @asynccontextmanager
    async def transaction(
        self, savepoint_name: str | None = None, force_rollback: bool = False
    ) -> AsyncIterator[AsyncTransaction]:
        """Start a transaction block (or a savepoint if one is in progress).

        As `psycopg.AsyncConnection.transaction`, with trio cancellation:

        * Entering waits for `lock` like any command (a cancel then means
          nothing happened); once BEGIN/SAVEPOINT is sent it is completed, and
          rolled back if the task was cancelled meanwhile.
        * Leaving after an exception (`trio.Cancelled` included) rolls back.
        * Leaving normally commits, unless a cancel is pending: then the block
          is rolled back and `trio.Cancelled` raised (Cancelled means "not
          committed").  A cancel arriving while the COMMIT is in flight lets it
          complete; the block ends normally and the next checkpoint raises.
        * The COMMIT or ROLLBACK that ends a block always runs, even if
          cancelled, within `cancel_timeout` of the cancellation; past that (or
          if another task holds the connection that long) the connection is
          closed.  Waiting for the server or for `lock` is otherwise not bounded.

        Checkpoints: on entry and on exit.
        """
        tx = _Transaction(self, savepoint_name, force_rollback)
        if self._pipeline:
            async with self.pipeline(), tx, self.pipeline():
                yield tx
        else:
            async with tx:
                yield tx

    @asynccontextmanager
    async def pipeline(self) -> AsyncIterator[AsyncPipeline]:
        """Switch the connection to pipeline mode for the block (nested blocks allowed).

        As `psycopg.AsyncConnection.pipeline`.  The end of the block (a Sync
        and the results still pending) is completed even if the task is
        cancelled: statements of the caller's still running are then cancelled
        on the server and the rest is finished within `cancel_timeout` (else the
        connection is closed), so psycopg's queues and the server agree.

        Checkpoints: on entry and on exit.  If cancelled in the block: what is
        still pending is finished as above, its results are discarded (errors
        logged) and `trio.Cancelled` propagates.  If cancelled on entry: not
        entered.
        """
        async with self.lock:
            self._check_connection_ok()
            if (pipeline := self._pipeline) is None:
                # A reference loop, broken below (as in psycopg).
                pipeline = self._pipeline = AsyncPipeline(self)
        try:
            async with _PipelineLevel(self, pipeline, locked=True):
                yield pipeline
        finally:
            if pipeline.level == 0:
                async with self._cleanup_lock():  # noqa: ASYNC102  # _cleanup_lock shields itself, bounded
                    if self._pipeline is pipeline:
                        self._pipeline = None

    @asynccontextmanager
    async def _pipeline_nolock(self) -> AsyncIterator[AsyncPipeline]:
        """`pipeline` for a caller already holding `lock` (psycopg's ``executemany``)."""
        pipeline = self._pipeline = AsyncPipeline(self, _no_lock=True)
        try:
            async with _PipelineLevel(self, pipeline, locked=False):
                yield pipeline
        finally:
            self._pipeline = None

    async def notifies(
        self,
        *,
        timeout: float | None = None,  # noqa: ASYNC109  # psycopg API
        stop_after: int | None = None,
    ) -> AsyncGenerator[psycopg.Notify, None]:
        """Yield `psycopg.Notify` objects as they arrive from the server.

        As `psycopg.AsyncConnection.notifies`: stop after `timeout` seconds
        (trio clock) or after `stop_after` notifications.

        Checkpoints: while waiting for notifications.
        """
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        nreceived = 0
        if self._notify_handlers:
            warnings.warn(
                "using 'notifies()' together with notifies handlers on the"
                " same connection is not reliable. Please use only one of these methods",
                RuntimeWarning,
                stacklevel=2,
            )
        async with self.lock:
            encoding = self.info.encoding
            # Take the backlog while we consume notifications so none is reported twice.
            self._notifies_backlog, backlog = None, self._notifies_backlog
            try:
                while True:
                    if backlog:
                        while backlog:
                            yield backlog.popleft()  # noqa: ASYNC119, ASYNC911  # psycopg's API is an async generator
                            nreceived += 1
                    else:
                        received = None
                        with trio.move_on_at(deadline):
                            received = await self.wait(_notifies_gen(self.pgconn))
                        if received is None:
                            break
                        for pgn in received:
                            yield psycopg.Notify(  # noqa: ASYNC119, ASYNC911  # psycopg's API is an async generator
                                pgn.relname.decode(encoding), pgn.extra.decode(encoding), pgn.be_pid
                            )
                            nreceived += 1
                    if stop_after is not None and nreceived >= stop_after:
                        break
                    if trio.current_time() >= deadline:
                        break
            finally:
                self._notifies_backlog = backlog


# -- one-shot statements in pipeline mode (the pool's connection actors) ---------------

#: What the caller of a one-shot statement gets back (`StatementPipeline.send`).
ROWS = 0  # every row, made by the connection's row factory
FIRST_ROW = 1  # the first row (row factory), or None
FIRST_VALUE = 2  # the first column of the first row (whatever the row factory), or None
ROWCOUNT = 3  # the statement's rowcount (-1 where none applies)
TOTAL_ROWCOUNT = 4  # `StatementPipeline.send_many`: the sum of the rowcounts

_TUPLES_OK = pq.ExecStatus.TUPLES_OK
_FATAL_ERROR = pq.ExecStatus.FATAL_ERROR
_PIPELINE_ABORTED = pq.ExecStatus.PIPELINE_ABORTED
_PIPELINE_SYNC = pq.ExecStatus.PIPELINE_SYNC
_IDLE = pq.TransactionStatus.IDLE
_PREPARE_NO = Prepare.NO
_PREPARE_SHOULD = Prepare.SHOULD
# What each command sent for a statement is, to read its result.
_QUERY = 0
_PREPARE = 1  # the Parse of a statement being prepared
_DEALLOCATE = 2  # psycopg's prepared-statements maintenance, riding along
#: SQLSTATE classes of errors that end a session (operator intervention, connection).
_SESSION_ENDED = ("57P", "08")
#: ``BEGIN`` or ``START`` first (after blanks and comments): would open a transaction.
_OPENS_TRANSACTION = re.compile(rb"(?i)(?:BEGIN|START)\b")
#: ``COPY`` first: would leave the connection in the middle of a copy.
_COPIES = re.compile(rb"(?i)COPY\b")
_COPY_STATES = (pq.ExecStatus.COPY_IN, pq.ExecStatus.COPY_OUT, pq.ExecStatus.COPY_BOTH)


def _skip_blanks(query: bytes) -> int:
    """Where the first keyword of `query` starts (after blanks and comments, nested too)."""
    i, n = 0, len(query)
    while i < n:
        if query[i : i + 1].isspace():
            i += 1
        elif query.startswith(b"--", i):
            end = query.find(b"\n", i)
            i = n if end < 0 else end + 1
        elif query.startswith(b"/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if query.startswith(b"/*", i):
                    depth, i = depth + 1, i + 2
                elif query.startswith(b"*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        else:
            break
    return i


@functools.cache
def _libpq_send_pipeline_sync() -> Callable[[int], int] | None:
    """libpq's ``PQsendPipelineSync`` (libpq >= 17), from the library psycopg loaded.

    Unlike ``PQpipelineSync`` (psycopg's ``pipeline_sync``) it does not flush:
    many statements, each with its Sync, then go out in one write.  psycopg
    does not wrap it; it is reached with ctypes through the public
    ``PGconn.pgconn_ptr``, in the very libpq psycopg uses (the one libpq
    mapped in this process, whose version must be psycopg's).  None where
    that cannot be told (then every Sync flushes).
    """
    if pq.version() < 170000:
        return None
    try:
        with open("/proc/self/maps") as maps:
            paths = {
                line.split()[-1]
                for line in maps
                if os.path.basename(line.split()[-1]).startswith("libpq.")
                or os.path.basename(line.split()[-1]).startswith("libpq-")
            }
        if len(paths) != 1:
            return None
        lib = ctypes.CDLL(paths.pop())
        if lib.PQlibVersion() != pq.version():
            return None
        send_sync = lib.PQsendPipelineSync
    except (OSError, AttributeError, IndexError):
        return None
    send_sync.argtypes = [ctypes.c_void_p]
    send_sync.restype = ctypes.c_int
    return cast(Callable[[int], int], send_sync)


class BrokenPipeline(e.OperationalError):
    """The connection of a `StatementPipeline` broke: nothing more can be sent on it.

    The statements in flight are lost (see `StatementPipeline.abandon`).
    """


class _Sent(Generic[T]):
    """A statement in flight: what was sent for it, and its results so far."""

    __slots__ = ("commands", "prepared", "results", "shape", "syncs", "token")

    def __init__(self, token: T, shape: int) -> None:
        self.token = token
        self.shape = shape
        self.commands: list[int] = []  # _QUERY, _PREPARE, _DEALLOCATE, in order
        self.results: list[pq.abc.PGresult] = []  # one per command
        self.syncs = 0  # Syncs whose answer is still to come
        #: (key, prepare, name) for psycopg's prepared-statements cache to validate.
        self.prepared: tuple[Any, Prepare, bytes] | None = None


class StatementPipeline(Generic[T]):
    """One-shot statements on a `Connection`, in libpq pipeline mode, each with its own Sync.

    The pool's connection actors use it while their connection is not lent:
    `send` adapts a statement (psycopg's adaptation, prepared statements per
    the connection's ``prepare_threshold``) and puts it, then a Sync, into
    libpq's output buffer; `flush` writes the buffer; once the socket is
    readable, `read` takes what the server answered and returns the outcome
    of each statement done, in the order sent, as `outcome.Value` or
    `outcome.Error`.  Each statement between two Syncs is a transaction of
    its own on the server: committed if it succeeds whatever the
    connection's ``autocommit`` (nothing sends ``BEGIN``), and one that
    fails aborts no other.  `send_many` sends the executions of one
    statement with one Sync: one transaction, all or nothing.

    The connection is in pipeline mode while statements are in flight and
    leaves it when the last is read.  Rows are made by the connection's row
    factory, with the adapters the connection had when this object was
    made.  Nothing here waits but `wait`; the connection's `Connection.lock`
    is not taken: the owner guarantees that nobody else uses the connection
    meanwhile.
    """

    __slots__ = ("_conn", "_cursor", "_encoding", "_pgconn", "_sent", "_sync", "_tx", "output")

    def __init__(self, conn: Connection[Any]) -> None:
        self._conn = conn
        self._pgconn = conn.pgconn
        self._sent: deque[_Sent[T]] = deque()
        pgconn = self._pgconn
        send_sync = _libpq_send_pipeline_sync()
        if send_sync is None:
            self._sync: Callable[[], None] = pgconn.pipeline_sync
        else:
            # Public, but not in psycopg's PGconn protocol (pq.abc).
            raw: Any = pgconn

            def sync() -> None:
                if not send_sync(raw.pgconn_ptr):
                    raise e.OperationalError(
                        f"sending a Sync failed: {pgconn.error_message.decode(errors='replace')}"
                    )

            self._sync = sync
        #: Bytes written to libpq's buffer and not flushed yet.
        self.output = False
        self._tx = Transformer(conn)  # adapts parameters
        self._cursor = conn.cursor()  # makes rows (its row factory follows the connection's)
        self._cursor._tx = Transformer(self._cursor)  # as psycopg's cursors do for a query
        self._encoding = conn.info.encoding

    @property
    def in_flight(self) -> int:
        """Statements sent and not read to their end."""
        return len(self._sent)

    def tokens(self) -> Iterator[T]:
        """The tokens of the statements in flight, in the order sent."""
        return (sent.token for sent in self._sent)

    @property
    def last(self) -> T | None:
        """The token of the statement sent last, if still in flight (else None)."""
        return self._sent[-1].token if self._sent else None

    def send(self, token: T, query: Any, params: Any, shape: int) -> None:
        """Send one statement, then a Sync.  Never waits.

        `token` comes back with its outcome from `read`.  Raises whatever
        psycopg's adaptation raises, and `psycopg.ProgrammingError` for a
        statement that would open a transaction (``BEGIN``, ``START
        TRANSACTION``: one statement is one transaction here), sending
        nothing; `BrokenPipeline` if the connection is broken.
        """
        pgq = self._adapt(query, params)
        self._submit(token, shape, [pgq], None)

    def send_many(self, token: T, query: Any, params_seq: Iterable[Any]) -> None:
        """Send one statement once per parameter set, then one Sync (all or nothing).

        As psycopg's ``executemany``, the statement is prepared (unless the
        connection's ``prepare_threshold`` is None).  Raises as `send`.
        """
        pgq = None
        executions = []
        for params in params_seq:
            if pgq is None:
                pgq = self._adapt(query, params)
            else:
                pgq = copy.copy(pgq)
                pgq.dump(params)
            executions.append(pgq)
        self._submit(token, TOTAL_ROWCOUNT, executions, True)

    def _adapt(self, query: Any, params: Any) -> PostgresQuery:
        pgq = PostgresQuery(self._tx)
        pgq.convert(query, params)
        bquery = pgq.query
        start = _skip_blanks(bquery)
        if _OPENS_TRANSACTION.match(bquery, start):
            raise e.ProgrammingError(
                "a one-shot statement is a transaction of its own: it cannot open"
                " one (BEGIN, START TRANSACTION): use pool.connection() and"
                " conn.transaction() instead"
            )
        if _COPIES.match(bquery, start):
            raise e.ProgrammingError(
                "COPY cannot be used with a one-shot statement: use pool.connection()"
                " and cursor.copy() instead"
            )
        return pgq

    def _submit(
        self, token: T, shape: int, executions: list[PostgresQuery], prepare: bool | None
    ) -> None:
        pgconn = self._pgconn
        if not pgconn.pipeline_status:
            pgconn.enter_pipeline_mode()
        sent = _Sent(token, shape)
        try:
            self._maintain(sent)
            prepared = self._conn._prepared
            for pgq in executions:
                prep, name = prepared.get(pgq, prepare)
                if prep is _PREPARE_NO:
                    pgconn.send_query_params(
                        pgq.query,
                        pgq.params,
                        param_formats=pgq.formats,
                        param_types=pgq.types,
                        result_format=_TEXT,
                    )
                else:
                    if prep is _PREPARE_SHOULD:
                        pgconn.send_prepare(name, pgq.query, param_types=pgq.types)
                        sent.commands.append(_PREPARE)
                    pgconn.send_query_prepared(
                        name, pgq.params, param_formats=pgq.formats, result_format=_TEXT
                    )
                sent.commands.append(_QUERY)
                key = prepared.maybe_add_to_cache(pgq, prep, name)
                if key is not None and sent.prepared is None:
                    sent.prepared = (key, prep, name)
            self._sync()
        except e.Error as ex:
            raise BrokenPipeline(f"sending a statement failed: {ex}") from ex
        sent.syncs += 1
        self.output = True
        self._sent.append(sent)

    def _maintain(self, sent: _Sent[T]) -> None:
        """Send the deallocations psycopg's prepared-statements cache asks for."""
        to_flush = self._conn._prepared._to_flush
        while to_flush:
            name = to_flush.popleft()
            self._pgconn.send_query_params(
                b"DEALLOCATE " + (b"ALL" if name is None else name), None
            )
            sent.commands.append(_DEALLOCATE)
            self._sync()
            sent.syncs += 1

    def flush(self) -> bool:
        """Write what libpq has to send, as much as the socket takes now; True if all.

        Raises:
            BrokenPipeline: the connection is broken.
        """
        try:
            self.output = bool(self._pgconn.flush())
        except e.Error as ex:
            raise BrokenPipeline(str(ex)) from ex
        return not self.output

    async def wait(self) -> None:
        """Wait until the server's answer can be read (or more can be written).

        Checkpoints: always.  If cancelled: nothing is lost (call it again).

        Raises:
            BrokenPipeline: the connection was closed meanwhile, or is broken.
        """
        try:
            fd = self._pgconn.socket
            if self.output:
                if await _wait_ready(fd, _WAIT_RW) & _READY_W:
                    self.flush()
            else:
                await wait_readable(fd)
        except (trio.ClosedResourceError, e.OperationalError) as ex:
            raise BrokenPipeline("the connection was closed") from ex

    def read(self) -> list[tuple[T, outcome.Outcome[Any]]]:
        """Read what the server sent; the outcomes of the statements now done.

        Never waits.  When none is left in flight, the connection leaves
        pipeline mode.

        Raises:
            BrokenPipeline: the connection is broken (the statements still in
                flight are lost: see `abandon`), or a statement left a
                transaction open (which only closing it ends).
        """
        pgconn = self._pgconn
        try:
            pgconn.consume_input()
        except e.Error as ex:
            raise BrokenPipeline(str(ex)) from ex
        while notify := pgconn.notifies():
            if handler := pgconn.notify_handler:
                handler(notify)
        finished: list[_Sent[T]] = []
        sent_queue = self._sent
        ended = False  # a command's results ended: two ends in a row mean "no more now"
        while sent_queue and not pgconn.is_busy():
            result = pgconn.get_result()
            if result is None:
                if ended:
                    break
                ended = True
                continue
            ended = False
            sent = sent_queue[0]
            if result.status in _COPY_STATES:  # not sent by _adapt: only closing ends it
                raise BrokenPipeline("a one-shot statement began a COPY")
            if result.status != _PIPELINE_SYNC:
                sent.results.append(result)
                continue
            sent.syncs -= 1
            if not sent.syncs:
                finished.append(sent_queue.popleft())
        if not sent_queue and pgconn.pipeline_status:
            problem = ""
            try:
                pgconn.exit_pipeline_mode()
            except e.Error as ex:
                problem = str(ex)
            if not problem and pgconn.transaction_status != _IDLE:
                problem = "a one-shot statement left a transaction open (rolled back)"
            if problem:
                # Not done after all: their outcome is the connection's end.
                sent_queue.extend(finished)
                raise BrokenPipeline(problem)
        return [(sent.token, self._outcome(sent)) for sent in finished]

    def abandon(self) -> tuple[list[T], e.Error | None]:
        """Forget the statements in flight (the connection broke).

        Returns their tokens, and the error with which the server ended the
        session, if it sent one (e.g. `psycopg.errors.AdminShutdown` for a
        terminated backend: class 57P or 08, not a statement's own error).
        """
        tokens = [sent.token for sent in self._sent]
        cause = None
        if self._sent:
            for result in self._sent[0].results:
                if result.status == _FATAL_ERROR:
                    error = e.error_from_result(result, encoding=self._encoding)
                    if (error.sqlstate or "").startswith(_SESSION_ENDED):
                        cause = error
        self._sent.clear()
        self.output = False
        return tokens, cause

    def _outcome(self, sent: _Sent[T]) -> outcome.Outcome[Any]:
        """What the caller of `sent` gets, now that it is done."""
        error: e.Error | None = None
        queried = []
        for command, result in zip(sent.commands, sent.results, strict=True):
            status = result.status
            if command == _DEALLOCATE:
                if status == _FATAL_ERROR:
                    logger.debug("deallocating a prepared statement: %s", result.error_message)
                continue
            if error is None and status == _FATAL_ERROR:
                error = e.error_from_result(result, encoding=self._encoding)
            elif error is None and status == _PIPELINE_ABORTED:
                error = e.PipelineAborted("pipeline aborted")
            if command == _QUERY:
                queried.append(result)
        if sent.prepared is not None:
            self._conn._prepared.validate(*sent.prepared, queried)
        if error is not None:
            return outcome.Error(error)
        try:
            return outcome.Value(self._value(sent.shape, queried))
        except e.Error as ex:
            return outcome.Error(ex)

    def _value(self, shape: int, results: list[pq.abc.PGresult]) -> Any:
        if shape == TOTAL_ROWCOUNT:
            return sum(result.command_tuples or 0 for result in results)
        (result,) = results
        status = result.status
        if shape == ROWCOUNT:
            if status == _TUPLES_OK:
                return result.ntuples
            nrows = result.command_tuples
            return -1 if nrows is None else nrows
        if status != _TUPLES_OK:  # a statement without rows: none, as asyncpg's
            return [] if shape == ROWS else None
        cursor = self._cursor
        if cursor.row_factory is not self._conn.row_factory:
            cursor.row_factory = self._conn.row_factory
        if shape == FIRST_VALUE:
            if not result.ntuples or not result.nfields:
                return None
            tx = cursor._tx
            tx.set_pgresult(result)
            return tx.load_rows(0, 1, tuple)[0][0]
        cursor._set_results([result])
        ntuples = result.ntuples if shape == ROWS else min(result.ntuples, 1)
        rows = cursor._tx.load_rows(0, ntuples, cursor._make_row)
        if shape == ROWS:
            return rows
        return rows[0] if rows else None


class _Transaction(AsyncTransaction):
    """A transaction block whose end always happens, whatever the cancellation.

    psycopg's ``__aenter__``/``__aexit__`` are replaced; their generators
    (``_enter_gen``, ``_exit_gen``) are used as they are.  psycopg runs those
    through `Connection.wait` like any command, so a cancel pending when a block
    ends would skip the COMMIT/ROLLBACK and, with it, psycopg's count of open
    blocks: every later block would be a savepoint in a transaction never
    committed.  Here they run through `Connection._finish`.  The rules are in
    `Connection.transaction`.
    """

    async def __aenter__(self) -> _Transaction:
        conn = cast(Connection[Any], self._conn)
        async with conn.lock:  # waiting is cancellable: nothing has happened yet
            check_enter = getattr(self, "_check_enter", None)  # psycopg >= 3.3
            if check_enter is not None:
                check_enter()
            await checkpoint_if_cancelled()  # cancelled: send nothing
            try:
                await conn._finish(self._enter_gen())
                await checkpoint_if_cancelled()  # cancelled meanwhile: undo
            except BaseException as ex:
                await self._undo(conn, ex)  # noqa: ASYNC102  # _finish shields itself, bounded
                raise
        return self

    async def _undo(self, conn: Connection[Any], ex: BaseException) -> None:  # noqa: ASYNC910  # a lost connection has nothing to undo
        """Roll back a block whose entry failed (psycopg >= 3.3 does the same)."""
        if self.pgconn.status == _OK:
            await conn._finish(self._exit_gen(type(ex), ex, ex.__traceback__))
        else:
            self._failed()

    def _failed(self) -> None:
        if hasattr(self, "status"):  # psycopg >= 3.3
            self.status = self.Status.FAILED

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool:
        conn = cast(Connection[Any], self._conn)
        if self.pgconn.status != _OK:
            self._failed()
            return False  # noqa: ASYNC910  # a lost connection has nothing to end
        # _cleanup_lock and _finish shield themselves once cancelled, bounded.
        async with conn._cleanup_lock():  # noqa: ASYNC102
            if exc_val is None and not self.force_rollback:
                try:
                    await checkpoint_if_cancelled()  # noqa: ASYNC102  # cancelled: no COMMIT
                except BaseException as cancelled:
                    # The block ended but the task is cancelled: no COMMIT.
                    await conn._finish(  # noqa: ASYNC102  # _finish shields itself, bounded
                        self._exit_gen(type(cancelled), cancelled, cancelled.__traceback__)
                    )
                    raise
            return bool(await conn._finish(self._exit_gen(exc_type, exc_val, exc_tb)))  # noqa: ASYNC102


class _PipelineLevel:
    """One level of `Connection.pipeline`: psycopg's `AsyncPipeline` enter and exit.

    The exit (a Sync, then every pending result fetched and matched to its
    command) runs through `Connection._finish`: a cancelled block still ends with
    the server past a Sync and psycopg's queues empty.
    """

    __slots__ = ("_conn", "_locked", "_pipeline")

    def __init__(self, conn: Connection[Any], pipeline: AsyncPipeline, *, locked: bool) -> None:
        self._conn = conn
        self._pipeline = pipeline
        self._locked = locked

    async def __aenter__(self) -> AsyncPipeline:
        pipeline = self._pipeline
        level = pipeline.level
        try:
            if self._locked:
                async with self._conn.lock:
                    await self._conn.wait(pipeline._enter_gen())
            else:
                await self._conn.wait(pipeline._enter_gen())
        except BaseException as ex:
            # A nested level syncs first; cancelled meanwhile, that sync is finished
            # (pipeline mode) and the level entered: leave it again.
            if pipeline.level > level:
                await self.__aexit__(type(ex), ex, ex.__traceback__)  # noqa: ASYNC102  # _finish shields itself, bounded
            raise
        return pipeline

    async def __aexit__(  # noqa: ASYNC910  # _finish always checkpoints
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        conn, pipeline = self._conn, self._pipeline
        cancelled_results = False
        try:
            # _cleanup_lock and _finish shield themselves once cancelled, bounded.
            if self._locked:
                async with conn._cleanup_lock():  # noqa: ASYNC102
                    await conn._finish(pipeline._exit_gen(), cancel_request=True)  # noqa: ASYNC102
            else:
                await conn._finish(pipeline._exit_gen(), cancel_request=True)  # noqa: ASYNC102
        except Exception as ex:
            if exc_val is None and not _cancel_pending():
                raise ex.with_traceback(None) from None
            # Don't clobber the exception (or cancellation) that ended the block.
            level = logging.DEBUG if _cancel_pending() else logging.WARNING
            logger.log(level, "error ignored terminating %r: %s", pipeline, ex)
            cancelled_results = exc_val is None
        finally:
            pipeline._exit(exc_val)
        if cancelled_results:
            await checkpoint_if_cancelled()  # noqa: ASYNC102  # raises: results were lost to the cancellation


class _ServerCursor(AsyncServerCursor[Row]):
    """The server-side cursor of `Connection.cursor` (the default ``server_cursor_factory``)."""

    __slots__ = ()

    async def close(self) -> None:
        """Close the cursor, on the server (``CLOSE``) and here.

        Checkpoints: when the server is asked.  If cancelled: the cursor is closed
        all the same (within `Connection.cancel_timeout` of the cancellation; past
        that the connection is closed), then `trio.Cancelled` propagates.
        """
        conn = cast(Connection[Any], self._conn)
        async with conn._cleanup_lock():
            if self.closed:
                return
            try:
                if not conn.closed:
                    await conn._finish(self._close_gen())
            finally:
                self._close()  # here, even if the server could not be told
        await checkpoint_if_cancelled()
