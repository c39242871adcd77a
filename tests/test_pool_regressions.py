"""Regression tests for pool bugs of issues 14 and 15 (each named by its section).

Each failed on the pool before its fix (they were first committed as strict
xfails against it).

These tests use only the public API, ``triopool.testing`` and the test fakes,
never the pool's internals: what they see of the
pool is ``status()``, ``get_stats()``, ``holders()``, and the server's
``pg_stat_activity`` by ``application_name``.  Where time must be controlled
they run `FakeServer` under ``MockClock(autojump_threshold=0)``; elsewhere the
real server, with small real timeouts.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest
import trio
import trio.testing
from _fake_server import FakeConnection, FakeServer
from _fault_helpers import cancel_after_steps, until
from _pool_checks import Server, app_name, settled_backends

from triopool import (
    ConnectionPool,
    NullConnectionPool,
    PoolStatus,
    PoolTimeout,
    open_pool,
)
from triopool.testing import PostgresServer

PoolClass = type[ConnectionPool]

#: Bound of any single wait on the real server (generous: the machine is shared).
WITHIN = 5.0


class Boom(Exception):
    """An error of the test's own, raised inside a block."""


@pytest.fixture
def name() -> str:
    """This test's ``application_name``: its backends, found on the server."""
    return app_name("tp_regress")


@pytest.fixture
def table(postgres_server: Server) -> Iterator[str]:
    """A table of this test's own, ``(x int)``, dropped afterwards."""
    table = app_name("tp_regress_t")
    postgres_server.execute(f"CREATE TABLE {table} (x int)")
    yield table
    postgres_server.execute(f"DROP TABLE {table}")


async def rows_in(server: Server, table: str) -> int:
    """Rows committed in `table`, as another session sees them."""
    rows = await trio.to_thread.run_sync(server.execute, f"SELECT count(*) FROM {table}")
    return int(str(rows[0][0]))


async def backend_pids(server: Server, name: str) -> set[int]:
    """Pids of the server's backends named `name`."""
    rows = await trio.to_thread.run_sync(
        server.execute,
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
        (name,),
    )
    return {int(str(row[0])) for row in rows}


@asynccontextmanager
async def real_pool(
    server: Server, name: str, pool_class: PoolClass = ConnectionPool, **options: Any
) -> AsyncIterator[ConnectionPool]:
    """An open pool on `server`, its backends named `name`; no connection held at
    the end, and no backend left once closed."""
    kwargs = {"application_name": name, **options.pop("kwargs", {})}
    async with pool_class(server.dsn, kwargs=kwargs, **options) as pool:
        yield pool
        await trio.testing.wait_all_tasks_blocked()
        assert pool.holders() == []
    assert await settled_backends(server, name, 0) == 0


@asynccontextmanager
async def fake_pool(
    server: FakeServer,
    pool_class: PoolClass = ConnectionPool,
    connection_class: type[FakeConnection] = FakeConnection,
    **options: Any,
) -> AsyncIterator[ConnectionPool]:
    """An open pool of fake connections; none held at the end, none open once closed."""
    pool = pool_class(kwargs={"server": server}, connection_class=connection_class, **options)
    async with pool:
        yield pool
        await trio.testing.wait_all_tasks_blocked()
        assert pool.holders() == []
    assert server.open_connections == []


def min_for(pool_class: PoolClass, wanted: int) -> int:
    """`wanted` as ``min_size`` for a `ConnectionPool`; a null pool takes only 0."""
    return 0 if issubclass(pool_class, NullConnectionPool) else wanted


both_classes = pytest.mark.parametrize(
    "pool_class", [ConnectionPool, NullConnectionPool], ids=["pool", "null"]
)


# -- issue 15 #1: close_returns inside connection() --------------------------------------


