"""triopool.aio: asyncio code under trio-asyncio borrows the trio pool's connections."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest
import trio
import trio.testing
import trio_asyncio

import triopool
from triopool.aio import AsyncioPool


class Snapshot:
    """What the pool looked like once the asyncio code was done (pool still open)."""

    def __init__(self, pool: triopool.ConnectionPool) -> None:
        self.status = pool.status()
        self.stats = pool.get_stats()


async def run_asyncio(dsn: str, code: Any, **pool_kwargs: Any) -> tuple[Any, Snapshot]:
    """Run asyncio `code(apool)` on trio-asyncio's loop with a fresh pool."""
    async with (
        trio_asyncio.open_loop(),
        triopool.open_pool(dsn, wait=True, **pool_kwargs) as pool,
    ):
        result = await trio_asyncio.aio_as_trio(code)(AsyncioPool(pool))
        await trio.testing.wait_all_tasks_blocked()  # returned connections settle
        return result, Snapshot(pool)


async def test_asyncio_code_gets_a_stock_psycopg_connection(postgres_dsn: str) -> None:
    async def code(apool: AsyncioPool) -> tuple[object, type]:
        assert asyncio.get_running_loop() is not None  # really asyncio code
        async with apool.connection() as conn:
            cur = await conn.execute("SELECT %s::int", [41])
            row = await cur.fetchone()
            return row, type(conn)

    (row, cls), pool = await run_asyncio(postgres_dsn, code, min_size=1)
    assert row == (41,)
    assert issubclass(cls, psycopg.AsyncConnection)
    assert not issubclass(cls, triopool.Connection)  # psycopg's own asyncio waits
    assert pool.stats["requests_num"] == 1


async def test_pool_limits_govern_asyncio_tasks(postgres_dsn: str) -> None:
    async def code(apool: AsyncioPool) -> int:
        active = peak = 0

        async def worker() -> None:
            nonlocal active, peak
            async with apool.connection() as conn:
                active += 1
                peak = max(peak, active)
                await conn.execute("SELECT pg_sleep(0.02)")
                active -= 1

        await asyncio.gather(*(worker() for _ in range(12)))
        return peak

    peak, pool = await run_asyncio(postgres_dsn, code, min_size=3)
    assert peak == 3
    assert pool.stats["requests_queued"] >= 9


async def test_asyncio_request_times_out_with_pool_timeout(postgres_dsn: str) -> None:
    async def code(apool: AsyncioPool) -> BaseException | None:
        held = await apool.getconn()
        try:
            await apool.getconn(timeout=0.1)
        except triopool.PoolTimeout as ex:
            return ex
        finally:
            await apool.putconn(held)  # noqa: ASYNC102  # asyncio code
        return None

    error, _ = await run_asyncio(postgres_dsn, code, min_size=1)
    assert isinstance(error, triopool.PoolTimeout)
    assert "couldn't get a connection after 0.10 sec" in str(error)


async def test_error_rolls_back_and_connection_returns(postgres_dsn: str) -> None:
    async def fail_in_block(apool: AsyncioPool) -> None:
        async with apool.connection() as conn:
            await conn.execute("CREATE TEMP TABLE t_aio (x int)")
            raise ZeroDivisionError

    async def code(apool: AsyncioPool) -> object:
        with pytest.raises(ZeroDivisionError):
            await fail_in_block(apool)
        async with apool.connection() as conn:
            cur = await conn.execute("SELECT to_regclass('pg_temp.t_aio') IS NULL")
            return await cur.fetchone()

    row, pool = await run_asyncio(postgres_dsn, code, min_size=1)
    assert row == (True,)  # the table creation was rolled back
    assert pool.status.available == 1


async def test_close_gives_the_connection_back(postgres_dsn: str) -> None:
    async def code(apool: AsyncioPool) -> None:
        conn = await apool.getconn()
        await conn.close()
        with pytest.raises(ValueError, match="not lent"):
            await apool.putconn(conn)

    _, pool = await run_asyncio(postgres_dsn, code, min_size=1)
    assert pool.status.available == 1
    assert pool.stats["returns_bad"] == 0


async def test_trio_connection_works_after_asyncio_use(postgres_dsn: str) -> None:
    """The view restores the pooled connection's handlers: trio NOTIFY still works."""

    async def code(apool: AsyncioPool) -> None:
        async with apool.connection() as conn:
            await conn.execute("SELECT 1")

    async with (
        trio_asyncio.open_loop(),
        triopool.open_pool(postgres_dsn, min_size=1, kwargs={"autocommit": True}) as pool,
    ):
        await trio_asyncio.aio_as_trio(code)(AsyncioPool(pool))
        async with pool.connection() as conn:
            await conn.execute("LISTEN t_aio_ch")
            await conn.execute("NOTIFY t_aio_ch, 'x'")
            with trio.fail_after(2):
                got = [n.payload async for n in conn.notifies(stop_after=1)]
            assert got == ["x"]
            await conn.execute("UNLISTEN *")


def test_rejects_other_pools() -> None:
    with pytest.raises(TypeError, match="ConnectionPool"):
        AsyncioPool(object())  # type: ignore[arg-type]
