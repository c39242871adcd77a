"""Pool contract, part 1: opening, closing, waiting, sizing and statistics.

Run over `ConnectionPool` and `NullConnectionPool` (``pool_cls``) against the
real server, mirroring psycopg_pool's ``tests/pool`` (see _contract_helpers).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import psycopg
import pytest
import trio
import trio.testing
from _contract_helpers import (
    PoolClass,
    backend_pids,
    capture_pool_logs,
    contract_pool,
    eventually,
    is_null,
    min_for,
    pool_records,
    queued_client,
    terminate,
)
from _contract_helpers import name as name
from _contract_helpers import pool_cls as pool_cls
from _contract_helpers import refused_dsn as refused_dsn
from _pool_checks import Server, assert_settled, settled_backends

import triopool
from triopool import ConnectionPool, NullConnectionPool, PoolClosed, PoolTimeout

# -- opening and closing --------------------------------------------------------


@pytest.mark.parametrize("style", ["async_with", "nursery_close", "nursery_cancel"])
async def test_opening_styles(
    pool_cls: PoolClass, style: str, postgres_server: Server, name: str
) -> None:
    """``async with pool`` and ``nursery.start(pool.run)`` open the pool, which
    serves at once and closes every backend when closed or when ``run`` is
    cancelled; a connection lent then stays the caller's, usable, until it is
    given back, and is closed then."""
    pool = pool_cls(
        postgres_server.dsn, min_size=min_for(pool_cls, 2), kwargs={"application_name": name}
    )

    async def use() -> triopool.Connection[Any]:
        async with pool.connection() as conn:  # served while filling goes on
            await conn.execute("SELECT 1")
        await pool.wait(5)
        expected = min_for(pool_cls, 2)
        assert await settled_backends(postgres_server, name, expected) == expected
        return await pool.getconn()  # still lent when the pool closes

    if style == "async_with":
        async with pool:
            lent = await use()
    else:
        async with trio.open_nursery() as nursery:
            assert await nursery.start(pool.run) is pool
            lent = await use()
            if style == "nursery_close":
                await pool.close()
            else:
                nursery.cancel_scope.cancel()
    assert pool.closed
    assert not lent.closed
    cur = await lent.execute("SELECT 1")
    assert await cur.fetchone() == (1,)
    await pool.putconn(lent)
    assert lent.closed
    await assert_settled(pool, postgres_server, name)


async def test_open_pool_wait_enters_at_min_size(postgres_server: Server, name: str) -> None:
    """``open_pool(wait=True)`` enters its block once ``min_size`` connections are
    ready, and closes the pool (every backend) when the block ends."""
    async with triopool.open_pool(
        postgres_server.dsn,
        min_size=2,
        max_size=4,
        kwargs={"application_name": name},
        wait=True,
    ) as pool:
        assert pool.status() == triopool.PoolStatus(max_size=4, size=2, available=2, waiting=0)
        assert await settled_backends(postgres_server, name, 2) == 2
    assert pool.closed
    await assert_settled(pool, postgres_server, name)


def test_constructed_outside_trio_run(
    pool_cls: PoolClass, postgres_server: Server, name: str
) -> None:
    """A pool built before `trio.run` (e.g. at import time) opens and works inside it."""
    pool = pool_cls(
        postgres_server.dsn, min_size=min_for(pool_cls, 1), kwargs={"application_name": name}
    )

    async def main() -> None:
        async with pool, pool.connection() as conn:
            cur = await conn.execute("SELECT 42")
            assert await cur.fetchone() == (42,)
        await assert_settled(pool, postgres_server, name)

    trio.run(main)


async def test_opened_only_once(pool_cls: PoolClass, postgres_server: Server, name: str) -> None:
    """Opening an open pool again, either way, fails with `PoolClosed` and leaves
    it serving; a closed pool cannot be reopened, either way."""
    async with contract_pool(
        pool_cls, postgres_server, name, min_size=min_for(pool_cls, 1)
    ) as pool:
        with pytest.raises(PoolClosed, match="only once"):
            async with pool:
                pytest.fail("opened twice")
        async with trio.open_nursery() as nursery:
            with pytest.raises(PoolClosed, match="only once"):
                await nursery.start(pool.run)
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
    async with trio.open_nursery() as nursery:
        with pytest.raises(PoolClosed):
            await nursery.start(pool.run)
    with pytest.raises(PoolClosed):
        async with pool:
            pytest.fail("reopened")


async def test_requests_before_opening_fail(pool_cls: PoolClass, postgres_dsn: str) -> None:
    """A pool not opened yet refuses requests with `PoolClosed` (no hang)."""
    pool = pool_cls(postgres_dsn, min_size=min_for(pool_cls, 1))
    with pytest.raises(PoolClosed, match="not open"):
        await pool.getconn()
    with pytest.raises(PoolClosed, match="not open"):
        async with pool.connection():
            pytest.fail("served by a pool never opened")


async def test_close_fails_waiters_and_later_requests(
    pool_cls: PoolClass, postgres_server: Server, name: str
) -> None:
    """`close`: a queued client gets `PoolClosed`, so do later requests; a lent
    connection keeps working until it comes back, and is then closed."""
    async with contract_pool(
        pool_cls, postgres_server, name, min_size=min_for(pool_cls, 1), max_size=1
    ) as pool:
        async with pool.connection() as conn:
            async with queued_client(pool) as seen:
                await pool.close()
            assert isinstance(seen.error, PoolClosed)
            assert pool.closed and not conn.closed
            cur = await conn.execute("SELECT 1")  # still ours until it goes back
            assert await cur.fetchone() == (1,)
        assert conn.closed
        with pytest.raises(PoolClosed):
            await pool.getconn()
        with pytest.raises(PoolClosed):
            async with pool.connection():
                pytest.fail("served by a closed pool")
        # The waiter failed by close; requests to a closed pool are refused before
        # they count (as in psycopg_pool).
        assert pool.get_stats()["requests_errors"] == 1
        await pool.close()  # closing again does nothing


async def test_close_timeout_bounds_background_work(
    pool_cls: PoolClass, postgres_server: Server, name: str
) -> None:
    """``close(timeout)`` waits that long for a hanging reset, then cancels it: the
    query is cancelled on the server and the connection closed."""
    resetting = trio.Event()

    async def reset(conn: triopool.Connection[Any]) -> None:
        resetting.set()
        await conn.execute("SELECT pg_sleep(30)")

    async with contract_pool(
        pool_cls, postgres_server, name, min_size=min_for(pool_cls, 1), max_size=1, reset=reset
    ) as pool:
        conn = await pool.getconn()
        async with queued_client(pool) as seen:  # the null pool resets only for a waiter
            await pool.putconn(conn)
            await resetting.wait()
            started = trio.current_time()
            await pool.close(timeout=0.3)
            took = trio.current_time() - started
        assert isinstance(seen.error, PoolClosed)
        assert 0.29 <= took < 2.0, took


async def test_a_single_failure_is_not_an_exception_group(
    pool_cls: PoolClass, refused_dsn: str
) -> None:
    """``except PoolTimeout`` works around an opening that cannot connect: no
    ExceptionGroup reaches the user, the connection error is the cause, and the
    pool ends closed."""
    started = trio.current_time()
    if is_null(pool_cls):
        pool = NullConnectionPool(refused_dsn)
        with pytest.raises(PoolTimeout, match="incomplete after") as info:
            async with pool:
                await pool.wait(0.5)
        assert pool.closed
    else:
        with pytest.raises(PoolTimeout, match="incomplete after") as info:
            async with triopool.open_pool(refused_dsn, min_size=1, wait=True, timeout=0.5):
                pytest.fail("opened without a server")
    assert isinstance(info.value.__cause__, psycopg.OperationalError)
    assert trio.current_time() - started < 2.0


async def test_an_error_in_the_block_is_not_an_exception_group(
    pool_cls: PoolClass, postgres_server: Server, name: str
) -> None:
    """An exception raised inside ``async with pool`` comes out as itself."""
    with pytest.raises(KeyError, match="mine"):
        async with contract_pool(
            pool_cls, postgres_server, name, min_size=min_for(pool_cls, 1)
        ) as pool:
            raise KeyError("mine")
    assert pool.closed
    await assert_settled(pool, postgres_server, name)


async def test_wait_on_a_closed_pool_fails(postgres_dsn: str) -> None:
    """``wait`` on a closed pool raises `PoolClosed`."""
    async with ConnectionPool(postgres_dsn, min_size=1) as pool:
        pass
    with pytest.raises(PoolClosed):
        await pool.wait(1)


async def test_wait_for_min_size_or_time_out_and_close(
    pool_cls: PoolClass, postgres_server: Server, name: str, refused_dsn: str
) -> None:
    """``wait``: the pool waits for ``min_size`` connections (the null pool opens a
    test connection and closes it); when it cannot, `PoolTimeout` and the pool is
    closed."""
    async with contract_pool(
        pool_cls, postgres_server, name, min_size=min_for(pool_cls, 3)
    ) as pool:
        await pool.wait(5)
        expected = min_for(pool_cls, 3)
        assert pool.status().available == expected
        assert await settled_backends(postgres_server, name, expected) == expected
    pool = pool_cls(refused_dsn, min_size=min_for(pool_cls, 1))
    async with pool:
        started = trio.current_time()
        with pytest.raises(PoolTimeout) as info:
            await pool.wait(0.3)
        assert pool.closed
        assert isinstance(info.value.__cause__, psycopg.OperationalError)
        assert trio.current_time() - started < 2.0
    await assert_settled(pool)


# -- validation ---------------------------------------------------------------------

BOTH_INVALID: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"conninfo": 3}, TypeError, "conninfo"),
    ({"kwargs": ["host"]}, TypeError, "kwargs"),
    ({"min_size": -1}, ValueError, "min_size"),
    ({"min_size": 1.5}, TypeError, "min_size"),
    ({"min_size": True}, TypeError, "min_size"),
    ({"max_size": -1}, ValueError, "max_size"),
    ({"timeout": -1}, ValueError, "timeout"),
    ({"timeout": float("nan")}, ValueError, "timeout"),
    ({"timeout": "1"}, TypeError, "timeout"),
    ({"max_waiting": 1.5}, TypeError, "max_waiting"),
    ({"max_waiting": -2}, ValueError, "max_waiting"),
    ({"max_lifetime": -1}, ValueError, "max_lifetime"),
    ({"max_idle": -0.5}, ValueError, "max_idle"),
    ({"max_idle": "x"}, TypeError, "max_idle"),
    ({"reconnect_timeout": float("nan")}, ValueError, "reconnect_timeout"),
    ({"leak_timeout": -1}, ValueError, "leak_timeout"),
    ({"name": 3}, TypeError, "name"),
    ({"configure": 42}, TypeError, "configure"),
    ({"reset": "x"}, TypeError, "reset"),
    ({"check": 1}, TypeError, "check"),
    ({"reconnect_failed": 1}, TypeError, "reconnect_failed"),
    ({"connection_class": psycopg.AsyncConnection}, TypeError, "connection_class"),
]


@pytest.mark.parametrize(("options", "error", "match"), BOTH_INVALID)
def test_invalid_parameters_name_the_parameter(
    pool_cls: PoolClass, options: dict[str, Any], error: type[Exception], match: str
) -> None:
    """Each invalid constructor argument is a clear error naming the parameter."""
    options = dict(options)
    conninfo = options.pop("conninfo", "")
    with pytest.raises(error, match=match):
        pool_cls(conninfo, **options)


def test_invalid_sizes_for_the_class(pool_cls: PoolClass) -> None:
    """``min_size`` above ``max_size`` is a `ValueError` naming ``max_size``; a null
    pool refuses any ``min_size`` but 0, naming it."""
    if is_null(pool_cls):
        with pytest.raises(ValueError, match="min_size"):
            pool_cls("", min_size=1)
        with pytest.raises(ValueError, match="min_size"):
            pool_cls("", min_size=4, max_size=2)
    else:
        with pytest.raises(ValueError, match="max_size"):
            pool_cls("", min_size=4, max_size=2)


def test_malformed_conninfo_fails_at_construction(pool_cls: PoolClass) -> None:
    """A conninfo string psycopg cannot parse fails when the pool is built, not
    when it first connects."""
    with pytest.raises(psycopg.ProgrammingError, match='invalid connection option "b"'):
        pool_cls("host=a b==c")


@pytest.mark.parametrize(
    ("sizes", "match"),
    [((0, 0), "max_size"), ((-1, None), "min_size"), ((4, 2), "max_size")],
)
async def test_invalid_resize(
    sizes: tuple[int, int | None], match: str, postgres_server: Server, name: str
) -> None:
    """``resize`` validates like the constructor, and a refused resize changes nothing."""
    async with contract_pool(ConnectionPool, postgres_server, name, min_size=1) as pool:
        with pytest.raises(ValueError, match=match):
            await pool.resize(*sizes)
        assert (pool.min_size, pool.max_size) == (1, 1)


async def test_invalid_request_timeout(
    pool_cls: PoolClass, postgres_server: Server, name: str
) -> None:
    """A negative request ``timeout`` is a `ValueError` naming it."""
    async with contract_pool(
        pool_cls, postgres_server, name, min_size=min_for(pool_cls, 1)
    ) as pool:
        with pytest.raises(ValueError, match="timeout"):
            await pool.getconn(timeout=-1)


def test_defaults_are_psycopg_pools(pool_cls: PoolClass) -> None:
    """The defaults are psycopg_pool's: sizes 4 for a `ConnectionPool`, 0 (no limit)
    for a null pool; the rest the same for both; each pool gets its own name."""
    pool = pool_cls("")
    sizes = (0, 0) if is_null(pool_cls) else (4, 4)
    assert (pool.min_size, pool.max_size, pool.timeout, pool.max_waiting) == (*sizes, 30.0, 0)
    assert (pool.max_lifetime, pool.max_idle, pool.reconnect_timeout) == (3600.0, 600.0, 300.0)
    assert pool.name.startswith("pool-") and pool.name != pool_cls("").name


# -- sizing -----------------------------------------------------------------------


def hold(pool: ConnectionPool, count: int, nursery: trio.Nursery) -> trio.Event:
    """Start `count` clients that hold a connection until the returned event is set."""
    release = trio.Event()

    async def client() -> None:
        async with pool.connection():
            await release.wait()

    for _ in range(count):
        nursery.start_soon(client)
    return release


async def test_grows_on_demand_up_to_max_size(
    pool_cls: PoolClass, postgres_server: Server, name: str
) -> None:
    """Five clients at once: the pool opens up to ``max_size`` (3) connections, the
    server never sees more, and the other clients queue."""
    async with contract_pool(
        pool_cls, postgres_server, name, min_size=min_for(pool_cls, 1), max_size=3
    ) as pool:
        await pool.wait(5)
        async with trio.open_nursery() as nursery:
            release = hold(pool, 5, nursery)
            await eventually(lambda: pool.status().waiting == 2 and len(pool.holders()) == 3)
            assert pool.status().size == 3
            assert await settled_backends(postgres_server, name, 3) == 3
            release.set()
        expected = 0 if is_null(pool_cls) else 3  # idle ones stay until max_idle
        await eventually(lambda: pool.status().size == expected)


async def test_shrinks_to_min_size_after_max_idle(postgres_server: Server, name: str) -> None:
    """Connections idle for ``max_idle`` (0.3 s) above ``min_size`` are closed, not
    before; ``min_size`` stay."""
    async with contract_pool(
        ConnectionPool, postgres_server, name, min_size=1, max_size=3, max_idle=0.3
    ) as pool:
        async with trio.open_nursery() as nursery:
            release = hold(pool, 3, nursery)
            await eventually(lambda: len(pool.holders()) == 3)
            idle_since = trio.current_time()
            release.set()
        assert pool.status().size == 3
        shrunk_at = await eventually(lambda: pool.status().size == 1)
        assert 0.29 <= shrunk_at - idle_since < 2.0
        assert await settled_backends(postgres_server, name, 1) == 1


async def test_replaced_at_max_lifetime(
    pool_cls: PoolClass, postgres_server: Server, name: str
) -> None:
    """Within ``max_lifetime`` (0.5 s, less 0-10 %) a returned connection serves the
    next client; past it, it is closed and the client gets a new one."""
    async with contract_pool(
        pool_cls,
        postgres_server,
        name,
        min_size=min_for(pool_cls, 1),
        max_size=1,
        max_lifetime=0.5,
    ) as pool:
        conn = await pool.getconn()
        born = trio.current_time()
        first = conn.info.backend_pid
        async with queued_client(pool) as young:
            await pool.putconn(conn)
        assert young.pid == first
        conn = await pool.getconn()
        await trio.sleep_until(born + 0.55)  # hold it past its lifetime
        async with queued_client(pool) as old:
            await pool.putconn(conn)
        assert old.pid not in (0, first)


async def test_idle_connection_replaced_at_max_lifetime(postgres_server: Server, name: str) -> None:
    """An idle connection past ``max_lifetime`` is replaced without any request."""
    async with contract_pool(
        ConnectionPool, postgres_server, name, min_size=1, max_lifetime=0.3
    ) as pool:
        await pool.wait(5)
        (first,) = await backend_pids(postgres_server, name)
        with trio.fail_after(5):
            while first in (pids := await backend_pids(postgres_server, name)) or not pids:  # noqa: ASYNC110  # server-side state
                await trio.sleep(0.02)
        assert len(pids) == 1 and first not in pids
        await pool.wait(5)


async def test_check_replaces_broken_idle_connections(
    postgres_server: Server, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``check()`` tests each idle connection: a killed one is discarded (logged,
    counted as lost) and replaced; the others are kept."""
    capture_pool_logs(caplog)
    async with contract_pool(ConnectionPool, postgres_server, name, min_size=3) as pool:
        await pool.wait(5)
        pids = await backend_pids(postgres_server, name)
        victim = min(pids)
        await terminate(postgres_server, victim)
        await pool.check()
        await pool.wait(5)
        after = await backend_pids(postgres_server, name)
        assert len(after) == 3 and victim not in after and len(after & pids) == 2
        assert pool.get_stats()["connections_lost"] == 1
        assert any("discarding broken connection" in msg for msg in pool_records(caplog, pool))
        async with pool.connection() as conn:  # the checked ones come back as they were
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            assert not conn.autocommit


