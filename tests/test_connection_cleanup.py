"""Issue 15: cleanup under cancellation, and the waits around it (one regression test per bug).

Every test ends with the connection either closed or fully usable and correct: IDLE, psycopg's
transaction and pipeline bookkeeping consistent (a fresh ``transaction()`` commits visibly from
another connection), prepared statements working. Cancels are ordered with events,
``wait_all_tasks_blocked`` and the server's own view (``pg_stat_activity``), never with sleeps.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import psycopg
import pytest
import trio
import trio.testing
from _connection_helpers import (
    agen,
    assert_usable_idle,
    connect,
    tx_status,
    wait_until_active,
)
from psycopg import errors as e
from psycopg import sql
from psycopg.pq import PipelineStatus, TransactionStatus

import triopool

Conn = triopool.Connection[Any]

# Rows that arrive at once, then a result that never comes in time (see test_connection_cancel).
ROWS_THEN_SLEEP = (
    "SELECT repeat('x', 10000) FROM generate_series(1, 5) UNION ALL SELECT pg_sleep(30)::text"
)
# The same shape for COPY TO STDOUT.
COPY_ROWS_THEN_SLEEP = f"COPY ({ROWS_THEN_SLEEP}) TO STDOUT"
# Bigger than every socket buffer between client and server on loopback: sending it blocks
# for as long as the server does not read.
BIG = "x" * (32 * 1024 * 1024)


@pytest.fixture
async def table(admin: Conn) -> AsyncIterator[sql.Identifier]:
    """A fresh table ``(id int)``, dropped afterwards."""
    name = sql.Identifier(f"tp_cleanup_{uuid.uuid4().hex[:12]}")
    await admin.execute(sql.SQL("CREATE TABLE {} (id int)").format(name))
    try:
        yield name
    finally:
        with trio.move_on_after(5, shield=True):
            await admin.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(name))


async def ids_in(conn: Conn, table: sql.Identifier) -> list[int]:
    cur = await conn.execute(sql.SQL("SELECT id FROM {} ORDER BY id").format(table))
    return [row[0] for row in await cur.fetchall()]


async def assert_commits_visibly(
    conn: Conn, admin: Conn, table: sql.Identifier, value: int
) -> None:
    """A fresh ``transaction()`` on `conn` commits: `admin` sees its row at once."""
    async with conn.transaction():
        await conn.execute(sql.SQL("INSERT INTO {} VALUES (%s)").format(table), [value])
    assert value in await ids_in(admin, table)
    assert_usable_idle(conn)


# --- bug 13: no ExceptionGroup out of the read-or-write wait ----------------------------------


async def start_blocked_send(conn: Conn) -> None:
    """Leave `conn` in the read-or-write wait: the server sleeps, our send does not fit."""
    await conn.execute("SELECT pg_sleep(3)")
    await conn.execute("SELECT length(%s)", [BIG])


async def test_close_from_other_task_in_read_or_write_wait(aconn: Conn) -> None:
    async def send() -> None:
        # psycopg's documented error, not ExceptionGroup([ClosedResourceError] * 2).
        with pytest.raises(psycopg.OperationalError):
            async with aconn.pipeline():
                await start_blocked_send(aconn)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        await trio.testing.wait_all_tasks_blocked()
        await aconn.close()
    assert aconn.closed


async def test_cancel_in_read_or_write_wait(
    aconn: Conn, admin: Conn, table: sql.Identifier
) -> None:
    seen: list[BaseException] = []
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                async with aconn.pipeline():
                    try:
                        await start_blocked_send(aconn)
                    except BaseException as ex:
                        seen.append(ex)
                        raise

            nursery.start_soon(send)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
    assert scope.cancelled_caught
    assert [type(ex) for ex in seen] == [trio.Cancelled]
    assert_usable_idle(aconn)
    await assert_commits_visibly(aconn, admin, table, 1)


# --- bug 15: cleanup with a cancel pending ----------------------------------------------------


async def test_transaction_exit_with_cancel_pending_rolls_back(
    aconn: Conn, admin: Conn, table: sql.Identifier
) -> None:
    # The block ends normally, but a cancel arrived after its last checkpoint: the COMMIT is
    # not sent (Cancelled means "did not happen"), the transaction is rolled back.
    insert = sql.SQL("INSERT INTO {} VALUES (%s)").format(table)
    with trio.CancelScope() as scope:
        async with aconn.transaction():
            await aconn.execute(insert, [1])
            scope.cancel()
    assert scope.cancelled_caught
    assert_usable_idle(aconn)
    assert await ids_in(admin, table) == []
    # psycopg's bookkeeping is back to "no transaction": this one is a real transaction.
    await assert_commits_visibly(aconn, admin, table, 2)
    await aconn.execute(insert, [3])  # autocommit again
    assert await ids_in(admin, table) == [2, 3]


async def test_nested_transaction_exit_with_cancel_pending(
    conn: Conn, admin: Conn, table: sql.Identifier
) -> None:
    insert = sql.SQL("INSERT INTO {} VALUES (%s)").format(table)
    with trio.CancelScope() as scope:
        async with conn.transaction():
            await conn.execute(insert, [1])
            async with conn.transaction():
                await conn.execute(insert, [2])
                scope.cancel()
    assert scope.cancelled_caught
    assert_usable_idle(conn)
    await conn.commit()  # no transaction block left open in psycopg's eyes
    assert await ids_in(admin, table) == []
    await assert_commits_visibly(conn, admin, table, 3)


async def test_async_with_connection_closes_with_cancel_pending(
    postgres_dsn: str, app_name: str, admin: Conn, table: sql.Identifier
) -> None:
    conn = await connect(postgres_dsn, app_name)
    with trio.CancelScope() as scope:
        async with conn:
            await conn.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(table))
            scope.cancel()
    assert scope.cancelled_caught
    assert conn.closed
    assert await ids_in(admin, table) == []


async def test_async_with_connection_closes_when_commit_fails(
    postgres_dsn: str, app_name: str
) -> None:
    # Sibling: psycopg's __aexit__ skips close() when COMMIT raises (here a deferred
    # constraint checked at COMMIT): the connection must be closed all the same.
    conn = await connect(postgres_dsn, app_name)
    with pytest.raises(e.UniqueViolation):
        async with conn:
            await conn.execute(
                "CREATE TEMP TABLE tp_deferred (id int UNIQUE DEFERRABLE INITIALLY DEFERRED)"
            )
            await conn.execute("INSERT INTO tp_deferred VALUES (1), (1)")
    assert conn.closed


async def test_server_cursor_close_with_cancel_pending(aconn: Conn) -> None:
    # A WITH HOLD cursor outlives its transaction: only CLOSE removes it.
    for _ in range(2):  # the second round would raise DuplicateCursor if the first leaked
        with trio.CancelScope() as scope:
            async with aconn.cursor("tp_held", withhold=True) as cur:
                await cur.execute("SELECT generate_series(1, 3)")
                assert await cur.fetchone() == (1,)
                scope.cancel()
        assert scope.cancelled_caught
        assert cur.closed
        assert_usable_idle(aconn)
        check = await aconn.execute("SELECT count(*) FROM pg_cursors")
        assert await check.fetchone() == (0,)


# --- bug 16: a cancel while the caller's own code runs, in stream() and COPY TO -----------------


async def test_cancel_in_caller_code_during_stream(aconn: Conn) -> None:
    t0 = trio.current_time()
    with trio.CancelScope() as scope:
        async with aclosing(agen(aconn.cursor().stream(ROWS_THEN_SLEEP))) as rows:
            async for _ in rows:
                scope.cancel()
                await trio.lowlevel.checkpoint()  # the caller's own code checkpoints
    assert scope.cancelled_caught
    assert trio.current_time() - t0 < 2.0
    assert_usable_idle(aconn)
    cur = await aconn.execute("SELECT 1")
    assert await cur.fetchone() == (1,)


async def test_cancel_in_caller_code_during_copy_out(aconn: Conn) -> None:
    t0 = trio.current_time()
    with trio.CancelScope() as scope:
        async with aconn.cursor().copy(COPY_ROWS_THEN_SLEEP) as copy:
            while await copy.read():
                scope.cancel()
                await trio.lowlevel.checkpoint()
    assert scope.cancelled_caught
    assert trio.current_time() - t0 < 2.0
    assert_usable_idle(aconn)
    cur = await aconn.execute("SELECT 1")
    assert await cur.fetchone() == (1,)


# --- bug 17: a cancel between writes of COPY FROM STDIN -------------------------------------


async def test_cancel_between_copy_in_writes(aconn: Conn, table: sql.Identifier) -> None:
    aconn.cancel_timeout = 2.0  # a stall would show as 2 s and a closed connection
    t0 = trio.current_time()
    with trio.CancelScope() as scope:
        async with aconn.cursor().copy(sql.SQL("COPY {} FROM STDIN").format(table)) as copy:
            await copy.write(b"1\n")
            scope.cancel()
            await copy.write(b"2\n")
    assert scope.cancelled_caught
    assert trio.current_time() - t0 < 1.0
    assert_usable_idle(aconn)
    assert await ids_in(aconn, table) == []


# --- bug 18: cancellation in pipeline mode ----------------------------------------------------


async def cancel_when_active(
    admin: Conn, pid: int, what: str, scope: trio.CancelScope, at: list[float]
) -> None:
    await wait_until_active(admin, pid, what)
    at.append(trio.current_time())
    scope.cancel()


async def test_cancel_pipeline_sync(aconn: Conn, admin: Conn, table: sql.Identifier) -> None:
    # The Sync is already sent when the cancel comes.
    aconn.cancel_timeout = 2.0
    at: list[float] = []
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                cancel_when_active, admin, aconn.info.backend_pid, "tp_sync", scope, at
            )
            async with aconn.pipeline() as pipeline:
                await aconn.execute("SELECT pg_sleep(30) AS tp_sync")
                await pipeline.sync()
    assert scope.cancelled_caught
    assert trio.current_time() - at[0] < 1.0
    assert_usable_idle(aconn)
    await assert_commits_visibly(aconn, admin, table, 1)


async def test_cancel_executemany(aconn: Conn, admin: Conn, table: sql.Identifier) -> None:
    aconn.cancel_timeout = 2.0
    at: list[float] = []
    insert = sql.SQL("INSERT INTO {} SELECT %s FROM pg_sleep(%s) AS tp_many").format(table)
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                cancel_when_active, admin, aconn.info.backend_pid, "tp_many", scope, at
            )
            await aconn.cursor().executemany(insert, [(1, 0), (2, 30), (3, 0)])
    assert scope.cancelled_caught
    assert trio.current_time() - at[0] < 1.0
    assert_usable_idle(aconn)
    # The statement cancelled aborted the rest; the first one was committed (autocommit).
    assert await ids_in(admin, table) in ([], [1])
    await assert_commits_visibly(aconn, admin, table, 4)


async def test_cancel_fetch_in_pipeline_without_sync(
    aconn: Conn, admin: Conn, table: sql.Identifier
) -> None:
    # No Sync sent: after the cancel the server skips everything until one comes. The
    # connection must not pretend to be idle while the server waits for it.
    at: list[float] = []
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                cancel_when_active, admin, aconn.info.backend_pid, "tp_nosync", scope, at
            )
            async with aconn.pipeline():
                cur = await aconn.execute("SELECT pg_sleep(30) AS tp_nosync")
                await cur.fetchone()
    assert scope.cancelled_caught
    assert aconn.info.pipeline_status == PipelineStatus.OFF
    assert_usable_idle(aconn)
    with trio.fail_after(3):
        cur = await aconn.execute("SELECT 1")
        assert await cur.fetchone() == (1,)
        cur = await aconn.execute("SELECT %s::int", [2])
        assert await cur.fetchone() == (2,)
        await assert_commits_visibly(aconn, admin, table, 1)


async def test_prepared_statements_after_cancelled_pipeline(aconn: Conn, admin: Conn) -> None:
    # The PREPARE queued behind the cancelled statement never ran: psycopg must not think
    # it did (InvalidSqlStatementName "_pg3_0" on the next use).
    query = "SELECT %s::int + 1000 AS tp_prep"
    at: list[float] = []
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                cancel_when_active, admin, aconn.info.backend_pid, "tp_prep_wait", scope, at
            )
            async with aconn.pipeline():
                await aconn.execute("SELECT pg_sleep(30) AS tp_prep_wait")
                cur = await aconn.execute(query, [1], prepare=True)
                await cur.fetchone()
    assert scope.cancelled_caught
    assert_usable_idle(aconn)
    with trio.fail_after(3):
        for value in (2, 3):
            cur = await aconn.execute(query, [value], prepare=True)
            assert await cur.fetchone() == (value + 1000,)
        async with aconn.pipeline():
            cur = await aconn.execute(query, [4], prepare=True)
            assert await cur.fetchone() == (1004,)


# --- bug 19: waiting for the connection lock is not part of cancel_timeout ---------------------


async def test_transaction_waits_for_lock_beyond_cancel_timeout(
    aconn: Conn, admin: Conn, table: sql.Identifier
) -> None:
    aconn.cancel_timeout = 0.5
    results: list[Any] = []

    async def long_query() -> None:
        cur = await aconn.execute("SELECT pg_sleep(1.5), 'tp_lock_holder'")
        results.append(await cur.fetchone())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(long_query)
        await wait_until_active(admin, aconn.info.backend_pid, "tp_lock_holder")
        async with aconn.transaction():
            await aconn.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(table))
    assert results == [("", "tp_lock_holder")]
    assert not aconn.closed
    assert await ids_in(admin, table) == [1]
    assert_usable_idle(aconn)


async def test_transaction_with_zero_cancel_timeout(
    conn: Conn, admin: Conn, table: sql.Identifier
) -> None:
    conn.cancel_timeout = 0
    async with conn.transaction():
        await conn.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(table))
    assert not conn.closed
    assert await ids_in(admin, table) == [1]
    async with conn.transaction(), conn.transaction():
        await conn.execute(sql.SQL("INSERT INTO {} VALUES (2)").format(table))
    assert await ids_in(admin, table) == [1, 2]
    assert tx_status(conn) == TransactionStatus.IDLE


async def test_cancel_while_waiting_for_lock_sends_nothing(
    aconn: Conn, admin: Conn, table: sql.Identifier
) -> None:
    # A transaction() cancelled while it waits for the lock: nothing happened, nothing closed.
    pid = aconn.info.backend_pid
    entered: list[bool] = []

    async def long_query() -> None:
        cur = await aconn.execute("SELECT pg_sleep(1), 'tp_holder2'")
        assert await cur.fetchone() == ("", "tp_holder2")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(long_query)
        await wait_until_active(admin, pid, "tp_holder2")
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as inner:

                async def enter() -> None:
                    async with aconn.transaction():
                        entered.append(True)

                inner.start_soon(enter)
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()
        assert scope.cancelled_caught
    assert entered == []
    assert_usable_idle(aconn)
    await aconn.commit()  # raises ProgrammingError if psycopg thinks a block is open
    await assert_commits_visibly(aconn, admin, table, 1)


# --- siblings: a cleanup that must wait for another task's command ------------------------------


async def test_cancelled_transaction_exit_waits_for_other_task(
    aconn: Conn, admin: Conn, table: sql.Identifier
) -> None:
    # The block ends with a cancel pending while another task's query holds the connection:
    # the ROLLBACK waits for it (shielded, within cancel_timeout), then Cancelled.
    aconn.cancel_timeout = 2.0
    pid = aconn.info.backend_pid
    other: list[Any] = []

    async def other_query() -> None:
        cur = await aconn.execute("SELECT pg_sleep(0.3), 'tp_other'")
        other.append(await cur.fetchone())

    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as scope:
            async with aconn.transaction():
                await aconn.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(table))
                nursery.start_soon(other_query)
                await wait_until_active(admin, pid, "tp_other")
                scope.cancel()
        assert scope.cancelled_caught
    assert other == [("", "tp_other")]
    assert_usable_idle(aconn)
    assert await ids_in(admin, table) == []
    await aconn.commit()
    await assert_commits_visibly(aconn, admin, table, 2)


async def test_cancelled_transaction_exit_closes_if_other_task_holds_on(
    aconn: Conn, admin: Conn, table: sql.Identifier
) -> None:
    # ... but not forever: after cancel_timeout the connection is closed (the other task gets
    # OperationalError) rather than left with a block psycopg would think still open.
    aconn.cancel_timeout = 0.5
    pid = aconn.info.backend_pid
    other: list[BaseException] = []

    async def other_query() -> None:
        with pytest.raises(psycopg.OperationalError) as excinfo:
            await aconn.execute("SELECT pg_sleep(3), 'tp_other_long'")
        other.append(excinfo.value)

    t0 = 0.0
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as scope:
            async with aconn.transaction():
                await aconn.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(table))
                nursery.start_soon(other_query)
                await wait_until_active(admin, pid, "tp_other_long")
                t0 = trio.current_time()
                scope.cancel()
        assert scope.cancelled_caught
        assert trio.current_time() - t0 < 1.5
    assert aconn.closed
    assert len(other) == 1
    assert await ids_in(admin, table) == []


@pytest.mark.parametrize("block", ["connection", "transaction"])
async def test_cleanup_with_the_tasks_own_stream_suspended(
    postgres_dsn: str, app_name: str, admin: Conn, table: sql.Identifier, block: str
) -> None:
    """``break`` out of a stream that stays referenced keeps psycopg's lock held by this
    very task: the COMMIT at the end of ``async with conn`` or of a transaction block
    would wait for it forever.  It is refused at once instead: the connection is closed
    (nothing committed) and `psycopg.OperationalError` raised."""
    conn = await connect(postgres_dsn, app_name)
    stream: Any = None
    with trio.move_on_after(2.0) as bound, pytest.raises(e.OperationalError, match="suspended"):
        async with conn if block == "connection" else conn.transaction():
            await conn.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(table))
            stream = conn.cursor().stream("SELECT generate_series(1, 100000)")
            async for _ in stream:
                break
    assert not bound.cancelled_caught, "the cleanup waited for this task's own lock"
    assert conn.closed
    assert await ids_in(admin, table) == []
    await stream.aclose()
    await conn.close()
