"""Hostile tests: the one-shot calls (``fetch``, ``fetchrow``, ``fetchval``, ``execute``,
``executemany``) given statements they were not written for.

Statements that return no rows, statements that leave a transaction open or the
connection busy, bad parameters, huge results, closed pools, every pool option.
Whatever the statement, the caller learns the truth (no error for a statement
that succeeded and was committed, the server's own error otherwise), nothing
stays open, and the next client gets a connection as the pool configures it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import psycopg
import pytest
import trio
import trio.testing
from _hostile_helpers import WITHIN, PoolClass, both_classes, min_for, real_pool, rows_in
from _hostile_helpers import name as name
from _hostile_helpers import table as table
from _pool_checks import Server

from triopool import ConnectionPool, PoolClosed


@pytest.fixture(params=[False, True], ids=["tx", "autocommit"])
def autocommit(request: pytest.FixtureRequest) -> bool:
    value: bool = request.param
    return value


# -- statements that return no rows ------------------------------------------------------


async def test_row_calls_on_a_statement_without_rows(
    postgres_server: Server, name: str, table: str, autocommit: bool
) -> None:
    """``fetch``/``fetchrow``/``fetchval`` of an INSERT without RETURNING: the
    insert is committed, so the call succeeds (``[]``, ``None``, ``None``, as
    asyncpg's); it used to raise `ProgrammingError` ("the last operation didn't
    produce records") for a statement that had been committed."""
    async with real_pool(
        postgres_server, name, min_size=1, max_size=1, kwargs={"autocommit": autocommit}
    ) as pool:
        assert await pool.fetch(f"INSERT INTO {table} VALUES (1)") == []
        assert await pool.fetchrow(f"INSERT INTO {table} VALUES (2)") is None
        assert await pool.fetchval(f"INSERT INTO {table} VALUES (3)") is None
        assert await pool.fetch(f"CREATE INDEX ON {table} (x)") == []
        assert await pool.fetch("") == []  # an empty query
        assert await pool.fetchval("SELECT") is None  # a row of no column
        assert await pool.fetchrow("SELECT") == ()
        assert await rows_in(postgres_server, table) == [1, 2, 3]


# -- statements that leave a transaction open ----------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "BEGIN",
        "BEGIN; INSERT INTO {table} VALUES (1)",
        "  /* a comment /* nested */ */ -- and another\n begin work",
        "start transaction isolation level serializable",
    ],
)
async def test_statement_opening_a_transaction(
    postgres_server: Server, name: str, table: str, autocommit: bool, statement: str
) -> None:
    """A one-shot statement that would open a transaction (a BEGIN, however
    written) is refused before it is sent (`ProgrammingError`): a one-shot
    statement is a transaction of its own.  Nothing is committed, and the
    connection serves on as the pool configures it.  (It used to go back in
    autocommit mode on a pool without autocommit: the next client's rolled-back
    block was committed.)"""
    async with real_pool(
        postgres_server, name, min_size=1, max_size=1, kwargs={"autocommit": autocommit}
    ) as pool:
        with pytest.raises(psycopg.ProgrammingError, match="cannot open one"):
            await pool.execute(statement.format(table=table))
        assert await rows_in(postgres_server, table) == []
        with pytest.raises(psycopg.errors.DivisionByZero):
            async with pool.connection() as conn:
                assert conn.autocommit is autocommit
                assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
                await conn.execute(f"INSERT INTO {table} VALUES (2)")
                await conn.execute("SELECT 1 / 0")
        assert await rows_in(postgres_server, table) == ([2] if autocommit else [])
        assert await pool.fetchval("SELECT 5") == 5


# -- statements that leave the connection busy ---------------------------------------------


@pytest.mark.parametrize("statement", ["COPY {table} TO STDOUT", " copy {table} FROM STDIN"])
async def test_copy_through_a_one_shot_call(
    postgres_server: Server, name: str, table: str, autocommit: bool, statement: str
) -> None:
    """COPY needs ``cursor.copy()``: the statement is refused before it is sent
    (in a pipeline, libpq would stay in the COPY state for good), and the same
    backend serves on."""
    async with real_pool(
        postgres_server, name, min_size=1, max_size=1, kwargs={"autocommit": autocommit}
    ) as pool:
        pid = await pool.fetchval("SELECT pg_backend_pid()")
        with pytest.raises(psycopg.ProgrammingError, match="COPY cannot be used"):
            await pool.fetch(statement.format(table=table))
        with trio.fail_after(WITHIN):
            assert await pool.fetchval("SELECT pg_backend_pid()") == pid


# -- errors reach their caller, and only the connection's state decides its fate ------------