async def test_null_pool_check_opens_nothing(postgres_server: Server, name: str) -> None:
    """A null pool's ``check()`` is a no-op: no connection is opened."""
    async with contract_pool(NullConnectionPool, postgres_server, name) as pool:
        with trio.testing.assert_checkpoints():
            await pool.check()
        assert pool.status().size == 0
        assert pool.get_stats()["connections_num"] == 0


async def test_refills_below_min_size_after_a_kill(postgres_server: Server, name: str) -> None:
    """Backends killed under the idle pool: the next client is not handed a dead
    connection (the pool reads each idle one's socket first), and the pool fills up
    to ``min_size`` with new backends."""
    async with contract_pool(ConnectionPool, postgres_server, name, min_size=2) as pool:
        await pool.wait(5)
        old = await backend_pids(postgres_server, name)
        await trio.to_thread.run_sync(postgres_server.terminate_backends, name)
        assert await settled_backends(postgres_server, name, 0) == 0
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
        assert await settled_backends(postgres_server, name, 2) == 2
        new = await backend_pids(postgres_server, name)
        assert not new & old
        assert pool.get_stats()["connections_lost"] == 2


async def test_resize_up_and_down(postgres_server: Server, name: str) -> None:
    """``resize`` up opens connections; down closes idle ones at once and lent
    ones as they come back."""
    async with contract_pool(ConnectionPool, postgres_server, name, min_size=1) as pool:
        await pool.resize(3)
        assert (pool.min_size, pool.max_size) == (3, 3)
        await pool.wait(5)
        assert await settled_backends(postgres_server, name, 3) == 3
        conns = [await pool.getconn() for _ in range(2)]
        await pool.resize(1)
        assert (pool.min_size, pool.max_size) == (1, 1)
        await eventually(lambda: pool.status().size == 2)  # the idle one closed, not the lent
        assert await settled_backends(postgres_server, name, 2) == 2
        for conn in conns:
            await pool.putconn(conn)
            await eventually(lambda: pool.status().size == 1)
        assert await settled_backends(postgres_server, name, 1) == 1


