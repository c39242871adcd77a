"""Cancelling ``triopool.Connection`` operations with trio cancel scopes (and ``cancel_safe``).

Contract (API.md §1): when a cancel scope fires while a query runs, the query is cancelled on
the server (bounded, shielded), the connection is brought back to a known state or closed, and
``trio.Cancelled`` propagates. It is never left silently ``ACTIVE``.
"""

from __future__ import annotations

import uuid
from contextlib import aclosing
from typing import Any

import psycopg
import pytest
import trio
from _connection_helpers import (
    UNREACHABLE_CANCEL_BOUND,
    PostgresServer,
    PrivateServer,
    TcpProxy,
    agen,
    assert_usable_idle,
    backend_activity,
    connect,
    make_app_name,
    tx_status,
    wait_until_active,
)
from psycopg import errors as e
from psycopg import sql
from psycopg.pq import TransactionStatus

import triopool

Conn = triopool.Connection[Any]

# Five 10 kB rows (each big enough to be flushed to the client at once), then a 30 s sleep:
# a result whose first rows arrive promptly and whose end never comes in time.
ROWS_THEN_SLEEP = (
    "SELECT repeat('x', 10000) FROM generate_series(1, 5) UNION ALL SELECT pg_sleep(30)::text"
)


async def assert_backend_not_running(admin: Conn, pid: int) -> None:
    """Right after the cancelled call returned, the backend is idle (or gone): not running."""
    activity = await backend_activity(admin, pid)
    assert activity is None or activity[0] != "active", activity


async def test_cancel_sleep_autocommit(aconn: Conn, admin: Conn) -> None:
    pid = aconn.info.backend_pid
    t0 = trio.current_time()
    with trio.move_on_after(0.2) as scope:
        await aconn.execute("SELECT pg_sleep(30)")
    elapsed = trio.current_time() - t0
    assert scope.cancelled_caught  # trio.Cancelled propagated, not a psycopg error
    assert elapsed < 1.0, elapsed
    # The connection was drained, so the server already finished with the query.
    activity = await backend_activity(admin, pid)
    assert activity is not None
    assert activity[0] == "idle", activity
    assert "pg_sleep" in activity[1]
    assert_usable_idle(aconn)
    assert aconn.info.backend_pid == pid
    cur = await aconn.execute("SELECT 1")
    assert await cur.fetchone() == (1,)


async def test_cancel_sleep_in_implicit_transaction(conn: Conn, admin: Conn) -> None:
    # Autocommit off: the cancelled query leaves its transaction failed (or rolled back).
    pid = conn.info.backend_pid
    t0 = trio.current_time()
    with trio.move_on_after(0.2) as scope:
        await conn.execute("SELECT pg_sleep(30)")
    assert scope.cancelled_caught
    assert trio.current_time() - t0 < 1.0
    await assert_backend_not_running(admin, pid)
    assert not conn.closed
    assert conn.info.transaction_status in (TransactionStatus.INERROR, TransactionStatus.IDLE)
    await conn.rollback()
    assert_usable_idle(conn)
    cur = await conn.execute("SELECT 1")
    assert await cur.fetchone() == (1,)


async def test_cancel_is_cancel_not_timeout_error(aconn: Conn) -> None:
    # An outer scope cancelled from another task: Cancelled reaches exactly that scope.
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:

            async def query() -> None:
                await aconn.execute("SELECT pg_sleep(30)")

            nursery.start_soon(query)
            await trio.sleep(0.1)
            scope.cancel()
    assert scope.cancelled_caught
    assert_usable_idle(aconn)


async def test_cancel_during_big_result(aconn: Conn, admin: Conn) -> None:
    # 5 million rows take seconds to arrive: the scope fires while they stream in.
    pid = aconn.info.backend_pid
    t0 = trio.current_time()
    rows: list[Any] | None = None
    with trio.move_on_after(0.2) as scope:
        cur = await aconn.execute("SELECT generate_series(1, 5000000)")
        rows = await cur.fetchall()
    assert scope.cancelled_caught, "the result arrived before the cancel: make it bigger"
    assert rows is None
    assert trio.current_time() - t0 < 1.5
    await assert_backend_not_running(admin, pid)
    assert_usable_idle(aconn)
    cur = await aconn.execute("SELECT 2")
    assert await cur.fetchone() == (2,)