@pytest.mark.parametrize("a_raises", [True, False], ids=["A-raises", "A-succeeds"])
async def test_exit_after_close_returns_leaves_the_next_holder_alone(
    postgres_server: Server, name: str, table: str, a_raises: bool
) -> None:
    """With ``close_returns``, A's ``await conn.close()`` inside ``connection()``
    gives the connection back, and a waiting client B gets it and inserts.  A's
    block then ends (raising, or not): its exit must not touch the connection it
    no longer holds, so B's work is B's to commit (B succeeds) or roll back (B
    raises)."""
    async with real_pool(
        postgres_server, name, min_size=1, max_size=1, close_returns=True, timeout=WITHIN
    ) as pool:
        inserted, a_left = trio.Event(), trio.Event()

        async def client_b() -> None:  # noqa: ASYNC910  # pool.connection() always checkpoints
            try:
                async with pool.connection() as conn:
                    await conn.execute(f"INSERT INTO {table} VALUES (1)")
                    inserted.set()
                    await a_left.wait()
                    if a_raises:
                        return  # B commits
                    raise Boom  # B rolls back
            except Boom:
                pass

        async with trio.open_nursery() as nursery:
            try:
                async with pool.connection() as conn:
                    nursery.start_soon(client_b)
                    await trio.testing.wait_all_tasks_blocked()
                    assert pool.status().waiting == 1
                    await conn.close()  # back to the pool, and on to B
                    with trio.fail_after(WITHIN):
                        await inserted.wait()
                    if a_raises:
                        raise Boom
            except Boom:
                pass
            a_left.set()
        assert await rows_in(postgres_server, table) == (1 if a_raises else 0)


@both_classes
async def test_close_returns_inside_the_block_rolls_back(
    postgres_server: Server, name: str, table: str, pool_class: PoolClass
) -> None:
    """``insert; await conn.close()`` inside ``connection()`` with ``close_returns``,
    then leave normally: the insert is rolled back, as in any connection given
    back in a transaction, and no error reaches the user (the exit committed the
    connection the pool was already rolling back, or closing)."""
    async with real_pool(
        postgres_server,
        name,
        pool_class,
        min_size=min_for(pool_class, 1),
        max_size=1,
        close_returns=True,
        timeout=WITHIN,
    ) as pool:
        async with pool.connection() as conn:
            await conn.execute(f"INSERT INTO {table} VALUES (1)")
            await conn.close()
        await until(lambda: pool.status().available == min_for(pool_class, 1), WITHIN, "given back")
        assert await rows_in(postgres_server, table) == 0


# -- issue 15 #3: a cancelled check() ----------------------------------------------------


async def test_cancelled_check_keeps_healthy_connections(
    postgres_server: Server, name: str
) -> None:
    """``pool.check()`` cancelled at any of its checkpoints: the connection being
    checked is healthy, so it goes back to the pool, idle and not autocommit;
    none is counted lost and the backends are the same."""
    async with real_pool(postgres_server, name, min_size=2, max_size=2, timeout=WITHIN) as pool:
        await pool.wait(WITHIN)
        pids = await backend_pids(postgres_server, name)
        assert len(pids) == 2
        for k in range(200):
            with trio.CancelScope() as scope, cancel_after_steps(k, scope.cancel):
                await pool.check()
            await until(lambda: pool.status().available == 2, WITHIN, "both idle")
            assert pool.get_stats()["connections_lost"] == 0, f"cancelled after {k} steps"
            assert await backend_pids(postgres_server, name) == pids, f"k={k}"
            if not scope.cancelled_caught:
                break
        else:
            raise AssertionError("check() never completed")
        async with pool.connection() as one, pool.connection() as two:
            assert not one.autocommit
            assert not two.autocommit


# -- issue 15 #4: max_lifetime=0 ---------------------------------------------------------


@both_classes
def test_max_lifetime_zero_is_refused(pool_class: PoolClass) -> None:
    """A zero ``max_lifetime`` (every connection expired as soon as it is made)
    is refused at construction, naming the parameter."""
    with pytest.raises(ValueError, match="max_lifetime"):
        pool_class("", max_lifetime=0)


