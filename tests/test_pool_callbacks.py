"""Pool contract, part 3: callbacks (configure, reset, check, reconnect_failed)
and callable ``conninfo``/``kwargs``.

Run over `ConnectionPool` and `NullConnectionPool` (``pool_cls``) against the
real server, mirroring psycopg_pool's ``tests/pool`` (see _contract_helpers).
Every log record checked here must name its pool (`pool_records`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing
from _contract_helpers import (
    AnyConnection,
    PoolClass,
    capture_pool_logs,
    contract_pool,
    eventually,
    fetch_value,
    is_null,
    min_for,
    pool_records,
    queued_client,
)
from _contract_helpers import name as name
from _contract_helpers import pool_cls as pool_cls
from _pool_checks import (
    Server,
    app_name,
    assert_no_leaks,
    assert_settled,
    pool_connections,
    settled_backends,
)
from psycopg.pq import TransactionStatus

from triopool import ConnectionPool, NullConnectionPool, PoolTimeout
from triopool._policy import SlotState
from triopool.testing import TcpProxy

# -- configure --------------------------------------------------------------------


async def test_configure_runs_once_per_new_connection(
    pool_cls: PoolClass, postgres_server: Server, name: str
) -> None:
    """``configure`` runs once on each new connection, and what it sets sticks:
    a `ConnectionPool` configures again only after a connection is replaced; a
    null pool, for every request."""
    configured = 0

    async def configure(conn: AnyConnection) -> None:
        nonlocal configured
        configured += 1
        async with conn.transaction():
            await conn.execute("SET default_transaction_read_only TO on")

    seen: list[int] = []
    async with contract_pool(
        pool_cls,
        postgres_server,
        name,
        min_size=min_for(pool_cls, 1),
        max_size=1,
        configure=configure,
    ) as pool:
        for close in (False, True, False):
            async with pool.connection() as conn:
                assert await fetch_value(conn, "SHOW default_transaction_read_only") == "on"
                seen.append(configured)
                if close:
                    await conn.close()  # the pool replaces it
    assert seen == ([1, 2, 3] if is_null(pool_cls) else [1, 1, 2])


async def configure_raises(conn: AnyConnection) -> None:
    async with conn.transaction():
        await conn.execute("WAT")


async def configure_leaves_a_transaction(conn: AnyConnection) -> None:
    await conn.execute("SELECT 1")


@pytest.mark.parametrize(
    ("configure", "logged"),
    [(configure_raises, "WAT"), (configure_leaves_a_transaction, "INTRANS")],
    ids=["raises", "intrans"],
)
async def test_configure_failure_discards_the_connection(
    pool_cls: PoolClass,
    configure: Callable[[AnyConnection], Awaitable[None]],
    logged: str,
    postgres_server: Server,
    name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A ``configure`` that raises or leaves a transaction open: the connection is
    closed, the error logged and counted as a connection error (then backoff:
    one attempt in 0.3 s), and the client times out with it as the cause."""
    capture_pool_logs(caplog)
    async with contract_pool(
        pool_cls, postgres_server, name, min_size=min_for(pool_cls, 1), configure=configure
    ) as pool:
        with pytest.raises(PoolTimeout) as info:
            await pool.getconn(timeout=0.3)
        assert logged in str(info.value.__cause__)
        assert pool.get_stats()["connections_errors"] == 1
        assert await settled_backends(postgres_server, name, 0) == 0
        assert any(logged in message for message in pool_records(caplog, pool))


# -- reset --------------------------------------------------------------------------


async def test_reset_runs_when_a_connection_comes_back(
    pool_cls: PoolClass, postgres_server: Server, name: str
) -> None:
    """``reset`` runs on a returned connection before the next client gets it; a
    null pool runs it only when a client is waiting, and otherwise closes it."""
    resets = 0

    async def reset(conn: AnyConnection) -> None:
        nonlocal resets
        resets += 1
        async with conn.transaction():
            await conn.execute("SET timezone TO utc")

    async def timezone_and_resets(conn: AnyConnection) -> object:
        return await fetch_value(conn, "SHOW timezone"), resets

    async with contract_pool(
        pool_cls, postgres_server, name, min_size=min_for(pool_cls, 1), max_size=1, reset=reset
    ) as pool:
        conn = await pool.getconn()
        pid = conn.info.backend_pid
        await conn.execute("SET timezone TO '+2:00'")
        await conn.commit()
        async with queued_client(pool, timezone_and_resets) as seen:
            assert resets == 0
            await pool.putconn(conn)
        assert (seen.pid, seen.probed) == (pid, ("UTC", 1))
        await trio.testing.wait_all_tasks_blocked()  # that client gave it back, not waited for
        assert resets == (1 if is_null(pool_cls) else 2)
        assert conn.closed is is_null(pool_cls)


