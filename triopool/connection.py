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
  Then `trio.Cancelled` propagates.  A connection is never left ``ACTIVE``.
* **Name resolution**: host names are resolved by psycopg's own
  ``conninfo_attempts()`` in a trio worker thread (as `trio.socket.getaddrinfo`
  does); IP addresses and socket paths need no thread.
* **connect_timeout**: enforced per attempt with a trio cancel scope, so
  ``connect_timeout=1`` means one second (libpq alone has a 2 s minimum).
  Fractional values are accepted.
* **Locking**: `Connection.lock` is a FIFO trio lock that does not
  checkpoint when it is free (every locked operation checkpoints anyway, while
  waiting for the server).
* **Transactions and ``async with conn``**: the rollback that follows an
  exception (including `trio.Cancelled`) runs in a shielded scope bounded by
  `Connection.cancel_timeout`.

psycopg non-public names used (all of them, and only in this module):

* methods overridden or called: ``AsyncConnection.wait``,
  ``AsyncConnection._connect_gen``, ``AsyncConnection._get_connection_params``,
  ``BaseConnection._cancel_gen`` (its ``timeout`` argument exists in 3.2 only),
  ``BaseConnection._should_cancel``;
* attributes: ``AsyncConnection.lock`` (replaced), ``BaseConnection._autocommit``,
  ``._adapters``, ``._closed``, ``._pipeline``, ``._notify_handlers``,
  ``._notifies_backlog``, ``BaseTransaction._conn``;
* the generator protocol: ``psycopg.generators.notifies`` and the
  ``psycopg.waiting.Wait``/``Ready`` values generators yield and receive;
* ``AsyncTransaction.__aenter__``/``__aexit__`` being the whole of a
  transaction block (they are wrapped, not reimplemented).

Everything else is psycopg's public API (including ``psycopg.pq`` for draining
an interrupted command and ``psycopg.conninfo.conninfo_attempts`` for names).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import select
import warnings
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from inspect import signature
from types import TracebackType
from typing import Any, Literal, cast

import psycopg
import trio
from psycopg import errors as e
from psycopg import pq
from psycopg.abc import AdaptContext, ConnDict, ConnParam, PQGen, PQGenConn
from psycopg.adapt import AdaptersMap
from psycopg.conninfo import conninfo_attempts, make_conninfo, timeout_from_conninfo
from psycopg.cursor_async import AsyncCursor
from psycopg.generators import notifies as _notifies_gen
from psycopg.rows import AsyncRowFactory, Row, tuple_row
from psycopg.transaction import AsyncTransaction
from psycopg.waiting import Ready, Wait
from trio.lowlevel import (
    cancel_shielded_checkpoint,
    checkpoint,
    checkpoint_if_cancelled,
    wait_readable,
    wait_writable,
)

__all__ = ["Connection"]

logger = logging.getLogger("triopool")