@pytest.mark.parametrize(
    "max_lifetime",
    [1e-3, 1e-12],
)
async def test_tiny_max_lifetime_still_serves(
    postgres_server: Server, name: str, max_lifetime: float
) -> None:
    """A tiny ``max_lifetime``: connections keep being replaced, yet every client
    is served, within a bound (no livelock).  (1e-12 s is less than the trio
    clock's resolution at its usual values: a connection expires the instant it
    is made, as with 0, and is closed instead of being handed out.)"""
    served = 0
    async with real_pool(
        postgres_server, name, min_size=2, max_size=4, max_lifetime=max_lifetime, timeout=WITHIN
    ) as pool:

        async def client() -> None:
            nonlocal served
            for _ in range(3):
                async with pool.connection() as conn:
                    await conn.execute("SELECT 1")
                served += 1

        with trio.fail_after(1.5):
            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(client)
    assert served == 24


# -- issue 15 #5: reconnect_timeout=0 ----------------------------------------------------

#: Past this many attempts, `StallingConnection` hangs instead of failing.
ATTEMPT_CAP = 200


class StallingConnection(FakeConnection):
    """A fake connection whose attempts hang once `ATTEMPT_CAP` were made.

    Under the autojump clock a pool retrying without ever sleeping would keep
    the clock from moving (the test would hang); stalled, it lets the clock
    jump and the test fail on the count.
    """

    @classmethod
    async def connect(  # type: ignore[override]
        cls, conninfo: str = "", *, server: FakeServer, **kwargs: Any
    ) -> FakeConnection:
        if len(server.attempts) >= ATTEMPT_CAP:
            await trio.sleep_forever()
        return await super().connect(conninfo, server=server, **kwargs)


@pytest.mark.parametrize("reconnect_timeout", [0.0, 0.001])
async def test_attempts_rate_limited_with_tiny_reconnect_timeout(
    autojump_clock: trio.testing.MockClock, reconnect_timeout: float
) -> None:
    """The server down, ``reconnect_timeout`` 0 (or tiny): after each round it
    gives up, the pool waits (~1 s) before the next, so in 10 s it makes about
    10 attempts (20 with a tiny timeout, which leaves room for one retry per
    round) and calls ``reconnect_failed`` about 10 times, not thousands."""
    server = FakeServer(down=True)
    failed: list[float] = []
    async with fake_pool(
        server,
        connection_class=StallingConnection,
        min_size=1,
        reconnect_timeout=reconnect_timeout,
        reconnect_failed=lambda pool: failed.append(trio.current_time()),
    ) as pool:
        await trio.sleep(10.0)
        errors = pool.get_stats()["connections_errors"]
    rounds = math.floor(10.0 / 0.9) + 1  # each at least the first delay, 1 s -10 %
    per_round = 1 if reconnect_timeout == 0 else 2
    assert errors <= per_round * rounds, f"{errors} failed attempts in 10 s"
    assert len(failed) <= rounds, f"reconnect_failed called {len(failed)} times in 10 s"


# -- issue 15 #6: getconn(timeout=0) -----------------------------------------------------


async def test_getconn_timeout_zero_grows_the_pool(postgres_server: Server, name: str) -> None:
    """``getconn(timeout=0)`` is served only by a connection idle now, but the pool
    grows for it (it used to raise before growing, so with ``min_size=0`` it never
    served): once the connection opened for the first request is ready, every
    next ``timeout=0`` request is served."""
    async with real_pool(postgres_server, name, min_size=0, max_size=2, timeout=WITHIN) as pool:
        with pytest.raises(PoolTimeout):
            await pool.getconn(timeout=0)
        await pool.wait(WITHIN)  # min_size 0: ready at once; wait for the connection:
        with trio.fail_after(WITHIN):  # noqa: ASYNC912  # the loop sleeps
            while pool.status().available == 0:  # noqa: ASYNC110  # the scheduler's state: no event
                await trio.sleep(0.01)
        for _ in range(20):
            conn = await pool.getconn(timeout=0)
            await pool.putconn(conn)
        await trio.testing.wait_all_tasks_blocked()
        assert pool.status().size == 1  # one connection served them all