async def reset_leaves_a_transaction(conn: AnyConnection) -> None:
    await conn.execute("RESET ALL")


async def reset_raises(conn: AnyConnection) -> None:
    async with conn.transaction():
        await conn.execute("WAT")


@pytest.mark.parametrize(
    ("reset", "logged"),
    [(reset_leaves_a_transaction, "not idle"), (reset_raises, "WAT")],
    ids=["intrans", "raises"],
)
async def test_reset_failure_discards_the_connection(
    pool_cls: PoolClass,
    reset: Callable[[AnyConnection], Awaitable[None]],
    logged: str,
    postgres_server: Server,
    name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A ``reset`` that raises or leaves the connection in a transaction: the
    connection is discarded (logged, a bad return) and the waiting client gets a
    new one."""
    capture_pool_logs(caplog)
    async with contract_pool(
        pool_cls, postgres_server, name, min_size=min_for(pool_cls, 1), max_size=1, reset=reset
    ) as pool:
        conn = await pool.getconn()
        pid = conn.info.backend_pid
        async with queued_client(pool) as seen:
            await pool.putconn(conn)
        assert seen.pid not in (0, pid)
        assert seen.status == TransactionStatus.IDLE
        assert pool.get_stats()["returns_bad"] >= 1
        assert any(logged in message for message in pool_records(caplog, pool))


# -- check ----------------------------------------------------------------------------


async def test_check_failure_serves_another_connection(
    pool_cls: PoolClass, postgres_server: Server, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``check`` runs before each hand-out; a connection failing it is discarded
    (logged) and the same request gets another one, well within its timeout."""
    capture_pool_logs(caplog)
    checked: list[int] = []

    async def check(conn: AnyConnection) -> None:
        await trio.lowlevel.checkpoint()
        checked.append(conn.info.backend_pid)
        if len(checked) == 1:
            raise RuntimeError("first one fails")

    async with contract_pool(
        pool_cls, postgres_server, name, min_size=min_for(pool_cls, 2), max_size=2, check=check
    ) as pool:
        await pool.wait(5)
        with trio.fail_after(2):
            async with pool.connection(timeout=5) as conn:
                pid = conn.info.backend_pid
        assert len(checked) == 2 and checked[1] == pid != checked[0]
        async with pool.connection():
            assert len(checked) == 3
        assert any("failed check" in message for message in pool_records(caplog, pool))


async def test_check_always_failing_times_out(
    pool_cls: PoolClass, postgres_server: Server, name: str
) -> None:
    """A ``check`` that always fails (leaving a transaction open): the request gets
    `PoolTimeout` at its timeout, and no connection the pool keeps is left in a
    transaction."""

    async def check(conn: AnyConnection) -> None:
        await conn.execute("SELECT 1")
        raise RuntimeError("never good enough")

    async with contract_pool(
        pool_cls, postgres_server, name, min_size=min_for(pool_cls, 1), check=check
    ) as pool:
        started = trio.current_time()
        with pytest.raises(PoolTimeout, match=r"^couldn't get a connection after"):
            await pool.getconn(timeout=0.3)
        assert 0.3 <= trio.current_time() - started < 1.5
        await trio.testing.wait_all_tasks_blocked()
        idle = [
            conn
            for slot, conn in pool_connections(pool).items()
            if pool._policy.state_of(slot) is SlotState.IDLE
        ]  # (a connection whose check was cut short may still be closing)
        assert {conn.info.transaction_status for conn in idle} <= {TransactionStatus.IDLE}


async def test_check_cancelled_by_the_caller_loses_nothing(
    pool_cls: PoolClass, postgres_server: Server, name: str
) -> None:
    """The caller's cancel scope fires during ``check``: the connection goes back
    (a `ConnectionPool` serves it again), and the next request is served."""
    hang = True

    async def check(conn: AnyConnection) -> None:
        if hang:
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()

    async with contract_pool(
        pool_cls, postgres_server, name, min_size=min_for(pool_cls, 1), max_size=1, check=check
    ) as pool:
        await pool.wait(5)
        with trio.move_on_after(0.1) as scope:
            await pool.getconn()
        assert scope.cancelled_caught
        await trio.testing.wait_all_tasks_blocked()
        assert_no_leaks(pool)
        hang = False
        async with pool.connection(timeout=5) as conn:
            await conn.execute("SELECT 1")


# -- reconnect_failed -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async", "raising"])
async def test_reconnect_failed_then_recovery(
    pool_cls: PoolClass,
    kind: str,
    postgres_server: Server,
    tcp_proxy: TcpProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With the server unreachable, ``reconnect_failed`` (sync, async, or raising:
    logged) is called with the pool after ``reconnect_timeout`` (0.3 s), and again
    as the pool keeps trying (psycopg_pool issue 370); once the server is back
    the pool connects again, serves the waiting client and refills."""
    capture_pool_logs(caplog)
    name = app_name("tp_reconnect")
    called: list[tuple[ConnectionPool, float]] = []

    def on_failure(pool: ConnectionPool) -> None:
        called.append((pool, trio.current_time()))
        if kind == "raising":
            raise RuntimeError("callback trouble")

    async def on_failure_async(pool: ConnectionPool) -> None:
        await trio.lowlevel.checkpoint()
        on_failure(pool)

    tcp_proxy.refuse_new()
    pool = pool_cls(
        f"postgresql://postgres@{tcp_proxy.host}:{tcp_proxy.port}/postgres",
        kwargs={"application_name": name},
        min_size=min_for(pool_cls, 1),
        reconnect_timeout=0.3,
        reconnect_failed=on_failure_async if kind == "async" else on_failure,
    )
    async with pool:
        started = trio.current_time()
        async with queued_client(pool, timeout=5) as seen:  # a null pool connects on demand
            await eventually(lambda: len(called) == 2, within=3)
            tcp_proxy.heal()
        assert seen.error is None and seen.pid
        assert all(pool_arg is pool for pool_arg, _ in called)
        assert 0.3 <= called[0][1] - started < 1.5
        assert called[1][1] - called[0][1] >= 0.25
        await pool.wait(5)
        messages = pool_records(caplog, pool)
        assert any("reconnection attempts failed" in message for message in messages)
        if kind == "raising":
            assert any("error in reconnect_failed" in message for message in messages)
    await assert_settled(pool, postgres_server, name)


# -- callable conninfo and kwargs ---------------------------------------------------------


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_callable_conninfo_and_kwargs_rotate(
    pool_cls: PoolClass, flavour: str, postgres_server: Server
) -> None:
    """``conninfo`` and ``kwargs`` callables (sync or async) are called for every
    new connection: after a rotation (and ``drain()``) new connections use the new
    values, e.g. a new ``application_name``."""
    names = [app_name("tp_rotate"), app_name("tp_rotate")]
    current = {"application_name": names[0]}
    calls = 0

    def conninfo() -> str:
        nonlocal calls
        calls += 1
        return postgres_server.dsn

    def kwargs() -> dict[str, Any]:
        return dict(current)

    async def conninfo_async() -> str:
        await trio.lowlevel.checkpoint()
        return conninfo()

    async def kwargs_async() -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return kwargs()

    pool = pool_cls(
        conninfo_async if flavour == "async" else conninfo,
        kwargs=kwargs_async if flavour == "async" else kwargs,
        min_size=min_for(pool_cls, 1),
        max_size=1,
    )
    async with pool:
        async with pool.connection() as conn:
            assert await fetch_value(conn, "SHOW application_name") == names[0]
        current["application_name"] = names[1]
        await pool.drain()
        async with pool.connection() as conn:
            assert await fetch_value(conn, "SHOW application_name") == names[1]
        assert calls == 2
        assert await settled_backends(postgres_server, names[0], 0) == 0
    for used in names:
        await assert_settled(pool, postgres_server, used)


async def test_failing_conninfo_callable_backs_off(
    pool_cls: PoolClass, postgres_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``conninfo`` callable that raises fails the attempt like a connection
    error: logged, counted, retried with backoff (one attempt in 0.3 s, not a busy
    loop), and the cause of the client's `PoolTimeout`."""
    capture_pool_logs(caplog)

    async def conninfo() -> str:
        await trio.lowlevel.checkpoint()
        raise RuntimeError("cannot build conninfo")

    pool = pool_cls(conninfo, min_size=min_for(pool_cls, 1))
    async with pool:
        with pytest.raises(PoolTimeout) as info:
            await pool.getconn(timeout=0.3)
        assert isinstance(info.value.__cause__, RuntimeError)
        assert pool.get_stats()["connections_errors"] == 1
        assert any("cannot build conninfo" in message for message in pool_records(caplog, pool))
    await assert_settled(pool)


def test_callables_not_called_at_construction() -> None:
    """Constructing a pool calls neither ``conninfo`` nor ``kwargs`` (no I/O before
    opening)."""

    def conninfo() -> str:
        pytest.fail("conninfo called at construction")

    def kwargs() -> dict[str, Any]:
        pytest.fail("kwargs called at construction")

    for cls in (ConnectionPool, NullConnectionPool):
        cls(conninfo, kwargs=kwargs)
