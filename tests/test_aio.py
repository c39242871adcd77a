"""triopool.aio: asyncio code under trio-asyncio borrows the trio pool's connections."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
import trio
import trio.testing
import trio_asyncio
from _fault_helpers import cancel_after_steps

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


# -- cancellation: every window of the bridge leaks nothing (issue 15 #2) -----------------

#: Most cancellation points a sweep tries before giving up.
SWEEP_LIMIT = 300


@dataclass
class Round:
    """One run of a sweep: where the cancellation landed (as the pool saw it; ""
    if it came after the operation ended), and whether the task was cancelled."""

    window: str
    cancelled: bool

    @property
    def last(self) -> bool:
        """The operation ended before the cancellation: the sweep is complete."""
        return self.window in ("", "done")


def window_of(pool: triopool.ConnectionPool, task: asyncio.Task[Any]) -> str:
    """Where a cancellation lands, as seen from the pool."""
    if task.done():
        return "done"
    if pool.status().waiting:
        return "queued"
    if pool.holders():
        return "lent"
    return "handed over"


async def cancel_sweep(
    dsn: str, scenario: Callable[[AsyncioPool, int], Awaitable[Round]], *, raised: bool = True
) -> set[str]:
    """Run asyncio `scenario(apool, k)` for k = 0, 1, 2... until it completes
    before its cancellation lands; after each run the pool must have its one
    connection back, idle, held by no one (and, if `raised`, a cancellation that
    landed before the end must have been raised).  Returns the windows hit."""
    windows: set[str] = set()
    async with (
        trio_asyncio.open_loop(),
        triopool.open_pool(dsn, min_size=1, max_size=1, wait=True, timeout=5) as pool,
    ):
        apool = AsyncioPool(pool)
        for k in range(SWEEP_LIMIT):
            with trio.fail_after(5):
                run = await trio_asyncio.aio_as_trio(scenario)(apool, k)
                await trio.testing.wait_all_tasks_blocked()
                assert pool.holders() == [], f"k={k}, cancelled when {run.window}"
                await pool.wait(5)  # a connection broken by the cancellation is replaced
            assert pool.status() == triopool.PoolStatus(1, 1, 1, 0), f"k={k}"
            # Cancelled in time: the task must not go on as if it were not.
            assert run.cancelled or run.last or not raised, f"k={k}: {run.window}, not raised"
            windows.add(run.window)
            if run.last:
                return windows
    raise AssertionError(f"still cancelled after {SWEEP_LIMIT} steps")


async def cancelled_after(
    k: int, pool: triopool.ConnectionPool, task: asyncio.Task[Any], start: Callable[[], object]
) -> Round:
    """Call `start()`, cancel `task` after `k` trio steps (of any task) unless it is
    done by then, and wait for it to end."""
    where: list[str] = []

    def cancel() -> None:
        where.append(window_of(pool, task))
        task.cancel()

    with cancel_after_steps(k, cancel, task=None):
        start()
        await asyncio.wait([task])
    if not task.cancelled():
        task.result()  # no other error
    return Round(where[0] if where else "", task.cancelled())


async def test_getconn_cancelled_in_every_window(postgres_dsn: str) -> None:
    """An asyncio task cancelled in ``getconn()`` while queued, or after the trio
    side lent it the connection but before it resumed (the connection used to
    stay held forever by a finished task): nothing leaks."""

    async def scenario(apool: AsyncioPool, k: int) -> Round:
        held = await apool.getconn()
        waiter = asyncio.ensure_future(apool.getconn())
        await trio_asyncio.trio_as_aio(trio.testing.wait_all_tasks_blocked)()
        assert apool.pool.status().waiting == 1
        put_back = asyncio.ensure_future(apool.putconn(held))
        run = await cancelled_after(k, apool.pool, waiter, lambda: None)
        await put_back
        if not run.cancelled:
            await apool.putconn(waiter.result())
        return run

    windows = await cancel_sweep(postgres_dsn, scenario)
    assert {"queued", "lent"} <= windows, windows


async def test_putconn_cancelled_in_every_window(postgres_dsn: str) -> None:
    """An asyncio task cancelled in ``putconn()`` (before or after the trio side took
    the connection back): the connection is back all the same."""

    async def scenario(apool: AsyncioPool, k: int) -> Round:
        conn = await apool.getconn()
        task = asyncio.ensure_future(apool.putconn(conn))
        await asyncio.sleep(0)  # putconn() runs up to its first wait
        return await cancelled_after(k, apool.pool, task, lambda: None)

    windows = await cancel_sweep(postgres_dsn, scenario)
    assert "lent" in windows, windows


async def test_connection_exit_cancelled_in_every_window(postgres_dsn: str) -> None:
    """An asyncio task cancelled while leaving ``connection()`` (ending the
    transaction, giving the connection back): nothing leaks."""

    async def scenario(apool: AsyncioPool, k: int) -> Round:
        entered, leave = asyncio.Event(), asyncio.Event()

        async def use() -> None:
            async with apool.connection() as conn:
                await conn.execute("SELECT 1")  # in a transaction: leaving commits
                entered.set()
                await leave.wait()

        task = asyncio.ensure_future(use())
        await entered.wait()
        return await cancelled_after(k, apool.pool, task, leave.set)

    # Only leaks are checked: psycopg 3.2's own waits (asyncio.wait_for, which on
    # Python < 3.12 may drop a cancellation landing as it completes) can drop one.
    windows = await cancel_sweep(postgres_dsn, scenario, raised=False)
    assert "lent" in windows, windows