async def test_null_pool_refuses_timeout_zero(postgres_server: Server, name: str) -> None:
    """A null pool keeps no idle connection, so ``timeout=0`` could never be
    served: it is a clear `ValueError` at once, not a `PoolTimeout` every time."""
    async with real_pool(postgres_server, name, NullConnectionPool, timeout=WITHIN) as pool:
        with pytest.raises(ValueError, match="timeout must be > 0 for a NullConnectionPool"):
            await pool.getconn(timeout=0)
        async with pool.connection(timeout=WITHIN) as conn:  # a real timeout serves
            await conn.execute("SELECT 1")


# -- issue 15 #7: maintenance before the pool is opened ----------------------------------


async def test_resize_before_open_takes_effect_once_opened(
    postgres_server: Server, name: str
) -> None:
    """``resize()`` before the pool is opened raises nothing; once opened the pool
    fills to the new ``min_size``, within the new ``max_size``."""
    pool = ConnectionPool(postgres_server.dsn, kwargs={"application_name": name}, min_size=1)
    await pool.resize(3, 4)
    assert (pool.min_size, pool.max_size) == (3, 4)
    async with pool:
        await pool.wait(WITHIN)
        assert pool.status() == PoolStatus(max_size=4, size=3, available=3, waiting=0)
        assert await settled_backends(postgres_server, name, 3) == 3
    assert await settled_backends(postgres_server, name, 0) == 0


async def test_drain_before_open_does_nothing(postgres_server: Server, name: str) -> None:
    """``drain()`` before the pool is opened does nothing but checkpoint; the pool
    then opens as usual."""
    pool = ConnectionPool(postgres_server.dsn, kwargs={"application_name": name}, min_size=2)
    with trio.testing.assert_checkpoints():
        await pool.drain()
    async with pool:
        await pool.wait(WITHIN)
        assert pool.status() == PoolStatus(max_size=2, size=2, available=2, waiting=0)
    assert await settled_backends(postgres_server, name, 0) == 0


async def test_check_before_open_does_nothing(postgres_server: Server, name: str) -> None:
    """``check()`` before the pool is opened does nothing but checkpoint; the pool
    then opens as usual."""
    pool = ConnectionPool(postgres_server.dsn, kwargs={"application_name": name}, min_size=2)
    with trio.testing.assert_checkpoints():
        await pool.check()
    async with pool:
        await pool.wait(WITHIN)
        assert pool.status() == PoolStatus(max_size=2, size=2, available=2, waiting=0)
    assert await settled_backends(postgres_server, name, 0) == 0


# -- issue 15 #8: a configure callback that hangs ----------------------------------------


async def test_hanging_configure_neither_blocks_clients_nor_lasts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``min_size=1, max_size=2`` and the first ``configure`` stuck forever: a
    client asking for a connection (timeout 2 s) is served by a second one; the
    stuck attempt fails after the pool's ``timeout`` (5 s) and counts as a
    connection error."""
    server = FakeServer()
    calls = 0

    async def configure(conn: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()

    async with fake_pool(server, min_size=1, max_size=2, timeout=5.0, configure=configure) as pool:
        opened = trio.current_time()
        async with pool.connection(timeout=2.0):
            assert trio.current_time() - opened < 2.0
            assert pool.status().size == 2
        await trio.sleep_until(opened + 5.0 + 0.1)
        assert pool.get_stats()["connections_errors"] == 1
        stuck = server.connections[0]
        assert stuck.closed_at is not None
        assert opened + 5.0 <= stuck.closed_at <= opened + 5.1


# -- issue 15 #12: the user's own ExceptionGroup -----------------------------------------


@pytest.mark.parametrize("leaves", [1, 2])
async def test_users_exception_group_leaves_the_pool_block_unchanged(  # noqa: ASYNC910  # entering the pool checkpoints
    postgres_dsn: str, leaves: int
) -> None:
    """An `ExceptionGroup` the block raises leaves ``async with pool`` as it is
    (the same object, not its single exception nor wrapped in another group):
    only the pool's own nursery groups are unwrapped."""
    group = ExceptionGroup("the user's", [Boom(leaf) for leaf in range(leaves)])
    caught: BaseException | None = None
    try:
        async with ConnectionPool(postgres_dsn, min_size=0, max_size=1):
            raise group
    except Exception as ex:  # whatever it is, compared below
        caught = ex
    assert caught is group, repr(caught)


