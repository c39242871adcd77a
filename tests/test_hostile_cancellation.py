"""Hostile tests: a cancellation at every checkpoint, combined with the pool's options.

Each sweep cancels the operation after k scheduling steps, for k = 0, 1, 2...
until it completes, and after every run checks the invariants: nothing lent,
every connection idle (or replaced), the next client's connection idle and in
the pool's autocommit mode, nothing committed that should not be.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import trio
import trio.testing
from _fault_helpers import completes_despite, sweep_checkpoints, until
from _hostile_helpers import WITHIN, Boom, real_pool, rows_in
from _hostile_helpers import name as name
from _hostile_helpers import table as table
from _pool_checks import Server, assert_no_leaks

from triopool import ConnectionPool

IDLE = psycopg.pq.TransactionStatus.IDLE


async def reset(conn: Any) -> None:
    await conn.execute("SELECT 1")
    await conn.rollback()


OPTIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "check+reset": {"check": ConnectionPool.check_connection, "reset": reset},
    "close_returns": {"close_returns": True},
}


async def settled_and_usable(pool: ConnectionPool, autocommit: bool, what: str) -> None:
    """Nothing lent, every connection back; the next one idle, in the pool's mode."""
    await trio.testing.wait_all_tasks_blocked()
    await until(lambda: pool.status().available == pool.status().size, WITHIN, what)
    assert_no_leaks(pool)
    async with pool.connection() as conn:
        assert conn.info.transaction_status == IDLE, what
        assert conn.autocommit is autocommit, what
        await conn.execute("SELECT 1")


@pytest.mark.parametrize("options", OPTIONS, ids=list(OPTIONS))
@pytest.mark.parametrize("autocommit", [False, True], ids=["tx", "autocommit"])
async def test_one_shot_failing_midway_cancelled_everywhere(
    postgres_server: Server, name: str, table: str, options: str, autocommit: bool
) -> None:
    """A one-shot INSERT that fails after inserting rows (the server rolls it
    back and the caller gets the server's error), cancelled at every step: never
    committed, and the connection never goes back in a transaction or in the
    wrong autocommit mode."""
    async with real_pool(
        postgres_server,
        name,
        min_size=1,
        max_size=1,
        kwargs={"autocommit": autocommit},
        **OPTIONS[options],
    ) as pool:
        await pool.wait(WITHIN)

        async def case(k: int) -> bool:
            async def statement() -> None:
                with pytest.raises(psycopg.errors.DivisionByZero):
                    await pool.execute(
                        f"INSERT INTO {table} SELECT 1 / (2 - g) FROM generate_series(1, 3) g"
                    )

            done = await completes_despite(k, statement)
            await settled_and_usable(pool, autocommit, f"cancelled after {k} steps")
            return done

        assert await sweep_checkpoints(case) > 0
        assert await rows_in(postgres_server, table) == []


@pytest.mark.parametrize("ending", ["normal", "raises"])
async def test_close_returns_block_cancelled_everywhere(
    postgres_server: Server, name: str, table: str, ending: str
) -> None:
    """``connection()`` with ``close_returns``: insert, ``await conn.close()``, then
    leave (normally or raising), cancelled at every step of every task: the insert
    is never committed (the connection went back in a transaction), and the pool
    ends each run with its connection idle."""
    async with real_pool(
        postgres_server, name, min_size=1, max_size=1, close_returns=True, reset=reset
    ) as pool:
        await pool.wait(WITHIN)

        async def case(k: int) -> bool:
            async def block() -> None:  # noqa: ASYNC910  # pool.connection() always checkpoints
                try:
                    async with pool.connection() as conn:
                        await conn.execute(f"INSERT INTO {table} VALUES (1)")
                        await conn.close()
                        if ending == "raises":
                            raise Boom
                except Boom:
                    pass

            done = await completes_despite(k, block, every_task=True)
            await settled_and_usable(pool, False, f"cancelled after {k} steps")
            return done

        assert await sweep_checkpoints(case) > 0
        assert await rows_in(postgres_server, table) == []


async def test_checked_request_with_reset_cancelled_everywhere(
    postgres_server: Server, name: str, table: str
) -> None:
    """A request with ``check`` and ``reset``, a query and a commit, cancelled at
    every step of every task (the check's round trip, the query, the COMMIT, the
    reset in the connection actor): the row is committed at most once, nothing
    leaks, the pool serves on."""
    async with real_pool(
        postgres_server,
        name,
        min_size=1,
        max_size=1,
        check=ConnectionPool.check_connection,
        reset=reset,
    ) as pool:
        await pool.wait(WITHIN)
        committed = 0

        async def case(k: int) -> bool:
            nonlocal committed

            async def block() -> None:
                async with pool.connection() as conn:
                    await conn.execute(f"INSERT INTO {table} VALUES (%s)", [k])

            done = await completes_despite(k, block, every_task=True)
            await settled_and_usable(pool, False, f"cancelled after {k} steps")
            rows = await rows_in(postgres_server, table)
            assert len(rows) <= 1 and set(rows) <= {k}, rows
            committed += len(rows)
            await trio.to_thread.run_sync(postgres_server.execute, f"DELETE FROM {table}")
            return done

        assert await sweep_checkpoints(case) > 0
        assert committed >= 1