async def test_cancel_during_server_cursor_fetchall(conn: Conn, admin: Conn) -> None:
    # A named cursor: DECLARE is quick, the big transfer happens inside fetchall().
    pid = conn.info.backend_pid
    cur = conn.cursor("tp_big_cursor")
    await cur.execute("SELECT generate_series(1, 5000000)")
    assert conn.info.transaction_status == TransactionStatus.INTRANS
    t0 = trio.current_time()
    with trio.move_on_after(0.2) as scope:
        await cur.fetchall()
    assert scope.cancelled_caught
    assert trio.current_time() - t0 < 1.5
    await assert_backend_not_running(admin, pid)
    assert not conn.closed
    assert tx_status(conn) == TransactionStatus.INERROR
    await conn.rollback()
    await cur.close()
    assert_usable_idle(conn)
    check = await conn.execute("SELECT 3")
    assert await check.fetchone() == (3,)


async def test_cancel_during_stream(aconn: Conn, admin: Conn) -> None:
    pid = aconn.info.backend_pid
    seen = 0
    t0 = trio.current_time()
    with trio.CancelScope() as scope:
        async with aclosing(agen(aconn.cursor().stream(ROWS_THEN_SLEEP))) as rows:
            async for _ in rows:
                seen += 1
                if seen == 3:
                    scope.cancel()
    assert scope.cancelled_caught
    assert seen == 3
    assert trio.current_time() - t0 < 2.0
    await assert_backend_not_running(admin, pid)
    assert_usable_idle(aconn)
    cur = await aconn.execute("SELECT 4")
    assert await cur.fetchone() == (4,)


async def test_cancel_during_big_stream(aconn: Conn) -> None:
    seen = 0
    t0 = trio.current_time()
    with trio.CancelScope() as scope:
        cur = aconn.cursor()
        async with aclosing(agen(cur.stream("SELECT generate_series(1, 5000000)"))) as rows:
            async for _ in rows:
                seen += 1
                if seen == 10:
                    scope.cancel()
    assert scope.cancelled_caught
    assert seen == 10
    assert trio.current_time() - t0 < 2.0
    assert_usable_idle(aconn)
    cur = await aconn.execute("SELECT 5")
    assert await cur.fetchone() == (5,)


async def test_cancel_inside_transaction_block(conn: Conn, admin: Conn) -> None:
    table = sql.Identifier(f"tp_cancel_{uuid.uuid4().hex[:12]}")
    await admin.execute(sql.SQL("CREATE TABLE {} (id int)").format(table))
    try:
        pid = conn.info.backend_pid
        t0 = trio.current_time()
        with trio.move_on_after(0.3) as scope:
            async with conn.transaction():
                await conn.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(table))
                await conn.execute("SELECT pg_sleep(30)")
        assert scope.cancelled_caught
        assert trio.current_time() - t0 < 1.5
        await assert_backend_not_running(admin, pid)
        # The block was rolled back and the connection is usable.
        assert_usable_idle(conn)
        cur = await conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table))
        assert await cur.fetchone() == (0,)
        await conn.rollback()
        cur = await admin.execute(sql.SQL("SELECT count(*) FROM {}").format(table))
        assert await cur.fetchone() == (0,)
    finally:
        with trio.move_on_after(5, shield=True):
            await admin.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table))


async def test_cancel_inside_nested_savepoint(conn: Conn) -> None:
    # Cancelling inside a savepoint: both levels are rolled back, the connection is usable.
    with trio.move_on_after(0.3) as scope:
        async with conn.transaction(), conn.transaction():
            await conn.execute("SELECT pg_sleep(30)")
    assert scope.cancelled_caught
    assert_usable_idle(conn)
    cur = await conn.execute("SELECT 6")
    assert await cur.fetchone() == (6,)


async def test_cancel_during_copy_out(aconn: Conn) -> None:
    # Cancelled once data flows (a timeout could fire before the first block on a busy
    # machine).  The COPY would run for hours (5 billion rows): the test ends only if the
    # rest is cancelled on the server, not read (bounded, so that it fails clearly).
    got = 0
    with trio.fail_after(30), trio.CancelScope() as scope:
        async with aconn.cursor().copy(
            "COPY (SELECT generate_series(1, 5000000000)) TO STDOUT"
        ) as copy:
            while block := await copy.read():
                got += len(block)
                if got > 1_000_000:
                    scope.cancel()
    assert scope.cancelled_caught
    assert got > 1_000_000
    assert_usable_idle(aconn)
    cur = await aconn.execute("SELECT 7")
    assert await cur.fetchone() == (7,)


async def test_already_cancelled_sends_nothing(aconn: Conn, admin: Conn) -> None:
    # A task that is already cancelled does not start a query.
    pid = aconn.info.backend_pid
    with trio.CancelScope() as scope:
        scope.cancel()
        await aconn.execute("SELECT 'tp_never_sent'")
    assert scope.cancelled_caught
    activity = await backend_activity(admin, pid)
    assert activity is not None
    assert "tp_never_sent" not in activity[1]
    assert_usable_idle(aconn)


