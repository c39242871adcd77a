"""``triopool.Connection``: psycopg's AsyncConnection API, against a real server, under trio."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
import trio
import trio.testing
from _connection_helpers import (
    PostgresServer,
    agen,
    assert_usable_idle,
    connect,
    tx_status,
    wait_backends_gone,
)
from psycopg import errors as e
from psycopg import sql
from psycopg.pq import PipelineStatus, TransactionStatus
from psycopg.rows import class_row, dict_row

import triopool

Conn = triopool.Connection[Any]


@pytest.fixture
async def table(admin: Conn) -> AsyncIterator[sql.Identifier]:
    """A fresh (non-temporary) table ``(id int primary key, data text)``, dropped afterwards."""
    name = sql.Identifier(f"tp_conn_{uuid.uuid4().hex[:12]}")
    await admin.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, data text)").format(name))
    try:
        yield name
    finally:
        with trio.move_on_after(5, shield=True):
            await admin.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(name))


async def ids_in(conn: Conn, table: sql.Identifier) -> list[int]:
    cur = await conn.execute(sql.SQL("SELECT id FROM {} ORDER BY id").format(table))
    return [row[0] for row in await cur.fetchall()]


# --- execute and cursors ----------------------------------------------------------------------


async def test_execute_positional_params(conn: Conn) -> None:
    cur = await conn.execute("SELECT %s::int + 1, %s::text || '!', %s", [41, "hi", None])
    assert await cur.fetchone() == (42, "hi!", None)
    assert conn.info.transaction_status == TransactionStatus.INTRANS


async def test_execute_named_params(conn: Conn) -> None:
    cur = await conn.execute("SELECT %(a)s::int * %(b)s::int, %(a)s::int", {"a": 6, "b": 7})
    assert await cur.fetchone() == (42, 6)


async def test_execute_binary_params(conn: Conn) -> None:
    cur = await conn.execute("SELECT %b::bytea, %t::int", [b"\x00\xff", 5], binary=True)
    assert await cur.fetchone() == (b"\x00\xff", 5)


async def test_execute_error_then_usable(aconn: Conn) -> None:
    with pytest.raises(e.DivisionByZero):
        await aconn.execute("SELECT 1 / 0")
    assert_usable_idle(aconn)
    cur = await aconn.execute("SELECT 'still fine'")
    assert await cur.fetchone() == ("still fine",)


async def test_executemany(aconn: Conn, table: sql.Identifier) -> None:
    cur = aconn.cursor()
    await cur.executemany(
        sql.SQL("INSERT INTO {} (id, data) VALUES (%s, %s)").format(table),
        [(i, f"row {i}") for i in range(1, 101)],
    )
    cur = await aconn.execute(sql.SQL("SELECT count(*), sum(id), max(data) FROM {}").format(table))
    assert await cur.fetchone() == (100, 5050, "row 99")


async def test_executemany_returning(aconn: Conn, table: sql.Identifier) -> None:
    cur = aconn.cursor()
    await cur.executemany(
        sql.SQL("INSERT INTO {} (id) VALUES (%s) RETURNING id * 10").format(table),
        [(i,) for i in range(1, 6)],
        returning=True,
    )
    got = []
    for _ in range(5):
        got.append(await cur.fetchone())
        cur.nextset()
    assert got == [(10,), (20,), (30,), (40,), (50,)]


async def test_client_cursor_fetchone_fetchmany_fetchall(conn: Conn) -> None:
    async with conn.cursor() as cur:
        await cur.execute("SELECT generate_series(1, 10)")
        assert cur.rowcount == 10
        assert await cur.fetchone() == (1,)
        assert await cur.fetchmany(3) == [(2,), (3,), (4,)]
        assert await cur.fetchall() == [(i,) for i in range(5, 11)]
        assert await cur.fetchone() is None
        assert await cur.fetchmany(2) == []
    assert cur.closed


async def test_client_cursor_async_iteration(conn: Conn) -> None:
    cur = await conn.execute("SELECT generate_series(1, 5)")
    assert [row async for row in cur] == [(i,) for i in range(1, 6)]


async def test_cursor_stream(aconn: Conn) -> None:
    cur = aconn.cursor()
    total = count = 0
    async with aclosing(agen(cur.stream("SELECT generate_series(1, 1000)"))) as rows:
        async for (value,) in rows:
            total += value
            count += 1
    assert (count, total) == (1000, 500500)
    assert_usable_idle(aconn)


async def test_cursor_stream_break_cancels_rest(aconn: Conn) -> None:
    # Five 10 kB rows (big enough to be flushed to us at once), then a 30 s sleep. Leaving the
    # stream early must cancel the rest on the server (psycopg calls cancel_safe()), not wait.
    query = (
        "SELECT repeat('x', 10000) FROM generate_series(1, 5) UNION ALL SELECT pg_sleep(30)::text"
    )
    cur = aconn.cursor()
    t0 = trio.current_time()
    seen = 0
    async with aclosing(agen(cur.stream(query))) as rows:
        async for _ in rows:
            seen += 1
            if seen == 3:
                break
    assert trio.current_time() - t0 < 3.0
    assert seen == 3
    assert_usable_idle(aconn)
    cur2 = await aconn.execute("SELECT 1")
    assert await cur2.fetchone() == (1,)


async def test_server_side_cursor(conn: Conn) -> None:
    async with conn.transaction():
        async with conn.cursor("tp_named_cursor") as cur:
            cur.itersize = 7
            await cur.execute("SELECT generate_series(1, 100) AS n")
            # The cursor lives on the server.
            check = await conn.execute("SELECT name FROM pg_cursors")
            assert ("tp_named_cursor",) in await check.fetchall()
            assert await cur.fetchone() == (1,)
            assert await cur.fetchmany(10) == [(i,) for i in range(2, 12)]
            rest = [row[0] async for row in cur]  # fetched itersize rows at a time
            assert rest == list(range(12, 101))
            assert cur.description is not None
            assert cur.description[0].name == "n"
        check = await conn.execute("SELECT count(*) FROM pg_cursors")
        assert await check.fetchone() == (0,)
    assert_usable_idle(conn)


async def test_server_side_cursor_scroll_and_fetchall(conn: Conn) -> None:
    async with conn.transaction():
        cur = conn.cursor("tp_scroll", scrollable=True)
        await cur.execute("SELECT generate_series(1, 20)")
        await cur.scroll(15, mode="absolute")
        assert await cur.fetchall() == [(i,) for i in range(16, 21)]
        await cur.scroll(0, mode="absolute")
        assert await cur.fetchone() == (1,)
        await cur.scroll(2)
        assert await cur.fetchone() == (4,)
        await cur.close()


async def test_row_factory_dict_row(conn: Conn) -> None:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute("SELECT 1 AS a, 'x' AS b")
    assert await cur.fetchone() == {"a": 1, "b": "x"}
    conn.row_factory = dict_row
    cur2 = await conn.execute("SELECT 2 AS c")
    assert await cur2.fetchall() == [{"c": 2}]


@dataclass
class Person:
    id: int
    name: str


async def test_row_factory_class_row(conn: Conn) -> None:
    cur = conn.cursor(row_factory=class_row(Person))
    await cur.execute("SELECT * FROM (VALUES (1, 'ada'), (2, 'bob')) AS t (id, name) ORDER BY id")
    assert await cur.fetchall() == [Person(1, "ada"), Person(2, "bob")]


async def test_concurrent_tasks_share_connection(aconn: Conn) -> None:
    # The connection lock is contended: every task gets its own, correct result.
    results: dict[int, Any] = {}

    async def query(i: int) -> None:
        cur = await aconn.execute("SELECT %s::int * 2, pg_sleep(0.005)", [i])
        results[i] = await cur.fetchone()

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(query, i)
    assert {i: row[0] for i, row in results.items()} == {i: i * 2 for i in range(20)}
    assert_usable_idle(aconn)


# --- transactions -----------------------------------------------------------------------------


async def test_transaction_commit(conn: Conn, admin: Conn, table: sql.Identifier) -> None:
    async with conn.transaction() as tx:
        assert tx.connection is conn
        await conn.execute(sql.SQL("INSERT INTO {} (id) VALUES (1), (2)").format(table))
        assert await ids_in(admin, table) == []  # not visible before commit
    assert conn.info.transaction_status == TransactionStatus.IDLE
    assert await ids_in(admin, table) == [1, 2]


async def test_transaction_rollback_on_exception(
    conn: Conn, admin: Conn, table: sql.Identifier
) -> None:
    async def failing_block() -> None:
        async with conn.transaction():
            await conn.execute(sql.SQL("INSERT INTO {} (id) VALUES (1)").format(table))
            1 / 0  # noqa: B018

    with pytest.raises(ZeroDivisionError):
        await failing_block()
    assert_usable_idle(conn)
    assert await ids_in(admin, table) == []
    assert await ids_in(conn, table) == []


async def test_transaction_rollback_on_sql_error(conn: Conn, table: sql.Identifier) -> None:
    with pytest.raises(e.UniqueViolation):
        async with conn.transaction():
            await conn.execute(sql.SQL("INSERT INTO {} (id) VALUES (1), (1)").format(table))
    assert_usable_idle(conn)


async def test_nested_savepoint_rollback_outer_commit(
    conn: Conn, admin: Conn, table: sql.Identifier
) -> None:
    insert = sql.SQL("INSERT INTO {} (id) VALUES (%s)").format(table)

    async def failing_savepoint() -> None:
        async with conn.transaction() as inner:
            assert inner.savepoint_name is not None
            await conn.execute(insert, [2])
            raise ValueError("inner")

    async with conn.transaction():
        await conn.execute(insert, [1])
        with pytest.raises(ValueError, match="inner"):
            await failing_savepoint()
        async with conn.transaction("explicit_sp"):
            await conn.execute(insert, [3])
            async with conn.transaction(force_rollback=True):
                await conn.execute(insert, [4])
        await conn.execute(insert, [5])
        assert await ids_in(conn, table) == [1, 3, 5]
    assert await ids_in(admin, table) == [1, 3, 5]


async def test_transaction_rollback_exception(conn: Conn, table: sql.Identifier) -> None:
    # psycopg.Rollback leaves the block quietly, rolled back.
    async with conn.transaction():
        await conn.execute(sql.SQL("INSERT INTO {} (id) VALUES (1)").format(table))
        raise psycopg.Rollback()
    assert await ids_in(conn, table) == []


async def test_commit_and_rollback_methods(conn: Conn, admin: Conn, table: sql.Identifier) -> None:
    insert = sql.SQL("INSERT INTO {} (id) VALUES (%s)").format(table)
    await conn.execute(insert, [1])
    assert conn.info.transaction_status == TransactionStatus.INTRANS
    await conn.rollback()
    assert tx_status(conn) == TransactionStatus.IDLE
    await conn.execute(insert, [2])
    await conn.commit()
    assert await ids_in(admin, table) == [2]


async def test_autocommit_on_off(conn: Conn, admin: Conn, table: sql.Identifier) -> None:
    insert = sql.SQL("INSERT INTO {} (id) VALUES (%s)").format(table)
    assert not conn.autocommit
    await conn.execute(insert, [1])
    assert conn.info.transaction_status == TransactionStatus.INTRANS
    with pytest.raises(psycopg.ProgrammingError):
        await conn.set_autocommit(True)  # not allowed inside a transaction
    await conn.rollback()

    await conn.set_autocommit(True)
    assert conn.autocommit
    await conn.execute(insert, [2])
    assert tx_status(conn) == TransactionStatus.IDLE
    assert await ids_in(admin, table) == [2]  # committed at once

    await conn.set_autocommit(False)
    assert not conn.autocommit
    await conn.execute(insert, [3])
    assert tx_status(conn) == TransactionStatus.INTRANS
    assert await ids_in(admin, table) == [2]
    await conn.commit()
    assert await ids_in(admin, table) == [2, 3]


async def test_async_attribute_setters(conn: Conn) -> None:
    await conn.set_read_only(True)
    await conn.set_isolation_level(psycopg.IsolationLevel.SERIALIZABLE)
    cur = await conn.execute("SHOW transaction_read_only")
    assert await cur.fetchone() == ("on",)
    cur = await conn.execute("SHOW transaction_isolation")
    assert await cur.fetchone() == ("serializable",)


# --- pipeline ---------------------------------------------------------------------------------


async def test_pipeline(aconn: Conn, table: sql.Identifier) -> None:
    insert = sql.SQL("INSERT INTO {} (id, data) VALUES (%s, %s)").format(table)
    async with aconn.pipeline() as pipeline:
        assert aconn.info.pipeline_status == PipelineStatus.ON
        c1 = await aconn.execute("SELECT 1")
        c2 = await aconn.execute("SELECT %s::text", ["two"])
        await aconn.execute(insert, [1, "a"])
        await aconn.execute(insert, [2, "b"])
        c3 = await aconn.execute(sql.SQL("SELECT count(*) FROM {}").format(table))
        await pipeline.sync()
        assert await c1.fetchone() == (1,)
        assert await c2.fetchone() == ("two",)
        assert await c3.fetchone() == (2,)
    assert aconn.info.pipeline_status == PipelineStatus.OFF  # type: ignore[comparison-overlap]
    assert_usable_idle(aconn)


async def test_pipeline_error_aborts_rest(aconn: Conn) -> None:
    async def failing_pipeline() -> None:
        async with aconn.pipeline():
            await aconn.execute("SELECT 1")
            await aconn.execute("SELECT 1 / 0")
            await aconn.execute("SELECT 2")

    with pytest.raises(e.DivisionByZero):
        await failing_pipeline()
    assert_usable_idle(aconn)
    cur = await aconn.execute("SELECT 3")
    assert await cur.fetchone() == (3,)


# --- copy -------------------------------------------------------------------------------------


async def test_copy_from_server_read_row(conn: Conn) -> None:
    cur = conn.cursor()
    rows = []
    async with cur.copy(
        "COPY (SELECT i, 'v' || i, i % 2 = 0 FROM generate_series(1, 500) i)"
        " TO STDOUT (FORMAT BINARY)"
    ) as copy:
        copy.set_types(["int4", "text", "bool"])
        while (row := await copy.read_row()) is not None:
            rows.append(row)
    assert rows == [(i, f"v{i}", i % 2 == 0) for i in range(1, 501)]
    cur2 = await conn.execute("SELECT 1")
    assert await cur2.fetchone() == (1,)


async def test_copy_from_server_rows(conn: Conn) -> None:
    cur = conn.cursor()
    async with cur.copy("COPY (SELECT i, i * i FROM generate_series(1, 50) i) TO STDOUT") as copy:
        copy.set_types(["int8", "int8"])
        rows = [row async for row in copy.rows()]
    assert rows == [(i, i * i) for i in range(1, 51)]


async def test_copy_from_server_blocks(conn: Conn) -> None:
    cur = conn.cursor()
    blocks: list[bytes] = []
    async with cur.copy(
        "COPY (SELECT i, repeat('z', 100) FROM generate_series(1, 2000) i) TO STDOUT"
    ) as copy:
        async for block in copy:
            blocks.append(bytes(block))
    expected = b"".join(b"%d\t%s\n" % (i, b"z" * 100) for i in range(1, 2001))
    assert b"".join(blocks) == expected
    assert len(blocks) > 1


async def test_copy_to_server_write_row(conn: Conn, admin: Conn, table: sql.Identifier) -> None:
    cur = conn.cursor()
    async with cur.copy(sql.SQL("COPY {} (id, data) FROM STDIN").format(table)) as copy:
        for i in range(1, 1001):
            await copy.write_row((i, f"tab\there {i}" if i % 100 == 0 else f"d{i}"))
    await conn.commit()
    check = await admin.execute(
        sql.SQL("SELECT count(*), sum(id), max(data) FILTER (WHERE id = 100) FROM {}").format(table)
    )
    assert await check.fetchone() == (1000, 500500, "tab\there 100")


async def test_copy_to_server_write_bytes(conn: Conn, admin: Conn, table: sql.Identifier) -> None:
    cur = conn.cursor()
    async with cur.copy(sql.SQL("COPY {} (id, data) FROM STDIN").format(table)) as copy:
        await copy.write(b"1\tfoo\n2\tbar\n")
        await copy.write(b"3\t\\N\n")
    await conn.commit()
    check = await admin.execute(sql.SQL("SELECT id, data FROM {} ORDER BY id").format(table))
    assert await check.fetchall() == [(1, "foo"), (2, "bar"), (3, None)]


async def test_copy_to_server_error_rolls_back(
    conn: Conn, admin: Conn, table: sql.Identifier
) -> None:
    cur = conn.cursor()

    async def failing_copy() -> None:
        async with cur.copy(sql.SQL("COPY {} (id) FROM STDIN").format(table)) as copy:
            await copy.write_row((1,))
            raise RuntimeError("client side failure")

    with pytest.raises(RuntimeError):
        await failing_copy()
    assert tx_status(conn) == TransactionStatus.INERROR
    await conn.rollback()
    assert await ids_in(admin, table) == []


# --- notifications ----------------------------------------------------------------------------


async def test_notifies_from_other_connection(aconn: Conn, admin: Conn) -> None:
    await aconn.execute("LISTEN tp_chan")
    received: list[psycopg.Notify] = []

    async def listen() -> None:
        async with aclosing(aconn.notifies(timeout=10, stop_after=2)) as gen:
            async for n in gen:
                received.append(n)

    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(listen)
        await trio.testing.wait_all_tasks_blocked()  # the listener waits on the socket
        assert received == []
        await admin.execute("NOTIFY tp_chan, 'x'")
        await admin.execute("SELECT pg_notify('tp_chan', 'y')")
    assert trio.current_time() - t0 < 5  # stop_after ended it, not the timeout
    pid = admin.info.backend_pid
    assert [(n.channel, n.payload, n.pid) for n in received] == [
        ("tp_chan", "x", pid),
        ("tp_chan", "y", pid),
    ]
    assert_usable_idle(aconn)


async def test_notifies_timeout(aconn: Conn) -> None:
    await aconn.execute("LISTEN tp_quiet")
    t0 = trio.current_time()
    got = [n async for n in aconn.notifies(timeout=0.3)]
    elapsed = trio.current_time() - t0
    assert got == []
    assert 0.25 <= elapsed < 1.5, elapsed
    assert_usable_idle(aconn)


async def test_notifies_stop_after(aconn: Conn, admin: Conn) -> None:
    await aconn.execute("LISTEN tp_many")
    # Sent one at a time, each in its own transaction: they arrive separately.
    for payload in ("1", "2", "3"):
        await admin.execute("SELECT pg_notify('tp_many', %s)", [payload])
    t0 = trio.current_time()
    got = [n.payload async for n in aconn.notifies(timeout=10, stop_after=2)]
    assert trio.current_time() - t0 < 5
    # "You might actually receive more if more than one arrive in the same packet."
    assert got[:2] == ["1", "2"]
    assert len(got) in (2, 3)
    rest = [n.payload async for n in aconn.notifies(timeout=0.2)]
    assert got + rest == ["1", "2", "3"]


async def test_notifies_received_between_calls_are_kept(aconn: Conn, admin: Conn) -> None:
    await aconn.execute("LISTEN tp_backlog")
    await admin.execute("NOTIFY tp_backlog, 'early'")
    await aconn.execute("SELECT 1")  # the notification arrives with this result
    got = [n.payload async for n in aconn.notifies(timeout=1, stop_after=1)]
    assert got == ["early"]


# --- prepared statements ----------------------------------------------------------------------


async def prepared_statements(conn: Conn) -> list[str]:
    cur = await conn.execute("SELECT statement FROM pg_prepared_statements", prepare=False)
    return [row[0] for row in await cur.fetchall()]


async def test_prepare_true(aconn: Conn) -> None:
    query = "SELECT %s::int + 100 AS tp_prepare_true"
    assert not any("tp_prepare_true" in s for s in await prepared_statements(aconn))
    cur = await aconn.execute(query, [1], prepare=True)
    assert await cur.fetchone() == (101,)
    statements = await prepared_statements(aconn)
    assert any("tp_prepare_true" in s for s in statements), statements
    cur = await aconn.execute(query, [2], prepare=True)
    assert await cur.fetchone() == (102,)


async def test_prepare_threshold(aconn: Conn) -> None:
    aconn.prepare_threshold = 2
    query = "SELECT %s::int AS tp_threshold"
    for i in range(2):
        cur = await aconn.execute(query, [i])
        assert await cur.fetchone() == (i,)
        assert not any("tp_threshold" in s for s in await prepared_statements(aconn))
    cur = await aconn.execute(query, [7])
    assert await cur.fetchone() == (7,)
    assert any("tp_threshold" in s for s in await prepared_statements(aconn))


async def test_prepare_disabled(aconn: Conn) -> None:
    aconn.prepare_threshold = None
    for i in range(6):
        await aconn.execute("SELECT %s::int AS tp_never_prepared", [i])
    assert not any("tp_never_prepared" in s for s in await prepared_statements(aconn))


# --- close, context manager, broken connection ------------------------------------------------


async def test_close(postgres_server: PostgresServer, postgres_dsn: str, app_name: str) -> None:
    conn = await connect(postgres_dsn, app_name)
    assert await trio.to_thread.run_sync(postgres_server.count_backends, app_name) == 1
    await conn.close()
    assert conn.closed
    assert not conn.broken
    await conn.close()  # idempotent
    with pytest.raises(psycopg.OperationalError, match="closed"):
        await conn.execute("SELECT 1")
    assert await wait_backends_gone(postgres_server, app_name) == 0


async def test_async_with_commits_and_closes(
    postgres_dsn: str, app_name: str, admin: Conn, table: sql.Identifier
) -> None:
    async with await connect(postgres_dsn, app_name) as conn:
        await conn.execute(sql.SQL("INSERT INTO {} (id) VALUES (1)").format(table))
    assert conn.closed
    assert await ids_in(admin, table) == [1]


async def test_async_with_rolls_back_on_error(
    postgres_dsn: str, app_name: str, admin: Conn, table: sql.Identifier
) -> None:
    conn = await connect(postgres_dsn, app_name)

    async def failing_block() -> None:
        async with conn:
            await conn.execute(sql.SQL("INSERT INTO {} (id) VALUES (1)").format(table))
            raise KeyError("boom")

    with pytest.raises(KeyError):
        await failing_block()
    assert conn.closed
    assert await ids_in(admin, table) == []


async def test_broken_after_backend_terminated(aconn: Conn, admin: Conn) -> None:
    pid = aconn.info.backend_pid
    cur = await admin.execute("SELECT pg_terminate_backend(%s, 5000)", [pid])
    assert await cur.fetchone() == (True,)
    with pytest.raises(psycopg.OperationalError):
        await aconn.execute("SELECT 1")
    assert aconn.broken
    assert aconn.closed
    with pytest.raises(psycopg.OperationalError):
        await aconn.execute("SELECT 1")


async def test_info(aconn: Conn, admin: Conn, app_name: str) -> None:
    cur = await admin.execute(
        "SELECT application_name FROM pg_stat_activity WHERE pid = %s",
        [aconn.info.backend_pid],
    )
    assert await cur.fetchone() == (app_name,)
    assert aconn.info.server_version >= 120000
    assert aconn.info.encoding == "utf-8"