async def test_null_pool_resize_changes_the_limit(postgres_server: Server, name: str) -> None:
    """A null pool's ``resize`` changes ``max_size`` (clients queue past it);
    ``min_size`` stays 0."""
    async with contract_pool(NullConnectionPool, postgres_server, name, max_size=1) as pool:
        async with pool.connection():
            with pytest.raises(PoolTimeout):
                await pool.getconn(timeout=0.1)
            await pool.resize(0, 2)
            assert (pool.min_size, pool.max_size) == (0, 2)
            async with pool.connection(timeout=5) as conn:
                await conn.execute("SELECT 1")
        with pytest.raises(ValueError, match="min_size"):
            await pool.resize(1)


async def test_drain_replaces_every_connection(
    pool_cls: PoolClass, postgres_server: Server, name: str
) -> None:
    """``drain()`` while both connections are lent: they are closed on return and
    new ones serve; after that the pool is stable again."""
    async with contract_pool(
        pool_cls, postgres_server, name, min_size=min_for(pool_cls, 2), max_size=2
    ) as pool:
        await pool.wait(5)

        async def two_pids(drain: bool = False) -> set[int]:
            async with pool.connection() as a, pool.connection() as b:
                if drain:
                    await pool.drain()
                return {a.info.backend_pid, b.info.backend_pid}

        before = await two_pids(drain=True)
        after = await two_pids()
        assert len(before) == len(after) == 2 and not before & after
        if not is_null(pool_cls):
            assert await two_pids() == after