async def test_cancel_safe_from_other_task(aconn: Conn, admin: Conn) -> None:
    pid = aconn.info.backend_pid
    outcome: list[BaseException] = []

    async def run_query() -> None:
        with pytest.raises(e.QueryCanceled) as excinfo:
            await aconn.execute("SELECT pg_sleep(30)")
        outcome.append(excinfo.value)

    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_query)
        await wait_until_active(admin, pid, "pg_sleep")
        await aconn.cancel_safe()
    assert trio.current_time() - t0 < 3.0
    assert len(outcome) == 1
    assert isinstance(outcome[0], e.QueryCanceled)
    assert_usable_idle(aconn)
    cur = await aconn.execute("SELECT 8")
    assert await cur.fetchone() == (8,)


async def test_cancel_safe_when_idle_is_noop(aconn: Conn) -> None:
    await aconn.cancel_safe()
    assert_usable_idle(aconn)
    cur = await aconn.execute("SELECT 9")
    assert await cur.fetchone() == (9,)


async def test_stock_cancel_from_thread(aconn: Conn, admin: Conn) -> None:
    # The blocking psycopg cancel() still works, from a worker thread.
    pid = aconn.info.backend_pid
    async with trio.open_nursery() as nursery:

        async def run_query() -> None:
            with pytest.raises(e.QueryCanceled):
                await aconn.execute("SELECT pg_sleep(30)")

        nursery.start_soon(run_query)
        await wait_until_active(admin, pid, "pg_sleep")
        await trio.to_thread.run_sync(aconn.cancel)
    assert_usable_idle(aconn)


# --- the cancel request cannot complete: bounded, then the connection is closed ----------------


@pytest.mark.slow
@pytest.mark.faults
async def test_cancel_with_paused_server_closes_connection(
    private_server: PrivateServer, app_name: str
) -> None:
    conn = await connect(private_server.dsn, app_name, autocommit=True)
    admin = await connect(private_server.dsn, make_app_name("admin"), autocommit=True)
    try:
        pid = conn.info.backend_pid
        async with trio.open_nursery() as nursery:
            cancelled = trio.Event()

            async def run_query() -> None:
                with trio.CancelScope() as scope:
                    nursery.start_soon(pause_then_cancel, scope)
                    await conn.execute("SELECT pg_sleep(30)")
                assert scope.cancelled_caught
                cancelled.set()

            async def pause_then_cancel(scope: trio.CancelScope) -> None:
                await wait_until_active(admin, pid, "pg_sleep")
                await trio.to_thread.run_sync(private_server.pause)
                t0 = trio.current_time()
                scope.cancel()
                await cancelled.wait()
                elapsed.append(trio.current_time() - t0)

            elapsed: list[float] = []
            nursery.start_soon(run_query)
        assert elapsed[0] < UNREACHABLE_CANCEL_BOUND, elapsed
        assert conn.closed
        assert conn.pgconn.transaction_status != TransactionStatus.ACTIVE
        with pytest.raises(psycopg.OperationalError):
            await conn.execute("SELECT 1")
    finally:
        with trio.move_on_after(5, shield=True):
            await trio.to_thread.run_sync(private_server.resume)
            await conn.close()
            await admin.close()


@pytest.mark.slow
async def test_cancel_with_blackholed_proxy_closes_connection(
    postgres_server: PostgresServer, tcp_proxy: TcpProxy, admin: Conn, app_name: str
) -> None:
    conn = await triopool.Connection.connect(
        postgres_server.conninfo(
            host=tcp_proxy.host, port=tcp_proxy.port, application_name=app_name
        ),
        autocommit=True,
    )
    cancelled_at: list[float] = []
    try:
        pid = conn.info.backend_pid
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:

                async def blackhole_then_cancel() -> None:
                    await wait_until_active(admin, pid, "pg_sleep")
                    tcp_proxy.blackhole()
                    cancelled_at.append(trio.current_time())
                    scope.cancel()

                nursery.start_soon(blackhole_then_cancel)
                await conn.execute("SELECT pg_sleep(30)")
        elapsed = trio.current_time() - cancelled_at[0]
        assert scope.cancelled_caught
        assert elapsed < UNREACHABLE_CANCEL_BOUND, elapsed
        assert conn.closed
        assert conn.pgconn.transaction_status != TransactionStatus.ACTIVE
    finally:
        tcp_proxy.heal()
        with trio.move_on_after(5, shield=True):
            await conn.close()
            await trio.to_thread.run_sync(postgres_server.terminate_backends, app_name)