@pytest.mark.parametrize("leaves", [1, 2])
async def test_users_exception_group_leaves_the_listener_block_unchanged(
    postgres_dsn: str, leaves: int
) -> None:
    """The same for ``async with pool.listener(...)``."""
    group = ExceptionGroup("the user's", [Boom(leaf) for leaf in range(leaves)])
    caught: BaseException | None = None
    async with ConnectionPool(postgres_dsn, min_size=0, max_size=1) as pool:
        try:
            async with pool.listener("tp_regress_group"):
                raise group
        except Exception as ex:  # whatever it is, compared below
            caught = ex
    assert caught is group, repr(caught)


# -- issue 15 #14: a check cut by the request's deadline ---------------------------------


async def test_check_cut_by_the_deadline_counts_as_lost(postgres_server: Server, name: str) -> None:
    """A ``check`` still running at the request's deadline is cut (its connection
    closed): that counts as ``connections_lost``, as a failing check does, not as
    ``returns_bad``, and adds no ``usage_ms`` (no user had the connection)."""
    slow = True

    async def check(conn: Any) -> None:
        nonlocal slow
        if slow:
            slow = False
            await conn.execute("SELECT pg_sleep(0.5)")
        await ConnectionPool.check_connection(conn)

    async with real_pool(
        postgres_server, name, min_size=1, max_size=1, check=check, timeout=WITHIN
    ) as pool:
        await pool.wait(WITHIN)
        pool.pop_stats()
        with pytest.raises(PoolTimeout):
            await pool.getconn(timeout=0.2)
        await trio.testing.wait_all_tasks_blocked()  # the scheduler's turn
        stats = pool.get_stats()
        assert (stats["connections_lost"], stats["returns_bad"], stats["usage_ms"]) == (1, 0, 0)
        await pool.wait(WITHIN)  # replaced


# -- issue 14 #4: psycopg_pool's stats definitions ---------------------------------------


@both_classes
async def test_failed_attempts_count_in_connections_num(
    autojump_clock: trio.testing.MockClock, pool_class: PoolClass
) -> None:
    """``connections_num`` counts connection attempts, failed ones included
    (psycopg_pool); ``connections_errors`` the failed ones."""
    server = FakeServer(down=True)
    async with fake_pool(
        server, pool_class, min_size=min_for(pool_class, 1), max_size=1, timeout=20.0
    ) as pool:
        async with trio.open_nursery() as nursery:

            async def client() -> None:
                async with pool.connection():
                    pass

            nursery.start_soon(client)
            await trio.sleep(3.5)  # attempts at 0, ~1 and ~3 s
            server.down = False
        stats = pool.get_stats()
    assert len(server.attempts) == 4
    assert (stats["connections_num"], stats["connections_errors"]) == (4, 3)