# -- statistics and status --------------------------------------------------------

GAUGES = ("pool_min", "pool_max", "pool_size", "pool_available", "requests_waiting")
COUNTERS = (
    "requests_num", "requests_queued", "requests_wait_ms", "requests_errors", "usage_ms",
    "returns_bad", "connections_num", "connections_ms", "connections_errors", "connections_lost",
)  # fmt: skip


async def test_stats_count_requests_waits_and_returns(
    pool_cls: PoolClass, postgres_server: Server, name: str
) -> None:
    """psycopg_pool's stats: gauges while clients wait; counters for requests,
    queueing, wait and usage time, timeouts, bad returns and connections;
    ``pop_stats`` resets the counters, not the gauges.  Every key is always there."""
    async with contract_pool(
        pool_cls, postgres_server, name, min_size=min_for(pool_cls, 2), max_size=2
    ) as pool:
        await pool.wait(5)
        stats = pool.get_stats()
        assert set(stats) == {*GAUGES, *COUNTERS}
        assert (stats["pool_min"], stats["pool_max"]) == (min_for(pool_cls, 2), 2)
        assert stats["pool_size"] == stats["pool_available"] == min_for(pool_cls, 2)
        held = [await pool.getconn(), await pool.getconn()]
        with pytest.raises(PoolTimeout):
            await pool.getconn(timeout=0.2)
        async with queued_client(pool) as seen:
            stats = pool.get_stats()
            assert (stats["pool_size"], stats["pool_available"]) == (2, 0)
            assert stats["requests_waiting"] == 1
            await trio.sleep(0.1)  # the held connections' usage time
            bad = held.pop()
            await bad.close()
            await pool.putconn(bad)  # comes back closed: a bad return
            await pool.putconn(held.pop())
        assert seen.pid
        await pool.wait(5)
        stats = pool.pop_stats()
        assert stats["requests_num"] == 4
        # As psycopg_pool: the null pool queues only the requests that found it at
        # max_size (the 0.2 s one and the client); the first two opened their own.
        assert stats["requests_queued"] == 2
        assert stats["requests_errors"] == 1
        assert stats["returns_bad"] == 1
        assert stats["requests_wait_ms"] >= 300  # 200 timed out + >= 100 served
        assert stats["usage_ms"] >= 200  # two connections held >= 0.1 s each
        # ConnectionPool: 2 + 1 replacing the closed one; null: at least the 2 held.
        assert stats["connections_num"] >= (2 if is_null(pool_cls) else 3)
        assert stats["connections_ms"] > 0
        assert stats["connections_errors"] == stats["connections_lost"] == 0
        after = pool.get_stats()
        assert set(stats) == set(after) == {*GAUGES, *COUNTERS}
        assert {key: after[key] for key in GAUGES} == {key: stats[key] for key in GAUGES}
        assert all(after[key] == 0 for key in after if key not in GAUGES)


async def test_status_is_a_frozen_snapshot(
    pool_cls: PoolClass, postgres_server: Server, name: str
) -> None:
    """``status()`` gives ``PoolStatus(max_size, size, available, waiting)``, frozen."""
    async with contract_pool(
        pool_cls, postgres_server, name, min_size=min_for(pool_cls, 1), max_size=1
    ) as pool:
        await pool.wait(5)
        idle = pool.status()
        expected = min_for(pool_cls, 1)
        assert idle == triopool.PoolStatus(max_size=1, size=expected, available=expected, waiting=0)
        async with pool.connection(), queued_client(pool, timeout=0.1) as seen:
            assert pool.status() == triopool.PoolStatus(1, 1, 0, 1)
        assert isinstance(seen.error, PoolTimeout)
        with pytest.raises(dataclasses.FrozenInstanceError):
            idle.size = 5  # type: ignore[misc]
