"""ConnectionPool and NullConnectionPool against the real server: the core contract."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
import trio
import trio.testing
from _pool_checks import Server, app_name, assert_no_leaks, settled_backends

import triopool
from triopool import ConnectionPool, NullConnectionPool, PoolClosed, PoolTimeout, TooManyRequests

STATS_KEYS = {
    "pool_min", "pool_max", "pool_size", "pool_available", "requests_waiting", "usage_ms",
    "requests_num", "requests_queued", "requests_wait_ms", "requests_errors", "returns_bad",
    "connections_num", "connections_ms", "connections_errors", "connections_lost",
}  # fmt: skip


@pytest.fixture
def name() -> str:
    return app_name("tp_core")


@pytest.fixture
async def pool(postgres_dsn: str, name: str) -> AsyncIterator[ConnectionPool]:
    async with triopool.open_pool(
        postgres_dsn, min_size=2, max_size=4, kwargs={"application_name": name}, wait=True
    ) as pool:
        yield pool
        await trio.testing.wait_all_tasks_blocked()
        assert_no_leaks(pool)


async def test_open_pool_waits_for_min_size(
    pool: ConnectionPool, postgres_server: Server, name: str
) -> None:
    assert pool.status() == triopool.PoolStatus(max_size=4, size=2, available=2, waiting=0)
    assert await settled_backends(postgres_server, name, 2) == 2


async def test_close_closes_backends_and_refuses(
    postgres_dsn: str, postgres_server: Server
) -> None:
    name = app_name()
    async with triopool.open_pool(
        postgres_dsn, min_size=2, kwargs={"application_name": name}, wait=True
    ) as pool:
        conn = await pool.getconn()
    assert pool.closed
    with pytest.raises(PoolClosed):
        await pool.getconn()
    assert not conn.closed  # lent out: closed when it comes back
    await pool.putconn(conn)
    assert conn.closed
    assert await settled_backends(postgres_server, name, 0) == 0


async def test_start_in_a_nursery(postgres_dsn: str) -> None:
    pool = ConnectionPool(postgres_dsn, min_size=1)  # constructed before opening: no I/O
    async with trio.open_nursery() as nursery:
        started = await nursery.start(pool.run)
        assert started is pool
        await pool.wait(5)
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
        await pool.close()
    with pytest.raises(PoolClosed):
        async with pool:
            pass


async def test_commit_on_success_rollback_on_error(pool: ConnectionPool) -> None:
    table = f"tp_core_{uuid.uuid4().hex[:8]}"
    async with pool.connection() as conn:
        await conn.execute(f"CREATE TABLE {table} (x int)")
    with pytest.raises(ZeroDivisionError):
        async with pool.connection() as conn:
            await conn.execute(f"INSERT INTO {table} VALUES (1)")
            raise ZeroDivisionError
    async with pool.connection() as conn:
        await conn.execute(f"INSERT INTO {table} VALUES (2)")
    async with pool.connection() as conn:
        cur = await conn.execute(f"SELECT array_agg(x) FROM {table}")
        assert await cur.fetchone() == ([2],)
        await conn.execute(f"DROP TABLE {table}")


async def test_putconn_refuses_foreign_and_double_returns(
    pool: ConnectionPool, postgres_dsn: str
) -> None:
    foreign = await triopool.Connection.connect(postgres_dsn)
    with pytest.raises(ValueError, match="not lent"):
        await pool.putconn(foreign)
    await foreign.close()
    conn = await pool.getconn()
    await pool.putconn(conn)
    with pytest.raises(ValueError, match="not lent"):
        await pool.putconn(conn)


async def test_timeout_message_and_max_waiting(postgres_dsn: str) -> None:
    async with triopool.open_pool(postgres_dsn, min_size=1, max_waiting=1, wait=True) as pool:
        held = await pool.getconn()
        t0 = trio.current_time()
        with pytest.raises(PoolTimeout, match=r"couldn't get a connection after 0\.20 sec"):
            await pool.getconn(timeout=0.2)
        assert 0.19 <= trio.current_time() - t0 < 0.5
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.getconn, 5)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(TooManyRequests):
                await pool.getconn()
            nursery.cancel_scope.cancel()
        await pool.putconn(held)
        assert pool.get_stats()["requests_errors"] == 2
        assert_no_leaks(pool)


async def test_fifo_and_cancelled_waiter(postgres_dsn: str) -> None:
    async with triopool.open_pool(postgres_dsn, min_size=1, wait=True) as pool:
        held = await pool.getconn()
        served: list[int] = []

        async def client(i: int) -> None:
            async with pool.connection():
                served.append(i)

        async with trio.open_nursery() as nursery:
            scopes = []
            for i in range(5):
                scope = trio.CancelScope()
                scopes.append(scope)

                async def run(i: int = i, scope: trio.CancelScope = scope) -> None:
                    with scope:
                        await client(i)

                nursery.start_soon(run)
                await trio.testing.wait_all_tasks_blocked()
            scopes[2].cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert pool.status().waiting == 4
            await pool.putconn(held)
        assert served == [0, 1, 3, 4]
        assert_no_leaks(pool)


async def test_broken_connection_is_replaced(
    pool: ConnectionPool, postgres_server: Server, name: str
) -> None:
    async with pool.connection() as conn:
        pid = conn.info.backend_pid
    await trio.to_thread.run_sync(postgres_server.terminate_backends, name)
    with pytest.raises(psycopg.OperationalError):
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
    assert pool.get_stats()["returns_bad"] == 1
    async with pool.connection() as conn, pool.connection() as conn2:
        cur = await conn.execute("SELECT 1")
        assert await cur.fetchone() == (1,)
        await conn2.execute("SELECT 1")
        assert pid not in (conn.info.backend_pid, conn2.info.backend_pid)


async def test_check_callback_never_hands_out_a_killed_connection(
    postgres_dsn: str, postgres_server: Server
) -> None:
    name = app_name()
    async with triopool.open_pool(
        postgres_dsn, min_size=2, kwargs={"application_name": name},
        check=ConnectionPool.check_connection, wait=True,
    ) as pool:  # fmt: skip
        await trio.to_thread.run_sync(postgres_server.terminate_backends, name)
        for _ in range(4):
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")  # never the dead one
        assert_no_leaks(pool)


async def test_dirty_return_is_rolled_back(pool: ConnectionPool) -> None:
    conn = await pool.getconn()
    await conn.execute("SELECT 1")  # opens a transaction (not autocommit)
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    await pool.putconn(conn)
    async with pool.connection() as again:
        assert again.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


async def test_query_cancelled_by_caller_scope_returns_usable_connection(
    pool: ConnectionPool,
) -> None:
    with trio.move_on_after(0.2) as scope:
        async with pool.connection() as conn:
            await conn.execute("SELECT pg_sleep(10)")
    assert scope.cancelled_caught
    await trio.testing.wait_all_tasks_blocked()
    assert pool.status().size == 2
    async with pool.connection() as conn:
        await conn.execute("SELECT 1")


@pytest.mark.parametrize("k", range(12))
async def test_cancel_at_every_checkpoint_of_a_request(pool: ConnectionPool, k: int) -> None:
    """A request cancelled after exactly k checkpoints (enter, query, exit) loses nothing."""
    done = False
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:

            async def canceller() -> None:  # noqa: ASYNC910  # may be cancelled before it starts
                for _ in range(k):
                    await trio.lowlevel.checkpoint()
                scope.cancel()

            nursery.start_soon(canceller)
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
            done = True
    await trio.testing.wait_all_tasks_blocked()
    assert_no_leaks(pool)
    assert done or scope.cancelled_caught
    async with pool.connection() as conn:  # the pool still serves
        await conn.execute("SELECT 1")


async def test_grows_to_max_and_stats(pool: ConnectionPool) -> None:
    peak = 0

    async def client() -> None:
        nonlocal peak
        async with pool.connection() as conn:
            peak = max(peak, pool.status().size)
            await conn.execute("SELECT pg_sleep(0.05)")

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(client)
    assert peak == 4
    stats = pool.get_stats()
    assert set(stats) == STATS_KEYS
    assert stats["requests_num"] == 10
    popped = pool.pop_stats()
    assert popped["requests_num"] == 10
    after = pool.get_stats()
    assert after["requests_num"] == 0
    assert after["pool_size"] == popped["pool_size"]  # gauges are not reset


async def test_resize_and_drain(pool: ConnectionPool) -> None:
    await pool.resize(3, 5)
    await pool.wait(5)
    assert (pool.min_size, pool.max_size, pool.status().size) == (3, 5, 3)
    async with pool.connection() as conn:
        old_pid = conn.info.backend_pid
    await pool.drain()
    await pool.wait(5)
    pids = set()
    async with pool.connection() as a, pool.connection() as b, pool.connection() as c:
        pids = {a.info.backend_pid, b.info.backend_pid, c.info.backend_pid}
    assert old_pid not in pids
    await pool.resize(2, 4)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"min_size": -1}, ValueError, "min_size"),
        ({"min_size": 1.5}, TypeError, "min_size"),
        ({"min_size": True}, TypeError, "min_size"),
        ({"min_size": 4, "max_size": 2}, ValueError, "max_size"),
        ({"timeout": -1}, ValueError, "timeout"),
        ({"max_idle": "x"}, TypeError, "max_idle"),
        ({"configure": 42}, TypeError, "configure"),
        ({"connection_class": psycopg.AsyncConnection}, TypeError, "connection_class"),
        ({"max_waiting": -2}, ValueError, "max_waiting"),
    ],
)
def test_invalid_parameters(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ConnectionPool("", **kwargs)


def test_malformed_conninfo_fails_at_once() -> None:
    with pytest.raises(psycopg.ProgrammingError):
        ConnectionPool("host=a b==c")


def test_defaults_are_psycopg_pools() -> None:
    pool = ConnectionPool("")
    assert (pool.min_size, pool.max_size, pool.timeout, pool.max_waiting) == (4, 4, 30.0, 0)
    assert (pool.max_lifetime, pool.max_idle, pool.reconnect_timeout) == (3600.0, 600.0, 300.0)
    assert pool.name.startswith("pool-")
    assert "secret" not in repr(ConnectionPool("password=secret"))


async def test_null_pool_opens_a_connection_per_request(
    postgres_dsn: str, postgres_server: Server
) -> None:
    with pytest.raises(ValueError, match="min_size"):
        NullConnectionPool(postgres_dsn, min_size=1)
    name = app_name()
    async with NullConnectionPool(postgres_dsn, kwargs={"application_name": name}) as pool:
        await pool.wait(5)
        pids = set()
        for _ in range(3):
            async with pool.connection() as conn:
                pids.add(conn.info.backend_pid)
        assert len(pids) == 3
        await trio.testing.wait_all_tasks_blocked()
        assert pool.status().size == 0
    assert await settled_backends(postgres_server, name, 0) == 0


async def test_null_pool_with_max_size_queues(postgres_dsn: str) -> None:
    async with NullConnectionPool(postgres_dsn, max_size=1) as pool:
        held = await pool.getconn()
        with pytest.raises(PoolTimeout):
            await pool.getconn(timeout=0.1)
        await pool.putconn(held)
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")


async def test_listener_delivers_in_order_and_ends_on_close(postgres_dsn: str) -> None:
    async with triopool.open_pool(postgres_dsn, min_size=1, kwargs={"autocommit": True}) as pool:
        async with pool.listener("tp_a", "tp_b") as notifications:
            async with pool.connection() as conn:
                for i in range(5):
                    await conn.execute(f"NOTIFY tp_{'ab'[i % 2]}, 'p{i}'")
            got = []
            with trio.fail_after(5):
                async for n in notifications:
                    assert isinstance(n, psycopg.Notify)
                    got.append(n.payload)
                    if len(got) == 5:
                        break
            assert got == [f"p{i}" for i in range(5)]
            assert pool.status().size == 1  # the listener's connection is not the pool's
            await pool.close()
            with trio.fail_after(5):
                assert [n async for n in notifications] == []