async def test_bad_sql_and_parameters_keep_the_connection(
    postgres_server: Server, name: str, autocommit: bool
) -> None:
    """Wrong parameter counts and types, a bad statement, a failing generator of
    parameters: each raises to its caller; the same backend serves on, idle."""
    async with real_pool(
        postgres_server, name, min_size=1, max_size=1, kwargs={"autocommit": autocommit}
    ) as pool:
        pid = await pool.fetchval("SELECT pg_backend_pid()")
        with pytest.raises(psycopg.ProgrammingError, match="placeholders"):
            await pool.execute("SELECT %s", [1, 2])
        with pytest.raises(psycopg.ProgrammingError, match="placeholders"):
            await pool.fetch("SELECT %s, %s", [1])
        with pytest.raises(TypeError):
            await pool.fetch("SELECT %s", 1)  # type: ignore[arg-type]  # a hostile caller
        with pytest.raises(psycopg.errors.SyntaxError):
            await pool.fetch("SELEKT 1")
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            await pool.fetchval("SELECT %s::int", ["x"])

        def failing() -> Iterator[tuple[int]]:
            yield (1,)
            raise ValueError("the parameters' own error")

        with pytest.raises(ValueError, match="own error"):
            await pool.executemany("SELECT %s", failing())
        assert await pool.executemany("SELECT %s", []) == 0
        assert await pool.fetchval("SELECT pg_backend_pid()") == pid
        assert pool.get_stats()["returns_bad"] == 0


async def test_huge_result(postgres_server: Server, name: str) -> None:
    """200,000 rows come back whole; the connection goes back idle and serves on."""
    async with real_pool(postgres_server, name, min_size=1, max_size=1) as pool:
        rows = await pool.fetch("SELECT g, repeat('x', 20) FROM generate_series(1, 200000) g")
        assert len(rows) == 200_000
        assert rows[-1] == (200_000, "x" * 20)
        assert await pool.fetchval("SELECT count(*) FROM generate_series(1, 10)") == 10


# -- closed pools, and every pool option ------------------------------------------------------


@both_classes
async def test_one_shot_calls_on_pools_not_open_or_closed(
    postgres_server: Server, name: str, pool_class: PoolClass
) -> None:
    """Before opening and after closing, each call is a `PoolClosed`, at once."""
    pool = pool_class(postgres_server.dsn, min_size=min_for(pool_class, 1), max_size=1)
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: pool.fetch("SELECT 1"),
        lambda: pool.fetchrow("SELECT 1"),
        lambda: pool.fetchval("SELECT 1"),
        lambda: pool.execute("SELECT 1"),
        lambda: pool.executemany("SELECT %s", [(1,)]),
    ]
    for call in calls:
        with pytest.raises(PoolClosed):
            await call()
    async with real_pool(
        postgres_server, name, pool_class, min_size=min_for(pool_class, 1), max_size=1
    ) as opened:
        await opened.close()
        calls = [
            lambda: opened.fetch("SELECT 1"),
            lambda: opened.fetchval("SELECT 1"),
            lambda: opened.execute("SELECT 1"),
            lambda: opened.executemany("SELECT %s", [(1,)]),
        ]
        for call in calls:
            with trio.fail_after(1.0), pytest.raises(PoolClosed):
                await call()


@both_classes
async def test_one_shot_calls_with_every_option(
    postgres_server: Server, name: str, table: str, pool_class: PoolClass
) -> None:
    """``check``, ``reset``, ``configure``, ``close_returns``, ``max_waiting``,
    ``leak_timeout``, a row factory: the calls' results and transactions are the
    same, and each connection goes back clean."""
    resets = 0

    async def reset(conn: Any) -> None:
        nonlocal resets
        resets += 1
        await conn.execute("DISCARD TEMP")
        await conn.commit()

    async def configure(conn: Any) -> None:
        await conn.execute("SET application_name TO DEFAULT")
        await conn.execute(f"SET application_name = '{name}'")
        await conn.commit()

    async with real_pool(
        postgres_server,
        name,
        pool_class,
        min_size=min_for(pool_class, 1),
        max_size=2,
        check=ConnectionPool.check_connection,
        reset=reset,
        configure=configure,
        close_returns=True,
        max_waiting=4,
        leak_timeout=60.0,
        kwargs={"row_factory": psycopg.rows.dict_row},
    ) as pool:
        async with trio.open_nursery() as nursery:
            for value in range(4):
                nursery.start_soon(pool.execute, f"INSERT INTO {table} VALUES (%s)", [value])
        assert await pool.fetch(f"SELECT x FROM {table} ORDER BY x") == [{"x": v} for v in range(4)]
        assert await pool.fetchrow("SELECT 1 AS one") == {"one": 1}
        assert await pool.fetchval("SELECT 2 AS two") == 2
        assert await pool.executemany(f"DELETE FROM {table} WHERE x = %s", [(0,), (1,)]) == 2
        assert await rows_in(postgres_server, table) == [2, 3]
        await trio.testing.wait_all_tasks_blocked()
        assert pool.get_stats()["returns_bad"] == 0
        assert resets == 0
