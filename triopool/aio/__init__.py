"""Connections from a triopool pool for asyncio code running under trio-asyncio.

Some libraries only speak asyncio.  Inside a trio program they can run on
`trio_asyncio`'s loop; `AsyncioPool` lets them borrow connections from a
triopool `~triopool.ConnectionPool`, so the pool's limits, fairness, timeouts
and statistics govern them too::

    async with trio_asyncio.open_loop():
        async with triopool.open_pool(dsn, max_size=10) as pool:
            apool = triopool.aio.AsyncioPool(pool)
            await trio_asyncio.aio_as_trio(asyncio_code)(apool)

    async def asyncio_code(apool):          # plain asyncio
        async with apool.connection() as conn:   # a stock psycopg.AsyncConnection
            await conn.execute("...")

How: the pool lends one of its connections; the asyncio code gets a stock
`psycopg.AsyncConnection` *view* of the same libpq connection (so it waits on
asyncio's loop, as such libraries expect).  When the view is given back (by
`AsyncioPool.putconn`, the end of `AsyncioPool.connection`, or ``await
conn.close()``), the pool gets its connection back and handles it as any
returned connection (a transaction left open is rolled back, a broken one
replaced).  The view does not use server-side prepared statements
(``prepare_threshold=None``), whose names would clash with the pool
connection's own.

Cancellation: an asyncio task cancelled in `AsyncioPool.getconn` gets no
connection and keeps none (one the trio side lent it meanwhile goes back to
the pool); one cancelled in `AsyncioPool.putconn` (or leaving
`AsyncioPool.connection`) has given the connection back before its
`asyncio.CancelledError` is raised.

Needs the ``aio`` extra (``pip install 'triopool[aio]'``).  Import
`trio_asyncio` before psycopg is first imported, or call `AsyncioPool` only
from inside ``trio_asyncio.open_loop()``: psycopg keeps a reference to
asyncio's loop accessor taken at import time, which this module refreshes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import psycopg
import psycopg.waiting

from ..connection import Connection
from ..pool import ConnectionPool

__all__ = ["AsyncioPool"]

T = TypeVar("T")


def _trio_as_aio(fn: Any) -> Any:
    """trio-asyncio's adapter, imported on first use.

    Importing trio-asyncio patches asyncio process-wide (and slows plain asyncio
    down), so this module does it only when an `AsyncioPool` is used.  Then
    psycopg's import-time copy of ``asyncio.get_running_loop`` is refreshed so
    that psycopg's asyncio waits find trio-asyncio's loop.
    """
    import trio_asyncio

    if hasattr(psycopg.waiting, "get_running_loop"):
        psycopg.waiting.get_running_loop = asyncio.get_running_loop
    return trio_asyncio.trio_as_aio(fn)


def _in_trio(fn: Callable[..., Awaitable[T]], *args: Any) -> asyncio.Future[T]:
    """Start ``await fn(*args)`` in a trio task; its future, for asyncio code."""
    future: asyncio.Future[T] = _trio_as_aio(fn)(*args)
    return future


async def _to_the_end(future: asyncio.Future[T]) -> T:
    """Await `future` until it is done, even if this task is cancelled meanwhile.

    For a trio call that must happen once started (giving a connection
    back): trio-asyncio would not even start the trio task if the future were
    cancelled first.  A cancellation of this task is raised afterwards.
    """
    cancelled: asyncio.CancelledError | None = None
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError as ex:  # noqa: ASYNC103  # raised once the future is done
            cancelled = ex
    if cancelled is not None:
        if not future.cancelled():
            future.exception()  # retrieved: the cancellation wins
        raise cancelled
    return future.result()  # noqa: ASYNC910  # asyncio code: a future done already needs no wait


class AsyncioPool:
    """An asyncio-facing view of a triopool `~triopool.ConnectionPool`.

    Its methods are asyncio coroutines, to be awaited from asyncio code
    running on trio-asyncio's loop.  Getting a connection waits in the trio
    pool's queue (first come first served with trio clients) and raises its
    exceptions (`~triopool.PoolTimeout`, `~triopool.PoolClosed`,
    `~triopool.TooManyRequests`).
    """

    def __init__(self, pool: ConnectionPool) -> None:
        if not isinstance(pool, ConnectionPool):
            raise TypeError(f"pool must be a triopool ConnectionPool, got {type(pool).__name__}")
        self.pool = pool
        self._lent: dict[psycopg.AsyncConnection[Any], tuple[Connection[Any], Any, Any]] = {}

    async def getconn(self, timeout: float | None = None) -> psycopg.AsyncConnection[Any]:  # noqa: ASYNC109
        """Borrow a connection: a stock `psycopg.AsyncConnection` for asyncio code.

        Give it back with `putconn` (or ``await conn.close()``).

        If cancelled: no connection is taken (one the trio side had lent
        already goes back to the pool first).
        """
        task = asyncio.current_task()
        cancelling = task.cancelling() if task is not None else 0
        lending = _in_trio(self.pool.getconn, timeout)
        try:
            conn = await lending
        except asyncio.CancelledError:
            # Cancelled once the trio side had lent it (its future done, this
            # task not yet resumed): the connection would be held forever.
            if lending.done() and not lending.cancelled() and lending.exception() is None:
                await _to_the_end(_in_trio(self.pool.putconn, lending.result()))
            raise
        if task is not None and task.cancelling() > cancelling:
            # Cancelled while the trio side was lending it, too late to stop
            # that: trio-asyncio then drops the cancellation.  Honour it.
            await _to_the_end(_in_trio(self.pool.putconn, conn))
            raise asyncio.CancelledError
        pgconn = conn.pgconn
        handlers = (pgconn.notice_handler, pgconn.notify_handler)
        try:
            view = _AsyncioView(pgconn)
            view._autocommit = conn.autocommit
            view.prepare_threshold = None
            view.lender = self
            view._pool = None  # pooled: psycopg doesn't warn when it is deleted open
        except BaseException:
            pgconn.notice_handler, pgconn.notify_handler = handlers
            await _to_the_end(_in_trio(self.pool.putconn, conn))
            raise
        self._lent[view] = (conn, *handlers)
        return view

    async def putconn(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Give back a connection obtained from `getconn`.

        If cancelled: the connection is given back all the same, then
        `asyncio.CancelledError` is raised.

        Raises:
            ValueError: `conn` was not lent by this object.
        """
        try:
            pooled, notice_handler, notify_handler = self._lent.pop(conn)
        except KeyError:
            raise ValueError("this connection was not lent by this AsyncioPool") from None
        pgconn = pooled.pgconn
        pgconn.notice_handler, pgconn.notify_handler = notice_handler, notify_handler
        await _to_the_end(_in_trio(self.pool.putconn, pooled))

    @asynccontextmanager
    async def connection(
        self,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """Borrow a connection for an ``async with`` block (asyncio).

        As `triopool.ConnectionPool.connection`: commit on success, roll back
        on error, then give it back.
        """
        conn = await self.getconn(timeout)
        try:
            async with conn:  # commits or rolls back; doesn't close (it is pooled)
                yield conn
        finally:
            if conn in self._lent:
                await self.putconn(conn)


class _AsyncioView(psycopg.AsyncConnection[Any]):
    """A psycopg `~psycopg.AsyncConnection` on a pooled connection's libpq connection.

    ``await conn.close()`` gives it back to its `AsyncioPool` (as psycopg_pool's
    ``close_returns``), so libraries that close their connections return them.
    """

    lender: AsyncioPool | None = None

    async def close(self) -> None:  # noqa: ASYNC910  # asyncio code: no trio checkpoint
        """Give the connection back; if given back already, do nothing.

        (The libpq connection is the pool's: closing it for real would kill a
        connection the pool may have lent to someone else meanwhile.)
        """
        if self.lender is None:
            await super().close()  # not lent yet: the view was never handed out
        elif self in self.lender._lent:
            await self.lender.putconn(self)
