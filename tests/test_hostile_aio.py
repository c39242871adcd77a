"""Hostile tests: the asyncio bridge (`triopool.aio.AsyncioPool`) misused.

Views given back twice, closed after being given back, used after being given
back; a pool closed under asyncio code; asyncio timeouts and BaseExceptions in
the middle of a query.  After each: the pool has its connection back, idle and
usable, and nothing is held.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest
import trio
import trio.testing
import trio_asyncio
from _fault_helpers import until

import triopool
from triopool.aio import AsyncioPool

Code = Callable[[AsyncioPool], Awaitable[Any]]


class Stop(BaseException):
    """Not an Exception."""


async def with_asyncio(dsn: str, code: Code, **options: Any) -> triopool.ConnectionPool:
    """Run asyncio `code(apool)` with a pool of one connection; check it is idle after."""
    options = {"min_size": 1, "max_size": 1, "timeout": 5.0, **options}
    async with (
        trio_asyncio.open_loop(),
        triopool.open_pool(dsn, wait=True, **options) as pool,
    ):
        with trio.fail_after(5):
            await trio_asyncio.aio_as_trio(code)(AsyncioPool(pool))
            await trio.testing.wait_all_tasks_blocked()
            assert pool.holders() == []
            if not pool.closed:
                await until(lambda: pool.status() == triopool.PoolStatus(1, 1, 1, 0), 5, "idle")
                assert await pool.fetchval("SELECT 1") == 1
    return pool


async def test_view_closed_after_being_given_back(postgres_dsn: str) -> None:
    """asyncio code gives its view back, then closes it (a library's cleanup after
    the pool's): the view's libpq connection is the pool's, now lent to a trio
    client, and must stay open.  Closing the view used to close it for real:
    the trio client's next query failed."""

    async def code(apool: AsyncioPool) -> None:
        view = await apool.getconn()
        await apool.putconn(view)
        pool = apool.pool

        async def trio_client() -> None:
            async with pool.connection() as conn:
                await trio_asyncio.aio_as_trio(view.close)()  # the stale close
                cur = await conn.execute("SELECT 41 + 1")
                assert await cur.fetchone() == (42,)

        await trio_asyncio.trio_as_aio(trio_client)()
        await view.close()  # again, with the connection idle in the pool

    await with_asyncio(postgres_dsn, code)


@pytest.mark.xfail(strict=True, reason="hostile: a view given back can still be used")
async def test_view_used_after_being_given_back(postgres_dsn: str) -> None:
    """A query through a view already given back must fail as on a closed
    connection; it ran on the pool's connection (idle, or lent to someone else),
    leaving it in a transaction."""

    async def code(apool: AsyncioPool) -> None:
        view = await apool.getconn()
        await apool.putconn(view)
        with pytest.raises(psycopg.OperationalError):
            await view.execute("SELECT 1")

    await with_asyncio(postgres_dsn, code)


async def test_give_back_twice_foreign_and_bad_timeouts(postgres_dsn: str) -> None:
    """Given back twice, or a connection the bridge did not lend: `ValueError`.  A
    bad ``timeout``: `TypeError`/`ValueError` naming it, nothing taken."""

    async def code(apool: AsyncioPool) -> None:
        view = await apool.getconn()
        await apool.putconn(view)
        with pytest.raises(ValueError, match="not lent"):
            await apool.putconn(view)
        async with await psycopg.AsyncConnection.connect(postgres_dsn) as foreign:
            with pytest.raises(ValueError, match="not lent"):
                await apool.putconn(foreign)
        for timeout, error in [("1", TypeError), (True, TypeError), (-1, ValueError)]:
            with pytest.raises(error, match="timeout"):
                await apool.getconn(timeout=timeout)  # type: ignore[arg-type]  # hostile
        with pytest.raises(triopool.PoolTimeout):
            async with apool.connection(), apool.connection(timeout=0.05):
                pass

    await with_asyncio(postgres_dsn, code)


async def test_pool_closed_under_asyncio_code(postgres_dsn: str) -> None:
    """The trio pool closes while asyncio code holds a view: the view works until
    given back; giving it back closes the connection; new requests get
    `PoolClosed`."""

    async def code(apool: AsyncioPool) -> None:
        view = await apool.getconn()
        await trio_asyncio.trio_as_aio(apool.pool.close)()
        cur = await view.execute("SELECT 3")
        assert await cur.fetchone() == (3,)
        await apool.putconn(view)
        assert view.closed
        with pytest.raises(triopool.PoolClosed):
            await apool.getconn()

    pool = await with_asyncio(postgres_dsn, code)
    assert pool.closed


@pytest.mark.parametrize("how", ["timeout", "base-exception"])
async def test_query_interrupted_inside_connection(postgres_dsn: str, how: str) -> None:
    """An asyncio timeout in the middle of a query, or a BaseException: the view
    is given back, its transaction ended, and the pool's connection serves on."""

    async def code(apool: AsyncioPool) -> None:
        if how == "timeout":
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05), apool.connection() as conn:
                    await conn.execute("SELECT pg_sleep(2)")
        else:
            with pytest.raises(Stop):
                async with apool.connection() as conn:
                    await conn.execute("SELECT 1")
                    raise Stop
        async with apool.connection() as conn:
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            cur = await conn.execute("SELECT 2")
            assert await cur.fetchone() == (2,)

    await with_asyncio(postgres_dsn, code)
