"""One-shot statements on the pool: ``fetch``, ``fetchrow``, ``fetchval``, ``execute``,
``executemany`` (API.md, "One-shot statements"), and ``acquire``.

Against the real server, for both pool classes and both ``autocommit`` settings: each
call is one statement and its own transaction, committed on success; a SQL error
reaches that caller only; the wait for a connection is bounded as ``getconn``'s; a
cancelled call leaks nothing and leaves the connection as the pool lent it.
"""

from __future__ import annotations

import psycopg
import pytest
import trio
import trio.testing
from _contract_helpers import PoolClass, contract_pool, min_for, wait_queued
from _contract_helpers import name as name
from _contract_helpers import pool_cls as pool_cls
from _pool_checks import Server
from psycopg import errors, sql
from psycopg.rows import dict_row

from triopool import Connection, ConnectionPool, PoolTimeout


@pytest.fixture(params=[False, True], ids=["tx", "autocommit"])
def autocommit(request: pytest.FixtureRequest) -> bool:
    value: bool = request.param
    return value


def table(name: str) -> sql.Identifier:
    return sql.Identifier(f"t_{name}")


async def make_table(pool: ConnectionPool, name: str) -> sql.Composed:
    """A fresh table ``(id int primary key, note text)``; its name as SQL."""
    ident = sql.SQL("{}").format(table(name))
    await pool.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident))
    await pool.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, note text)").format(ident))
    return ident


async def test_results_of_each_call(
    pool_cls: PoolClass, autocommit: bool, postgres_server: Server, name: str
) -> None:
    async with contract_pool(
        pool_cls,
        postgres_server,
        name,
        min_size=min_for(pool_cls, 1),
        max_size=2,
        kwargs={"autocommit": autocommit},
    ) as pool:
        t = await make_table(pool, name)
        two_rows = sql.SQL("INSERT INTO {} VALUES (1, 'a'), (2, 'b')").format(t)
        assert await pool.execute(two_rows) == 2
        rows = [(3, "c"), (4, "d"), (5, "e")]
        insert = sql.SQL("INSERT INTO {} VALUES (%s, %s)").format(t)
        assert await pool.executemany(insert, rows) == 3
        select = sql.SQL("SELECT id, note FROM {} ORDER BY id").format(t)
        assert await pool.fetch(select) == [(1, "a"), (2, "b"), (3, "c"), (4, "d"), (5, "e")]
        assert await pool.fetchrow(select) == (1, "a")
        one = sql.SQL("SELECT note FROM {} WHERE id = %s").format(t)
        assert await pool.fetchval(one, [4]) == "d"
        assert await pool.fetchval(one, [99]) is None
        assert await pool.fetchrow(one, [99]) is None
        assert await pool.fetch(one, [99]) == []
        named = sql.SQL("SELECT note FROM {} WHERE id = %(id)s").format(t)
        assert await pool.fetchval(named, {"id": 2}) == "b"
        assert await pool.execute("SELECT 1") == 1
        assert await pool.execute("SET application_name TO DEFAULT") == -1  # no rowcount
        await pool.execute(sql.SQL("DROP TABLE {}").format(t))


async def test_committed_on_success_whatever_autocommit(
    pool_cls: PoolClass, autocommit: bool, postgres_server: Server, name: str
) -> None:
    """Another connection sees the change at once; the pooled connections come back
    idle and with their own autocommit setting."""
    async with contract_pool(
        pool_cls,
        postgres_server,
        name,
        min_size=min_for(pool_cls, 1),
        max_size=1,
        kwargs={"autocommit": autocommit},
    ) as pool:
        t = await make_table(pool, name)
        await pool.execute(sql.SQL("INSERT INTO {} VALUES (1, 'x')").format(t))
        await pool.executemany(sql.SQL("INSERT INTO {} VALUES (%s, 'y')").format(t), [[2], [3]])
        async with await Connection.connect(postgres_server.dsn) as other:
            cur = await other.execute(sql.SQL("SELECT count(*) FROM {}").format(t))
            assert await cur.fetchone() == (3,)
        async with pool.connection() as conn:
            assert conn.autocommit is autocommit
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        await pool.execute(sql.SQL("DROP TABLE {}").format(t))