_ACTIVE = pq.TransactionStatus.ACTIVE
_COPY_OUT = pq.ExecStatus.COPY_OUT
_COPY_IN = pq.ExecStatus.COPY_IN
_TUPLE_ROW = cast(AsyncRowFactory[Any], tuple_row)
_WAIT_R = int(Wait.R)
_WAIT_W = int(Wait.W)
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

    __slots__ = ("_locked", "_waiters")

    def __init__(self) -> None:
        self._locked = False
        self._waiters = trio.lowlevel.ParkingLot()

    def locked(self) -> bool:
        return self._locked

    async def acquire(self) -> None:
        if not self._locked:
            self._locked = True
            return  # noqa: ASYNC910  # free lock: no checkpoint by design
        await self._waiters.park()  # release() hands ownership over

    def release(self) -> None:
        if not self._locked:
            raise RuntimeError("release of an unlocked connection lock")
        if self._waiters:
            self._waiters.unpark()
        else:
            self._locked = False

    async def __aenter__(self) -> None:
        await self.acquire()

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

    Always a checkpoint.
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

    async with trio.open_nursery() as nursery:

        async def wait_for(waiter: Callable[[int], Any], flag: int) -> None:
            nonlocal winner
            await waiter(fd)
            winner |= flag
            nursery.cancel_scope.cancel()

        nursery.start_soon(wait_for, wait_readable, _READY_R)
        nursery.start_soon(wait_for, wait_writable, _READY_W)
    return winner


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

    Used after a cancel request, once the generator that was running has been
    abandoned: results are discarded, ``COPY TO`` data is read to its end and a
    ``COPY FROM`` is failed.  Starts by waiting for the socket to be readable.
    """
    while pgconn.transaction_status == _ACTIVE:
        ready = yield Wait.R
        if not ready:
            continue
        pgconn.consume_input()
        while pgconn.transaction_status == _ACTIVE and not pgconn.is_busy():
            result = pgconn.get_result()
            if result is None:
                if pgconn.pipeline_status:
                    break  # between two queued results: wait for more data
                continue
            if result.status == _COPY_OUT:
                while (nbytes := pgconn.get_copy_data(1)[0]) > 0:
                    pass
                if nbytes == 0:
                    break  # more copy data to come
            elif result.status == _COPY_IN:
                pgconn.put_copy_end(b"command cancelled")
                while pgconn.flush():
                    yield Wait.W


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
    * ``connect_timeout`` (conninfo or keyword) is honoured to the fraction of a
      second, per host attempt.

    Create connections with `connect`.
    """

    #: Seconds allowed to cancel an interrupted command on the server and drain
    #: the connection (and to roll back a transaction block left by an
    #: exception); past this the connection is closed.
    cancel_timeout: float = 5.0

    def __init__(
        self,
        pgconn: pq.abc.PGconn,
        row_factory: AsyncRowFactory[Row] = _TUPLE_ROW,
    ) -> None:
        super().__init__(pgconn, row_factory)
        self.lock = _ConnectionLock()  # type: ignore[assignment]

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
        finished in time (the connection is then in an undefined state unless
        nothing was in progress).

        Checkpoints: always.  If cancelled while a command is in progress on
        the server: see the class docstring; if cancelled before anything was
        sent (and no command is in progress), nothing is sent.
        """
        pgconn = self.pgconn
        try:
            await checkpoint_if_cancelled()
        except BaseException:
            # A cancelled task starts nothing; if it is in the middle of a
            # command (e.g. between two rows of a stream), that command is
            # cancelled on the server before Cancelled propagates.
            gen.close()
            if pgconn.transaction_status == _ACTIVE:
                await self._abort_command()  # noqa: ASYNC102  # _abort_command shields itself, bounded
            raise
        try:
            state = next(gen)
        except StopIteration as ex:
            await cancel_shielded_checkpoint()
            return ex.value
        fd = pgconn.socket
        if timeout is None:
            return await self._complete(gen, fd, state)
        with trio.move_on_after(timeout):
            return await self._complete(gen, fd, state)
        raise e.OperationalError("wait timeout expired")

    async def _complete(self, gen: PQGen[Any], fd: int, state: int) -> Any:
        """Run `gen` to completion; on interruption abort the command, then re-raise."""
        try:
            return await self._drive(gen, fd, state)
        except Exception:
            raise
        except BaseException:  # trio.Cancelled, KeyboardInterrupt
            gen.close()
            if self.pgconn.transaction_status == _ACTIVE:
                await self._abort_command()  # noqa: ASYNC102  # _abort_command shields itself, bounded
            raise

    async def _drive(self, gen: PQGen[Any], fd: int, state: int) -> Any:
        """Run `gen` to completion from `state`, waiting on `fd` as it asks."""
        try:
            while True:
                ready = await _wait_ready(fd, state)
                state = gen.send(ready)
        except StopIteration as ex:
            return ex.value  # noqa: ASYNC910  # every path through the loop awaited
        except trio.ClosedResourceError:
            raise e.OperationalError("the connection was closed") from None
        except OSError as ex:
            raise e.OperationalError("connection socket closed") from ex

    async def _abort_command(self) -> None:  # noqa: ASYNC910  # shielded on purpose
        """Cancel the command running on the server and drain the connection.

        The caller abandoned the generator it was running: what the server
        still sends for the command is consumed at the libpq level
        (`_drain_command`).  Shielded and bounded by `cancel_timeout`; the
        connection is closed if it is still ``ACTIVE`` at the end.
        """
        with trio.move_on_after(self.cancel_timeout, shield=True):  # noqa: ASYNC912  # cleanup: shielded and bounded on purpose
            try:
                await self._send_cancel_request()
                drain = _drain_command(self.pgconn)
                with suppress(StopIteration):  # not active any more
                    await self._drive(drain, self.pgconn.socket, next(drain))
            except e.Error as ex:
                logger.debug("error draining an interrupted command: %s", ex)
            except BaseException:  # our own deadline, or a KeyboardInterrupt
                if self.pgconn.transaction_status == _ACTIVE:
                    logger.warning("command not terminated after cancellation: closing connection")
                    self._close_now()
                raise
        if self.pgconn.transaction_status == _ACTIVE and not self.closed:
            logger.warning("command not terminated after cancellation: closing connection")
            self._close_now()

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
        `psycopg.OperationalError`.
        """
        if self.closed:
            return  # noqa: ASYNC910  # closing never waits
        pool = getattr(self, "_pool", None)
        if pool is not None and getattr(pool, "close_returns", False):
            await pool.putconn(self)
            return
        self._close_now()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        """Commit (success) or roll back (exception), then close.

        After an exception (`trio.Cancelled` included) the rollback runs in a
        shielded scope bounded by `cancel_timeout`.
        """
        if exc_type is None or self.closed:
            await super().__aexit__(exc_type, exc_val, exc_tb)  # noqa: ASYNC102  # commit after success stays cancellable
            return
        with trio.move_on_after(self.cancel_timeout, shield=True) as scope:
            await super().__aexit__(exc_type, exc_val, exc_tb)
        if scope.cancelled_caught:
            self._close_now()

    @asynccontextmanager
    async def transaction(
        self, savepoint_name: str | None = None, force_rollback: bool = False
    ) -> AsyncIterator[AsyncTransaction]:
        """Start a transaction block (or a savepoint if one is in progress).

        As `psycopg.AsyncConnection.transaction`.  Entering and leaving the
        block after an exception run shielded, bounded by `cancel_timeout`, so a
        cancelled block is rolled back on the server and the connection stays
        usable; if the server does not answer in time the connection is closed.

        Checkpoints: on entry and on exit.
        """
        tx = _Transaction(self, savepoint_name, force_rollback)
        if self._pipeline:
            async with self.pipeline(), tx, self.pipeline():
                yield tx
        else:
            async with tx:
                yield tx

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


class _Transaction(AsyncTransaction):
    """A transaction block whose setup and rollback survive cancellation."""

    async def __aenter__(self) -> _Transaction:
        conn = cast(Connection[Any], self._conn)
        with trio.move_on_after(conn.cancel_timeout, shield=True) as scope:
            await super().__aenter__()
        if scope.cancelled_caught:
            conn._close_now()
            raise e.OperationalError(
                "transaction start not acknowledged in time: connection closed"
            )
        try:
            await checkpoint_if_cancelled()
        except BaseException as ex:
            await self.__aexit__(type(ex), ex, ex.__traceback__)  # noqa: ASYNC102  # __aexit__ shields the rollback, bounded
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool:
        if exc_type is None:
            return await super().__aexit__(exc_type, exc_val, exc_tb)  # noqa: ASYNC102  # commit after success stays cancellable
        conn = cast(Connection[Any], self._conn)
        swallow: bool | Literal[False] = False
        with trio.move_on_after(conn.cancel_timeout, shield=True) as scope:
            swallow = await super().__aexit__(exc_type, exc_val, exc_tb)
        if scope.cancelled_caught:
            logger.warning("rollback not acknowledged in time: closing connection")
            conn._close_now()
            return False
        return swallow