async def test_null_pool_wait_counts_its_test_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``NullConnectionPool.wait()`` opens one test connection: it counts in
    ``connections_num`` and ``connections_ms``."""
    server = FakeServer(connect_delay=0.25)
    async with fake_pool(server, NullConnectionPool) as pool:
        await pool.wait()
        await trio.testing.wait_all_tasks_blocked()  # the scheduler's turn
        stats = pool.get_stats()
    assert len(server.attempts) == 1
    assert (stats["connections_num"], stats["connections_ms"]) == (1, 250)


@pytest.mark.parametrize("max_size", [0, 1])
async def test_null_pool_request_opening_its_own_connection_is_not_queued(
    autojump_clock: trio.testing.MockClock, max_size: int
) -> None:
    """A null-pool request that opens its own connection at once is not queued:
    not in ``requests_queued``, nor in ``status().waiting`` or
    ``requests_waiting`` while its connection opens.  One that must wait for a
    connection (``max_size`` reached) is, in all three."""
    server = FakeServer(connect_delay=1.0)
    async with fake_pool(server, NullConnectionPool, max_size=max_size) as pool:
        got, release = trio.Event(), trio.Event()

        async def client(got: trio.Event) -> None:
            async with pool.connection():
                got.set()
                await release.wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client, got)
            await trio.sleep(0.5)  # its connection is opening
            assert pool.status().waiting == 0
            assert pool.get_stats()["requests_waiting"] == 0
            await got.wait()
            assert pool.get_stats()["requests_queued"] == 0
            if max_size:
                nursery.start_soon(client, trio.Event())
                await trio.testing.wait_all_tasks_blocked()
                assert pool.status().waiting == 1
                assert pool.get_stats()["requests_waiting"] == 1
            release.set()
        assert pool.get_stats()["requests_queued"] == (1 if max_size else 0)


# -- issue 14 #6: failover without storms ------------------------------------------------


async def test_one_terminated_backend_costs_one_connection(
    postgres_server: Server, name: str
) -> None:
    """``pg_terminate_backend`` of one lent backend: once the pool settles, it has
    made exactly one new connection, and the other backends are the same."""
    async with real_pool(postgres_server, name, min_size=3, max_size=3, timeout=WITHIN) as pool:
        await pool.wait(WITHIN)
        before = await backend_pids(postgres_server, name)
        assert len(before) == 3
        made = pool.get_stats()["connections_num"]
        with pytest.raises(psycopg.OperationalError):
            async with pool.connection() as conn:
                victim = conn.info.backend_pid
                await trio.to_thread.run_sync(
                    postgres_server.execute, "SELECT pg_terminate_backend(%s)", (victim,)
                )
                await until(lambda: gone(postgres_server, victim), WITHIN, "backend gone")
                await conn.execute("SELECT 1")

        async def settled() -> bool:
            pids = await backend_pids(postgres_server, name)
            return pool.status() == PoolStatus(3, 3, 3, 0) and len(pids) == 3

        await until(settled, WITHIN, "back to 3 idle connections")
        after = await backend_pids(postgres_server, name)
        assert pool.get_stats()["connections_num"] - made == 1
        assert after >= before - {victim}


async def gone(server: Server, pid: int) -> bool:
    """Has backend `pid` exited?"""
    rows = await trio.to_thread.run_sync(
        server.execute, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)
    )
    return rows == []


@pytest.mark.faults
async def test_no_dead_connection_handed_out_after_a_restart(
    private_server: PostgresServer, name: str
) -> None:
    """After a server restart, once the server is back, every client's first query
    succeeds: the connections the restart killed are not handed out."""
    errors: list[BaseException] = []
    async with real_pool(private_server, name, min_size=2, max_size=4, timeout=WITHIN) as pool:
        await pool.wait(WITHIN)
        await trio.to_thread.run_sync(private_server.restart)

        async def client() -> None:  # noqa: ASYNC910  # pool.connection() always checkpoints
            try:
                async with pool.connection() as conn:
                    await conn.execute("SELECT 1")
            except psycopg.OperationalError as ex:
                errors.append(ex)

        with trio.fail_after(WITHIN):
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(client)
        assert errors == []


# -- siblings: a user callback raising BaseException ----------------------------------


class Stop(BaseException):
    """Not an Exception: as KeyboardInterrupt or SystemExit would be."""


async def test_base_exception_from_configure_while_waiting_to_open(
    postgres_server: Server, name: str
) -> None:
    """A ``configure`` raising a BaseException while ``open_pool(wait=True)`` waits:
    that exception comes out alone (it used to come out in a group with the
    `PoolClosed` the wait then raised: Ctrl-C during a bench's start-up)."""

    async def configure(conn: Any) -> None:
        await trio.lowlevel.checkpoint()
        raise Stop

    with pytest.raises(Stop):
        async with open_pool(
            postgres_server.dsn,
            kwargs={"application_name": name},
            min_size=1,
            configure=configure,
            wait=True,
        ):
            pytest.fail("opened")
    assert await settled_backends(postgres_server, name, 0) == 0