async def test_sql_error_reaches_its_caller_only(
    pool_cls: PoolClass, autocommit: bool, postgres_server: Server, name: str
) -> None:
    """Concurrent callers on one connection: the failing one gets psycopg's error, the
    others their results; a failed executemany inserts nothing."""
    async with contract_pool(
        pool_cls,
        postgres_server,
        name,
        min_size=min_for(pool_cls, 1),
        max_size=1,
        kwargs={"autocommit": autocommit},
    ) as pool:
        t = await make_table(pool, name)
        results: dict[int, object] = {}

        async def caller(i: int) -> None:  # noqa: ASYNC910  # fetchval checkpoints
            try:
                results[i] = await pool.fetchval("SELECT 10 / %s", [i % 3])
            except errors.DivisionByZero as ex:
                results[i] = ex

        async with trio.open_nursery() as nursery:
            for i in range(9):
                nursery.start_soon(caller, i)
        for i, result in results.items():
            if i % 3:
                assert result == 10 // (i % 3)
            else:
                assert isinstance(result, errors.DivisionByZero)
        insert = sql.SQL("INSERT INTO {} VALUES (%s, 'z')").format(t)
        with pytest.raises(errors.UniqueViolation):
            await pool.executemany(insert, [[1], [2], [1]])
        assert await pool.fetchval(sql.SQL("SELECT count(*) FROM {}").format(t)) == 0
        await pool.execute(sql.SQL("DROP TABLE {}").format(t))


async def test_fetchval_whatever_the_row_factory(postgres_server: Server, name: str) -> None:
    async with contract_pool(
        ConnectionPool, postgres_server, name, min_size=1, kwargs={"row_factory": dict_row}
    ) as pool:
        assert await pool.fetchval("SELECT 7 AS seven, 8") == 7
        assert await pool.fetchrow("SELECT 7 AS seven") == {"seven": 7}  # rows: the factory's


async def test_timeout_bounds_the_wait_for_a_connection(
    pool_cls: PoolClass, postgres_server: Server, name: str
) -> None:
    async with contract_pool(
        pool_cls, postgres_server, name, min_size=min_for(pool_cls, 1), max_size=1
    ) as pool:
        async with pool.acquire():  # the only connection, under asyncpg's name
            started = trio.current_time()
            with pytest.raises(PoolTimeout):
                await pool.fetchval("SELECT 1", timeout=0.2)
            assert 0.2 <= trio.current_time() - started < 1.0


async def test_cancelled_call_leaks_nothing(
    pool_cls: PoolClass, autocommit: bool, postgres_server: Server, name: str
) -> None:
    """Cancelled while its statement runs: cancelled on the server, the connection back
    in the pool idle, with the pool's autocommit setting, and the next call served."""
    async with contract_pool(
        pool_cls,
        postgres_server,
        name,
        min_size=min_for(pool_cls, 1),
        max_size=1,
        kwargs={"autocommit": autocommit},
    ) as pool:
        with trio.move_on_after(0.2) as scope:
            await pool.fetchval("SELECT pg_sleep(30)")
        assert scope.cancelled_caught
        assert await pool.fetchval("SELECT 41 + 1") == 42
        async with pool.connection() as conn:
            assert conn.autocommit is autocommit
        await trio.testing.wait_all_tasks_blocked()
        assert pool.get_stats()["requests_num"] == 3  # one-shots count as requests


@pytest.mark.parametrize("steps", range(6))
async def test_cancelled_at_every_step(
    steps: int, autocommit: bool, postgres_server: Server, name: str
) -> None:
    """A canceller runs `steps` checkpoints, then cancels a one-shot call: whatever it
    was doing, nothing leaks and the connection comes back as lent."""
    async with contract_pool(
        ConnectionPool,
        postgres_server,
        name,
        min_size=1,
        kwargs={"autocommit": autocommit},
    ) as pool:
        await pool.wait(5)
        with trio.CancelScope() as scope:

            async def cancel_later() -> None:  # noqa: ASYNC910  # steps may be 0: cancel at once
                for _ in range(steps):
                    await trio.lowlevel.checkpoint()
                scope.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_later)
                await pool.fetch("SELECT generate_series(1, 3)")
        async with pool.connection() as conn:
            assert conn.autocommit is autocommit
            cur = await conn.execute("SELECT 1")
            assert await cur.fetchone() == (1,)


async def test_a_return_with_a_statement_queued_goes_through_the_scheduler(
    postgres_server: Server, name: str
) -> None:
    """The hand-off bypass is only for borrowers: a return while a statement waits (here
    behind a borrower) is a message, so that what the scheduler sends is flushed in its
    turn; the borrower is served first, then the statement."""
    async with contract_pool(ConnectionPool, postgres_server, name, min_size=1, max_size=1) as pool:
        conn = await pool.getconn()
        order: list[str] = []

        async def borrower() -> None:
            async with pool.connection() as c:
                order.append("borrower")
                await c.execute("SELECT 1")

        async def statement() -> None:
            assert await pool.fetchval("SELECT 2") == 2
            order.append("statement")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(borrower)
            await wait_queued(pool, 1)
            nursery.start_soon(statement)
            await wait_queued(pool, 2)
            await pool.putconn(conn)
            assert pool._scheduler.pending == 1  # a Release message
        assert order == ["borrower", "statement"]
