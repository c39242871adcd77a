"""Pool contract, part 2: getting and giving back connections, queueing, timeouts.

Run over `ConnectionPool` and `NullConnectionPool` (``pool_cls``) against the
real server, mirroring psycopg_pool's ``tests/pool`` (see _contract_helpers).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any, cast

import psycopg
import pytest
import trio
import trio.testing
from _contract_helpers import (
    AnyConnection,
    PoolClass,
    Seen,
    contract_pool,
    eventually,
    fetch_value,
    is_null,
    min_for,
    queued_client,
    terminate,
    wait_queued,
)
from _contract_helpers import name as name
from _contract_helpers import pool_cls as pool_cls
from _pool_checks import Server
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row

import triopool
from triopool import ConnectionPool, PoolTimeout, TooManyRequests
from triopool.testing import TcpProxy

# -- connections and what comes back ---------------------------------------------


class MyConnection(triopool.Connection[Any]):
    """A user's connection class."""


async def test_connection_class_and_kwargs(
    pool_cls: PoolClass, postgres_server: Server, name: str
) -> None:
    """Connections are of ``connection_class``, opened with ``kwargs``."""
    async with contract_pool(
        pool_cls,
        postgres_server,
        name,
        min_size=min_for(pool_cls, 1),
        connection_class=MyConnection,
        kwargs={"autocommit": True, "row_factory": dict_row},
    ) as pool:
        async with pool.connection() as conn:
            assert isinstance(conn, MyConnection)
            assert conn.autocommit
            cur = await conn.execute("SHOW application_name")
            assert await cur.fetchone() == {"application_name": name}


@pytest.mark.parametrize("autocommit", [False, True])
async def test_commit_on_success_rollback_on_error(
    pool_cls: PoolClass, autocommit: bool, postgres_server: Server, name: str
) -> None:
    """``connection()`` commits a successful block and rolls back a failed one;
    with autocommit each statement stands on its own."""
    table = f"tp_contract_{uuid.uuid4().hex[:8]}"
    async with contract_pool(
        pool_cls,
        postgres_server,
        name,
        min_size=min_for(pool_cls, 1),
        kwargs={"autocommit": autocommit},
    ) as pool:
        async with pool.connection() as conn:
            await conn.execute(f"CREATE TABLE {table} (x int)")
        with pytest.raises(ZeroDivisionError):
            async with pool.connection() as conn:
                await conn.execute(f"INSERT INTO {table} VALUES (1)")
                raise ZeroDivisionError
        async with pool.connection() as conn:
            await conn.execute(f"INSERT INTO {table} VALUES (2)")
        async with pool.connection() as conn:
            rows = await fetch_value(conn, f"SELECT array_agg(x ORDER BY x) FROM {table}")
            await conn.execute(f"DROP TABLE {table}")
    assert rows == ([1, 2] if autocommit else [2])


async def test_connections_are_reused_or_not(
    pool_cls: PoolClass, postgres_server: Server, name: str
) -> None:
    """A `ConnectionPool` serves the same backends again, even after an error in
    the block; a null pool opens a new one for each request."""
    async with contract_pool(
        pool_cls, postgres_server, name, min_size=min_for(pool_cls, 2), max_size=2
    ) as pool:
        async with pool.connection() as a, pool.connection() as b:
            first = {a.info.backend_pid, b.info.backend_pid}
        with pytest.raises(ZeroDivisionError):
            async with pool.connection() as conn:
                pid = conn.info.backend_pid
                raise ZeroDivisionError
        async with pool.connection() as conn:
            again = conn.info.backend_pid
        if is_null(pool_cls):
            assert len({*first, pid, again}) == 4
        else:
            assert pid in first and again == pid


async def test_returned_connection_closed_or_kept(
    pool_cls: PoolClass, postgres_server: Server, name: str
) -> None:
    """After the block a `ConnectionPool`'s connection stays open in the pool; a
    null pool's is closed (once its actor ran: closing is asynchronous)."""
    async with contract_pool(
        pool_cls, postgres_server, name, min_size=min_for(pool_cls, 1)
    ) as pool:
        async with pool.connection() as conn:
            pass
        await trio.testing.wait_all_tasks_blocked()
        assert conn.closed is is_null(pool_cls)


async def test_putconn_of_a_connection_not_lent(
    pool_cls: PoolClass, postgres_server: Server, name: str
) -> None:
    """``putconn`` of a connection the pool has not lent (another pool's, one from
    no pool, one already given back) is a `ValueError`, and harmless."""
    size = min_for(pool_cls, 1)
    async with (
        contract_pool(pool_cls, postgres_server, name, min_size=size) as one,
        contract_pool(pool_cls, postgres_server, f"{name}_other", min_size=size) as other,
    ):
        conn = await one.getconn()
        with pytest.raises(ValueError, match="not lent"):
            await other.putconn(conn)
        async with await triopool.Connection.connect(postgres_server.dsn) as foreign:
            with pytest.raises(ValueError, match="not lent"):
                await one.putconn(foreign)
            assert not foreign.closed
        await one.putconn(conn)
        with pytest.raises(ValueError, match="not lent"):
            await one.putconn(conn)
        async with one.connection() as again:  # still serving
            await again.execute("SELECT 1")


async def make_state(
    state: str, conn: AnyConnection, pool: ConnectionPool, server: Server, table: str
) -> None:
    """Give `conn` back to `pool` in `state`."""
    if state == "intrans":
        await conn.execute(f"CREATE TABLE {table} ()")
        assert conn.info.transaction_status == TransactionStatus.INTRANS
    elif state == "inerror":
        with pytest.raises(psycopg.errors.SyntaxError):
            await conn.execute("WAT")
        assert conn.info.transaction_status == TransactionStatus.INERROR
    elif state == "inerror_dead":  # the pool's rollback will fail
        with pytest.raises(psycopg.errors.SyntaxError):
            await conn.execute("WAT")
        await terminate(server, conn.info.backend_pid)
    elif state == "mid_stream":
        stream = conn.cursor().stream("SELECT generate_series(1, 100000)")
        async with aclosing(cast(AsyncGenerator[Any, None], stream)) as rows:
            await anext(rows)
            assert conn.info.transaction_status == TransactionStatus.ACTIVE
            await pool.putconn(conn)
        return
    elif state == "mid_copy":
        query = "COPY (SELECT generate_series(1, 100000)) TO STDOUT"
        async with conn.cursor().copy(query) as copy:
            await copy.read_row()
            assert conn.info.transaction_status == TransactionStatus.ACTIVE
            await pool.putconn(conn)
        return
    elif state == "closed":
        await conn.close()
    else:
        assert state == "broken"
        await terminate_self(conn)
    await pool.putconn(conn)


async def terminate_self(conn: AnyConnection) -> None:
    """Kill `conn`'s backend from the connection itself: it comes back broken."""
    with pytest.raises(psycopg.errors.AdminShutdown):
        await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
    assert conn.broken


@pytest.mark.parametrize(
    "state", ["intrans", "inerror", "inerror_dead", "mid_stream", "mid_copy", "closed", "broken"]
)
async def test_returned_states(
    pool_cls: PoolClass, state: str, postgres_server: Server, name: str
) -> None:
    """A connection given back in a transaction (INTRANS/INERROR) is rolled back
    and serves the next client; one given back ACTIVE (mid-``stream()``, mid-COPY),
    closed or broken, or whose rollback fails, is discarded (a bad return) and
    the client gets a new one."""
    table = f"tp_contract_{uuid.uuid4().hex[:8]}"

    async def table_exists(conn: AnyConnection) -> object:
        return await fetch_value(conn, f"SELECT to_regclass('{table}') IS NOT NULL")

    async with contract_pool(
        pool_cls, postgres_server, name, min_size=min_for(pool_cls, 1), max_size=1
    ) as pool:
        conn = await pool.getconn()
        pid = conn.info.backend_pid
        seen: Seen
        async with queued_client(pool, table_exists) as seen:
            await make_state(state, conn, pool, postgres_server, table)
        assert seen.error is None and seen.status == TransactionStatus.IDLE
        assert seen.probed is False  # the CREATE TABLE was rolled back
        kept = state in ("intrans", "inerror")
        assert (seen.pid == pid) is kept
        assert pool.get_stats()["returns_bad"] == (0 if kept else 1)


@pytest.mark.parametrize("autocommit", [False, True])
async def test_check_connection(
    pool_cls: PoolClass, autocommit: bool, postgres_server: Server, name: str
) -> None:
    """``check_connection`` passes a live connection (left idle, autocommit as it
    was) and raises on a dead one, which ends closed."""
    async with await triopool.Connection.connect(
        postgres_server.dsn, autocommit=autocommit, application_name=name
    ) as conn:
        await pool_cls.check_connection(conn)
        assert conn.info.transaction_status == TransactionStatus.IDLE
        assert conn.autocommit is autocommit
        await terminate(postgres_server, conn.info.backend_pid)
        with pytest.raises(psycopg.OperationalError):
            await pool_cls.check_connection(conn)
        assert conn.closed


async def kill_the_next_but_one(pool: ConnectionPool, server: Server) -> tuple[int, int]:
    """Leave two idle connections, the second to be served killed; return (alive, dead)."""
    async with pool.connection() as first:
        async with pool.connection() as second:
            dead = second.info.backend_pid
        alive = first.info.backend_pid
    await terminate(server, dead)
    return alive, dead


async def test_killed_idle_connection_not_served_even_without_check(
    postgres_server: Server, name: str
) -> None:
    """Without a ``check`` too, a connection whose backend ended while idle is not
    handed out: the pool reads its socket first (no round trip), finds the end of
    the stream, counts it lost and serves another connection."""
    async with contract_pool(ConnectionPool, postgres_server, name, min_size=2) as pool:
        await pool.wait(5)
        alive, dead = await kill_the_next_but_one(pool, postgres_server)
        async with pool.connection() as a, pool.connection() as b:
            await a.execute("SELECT 1")
            await b.execute("SELECT 1")
            pids = {a.info.backend_pid, b.info.backend_pid}
        assert alive in pids
        assert dead not in pids
        assert pool.get_stats()["connections_lost"] == 1


@pytest.mark.parametrize("autocommit", [False, True])
async def test_check_never_hands_out_a_connection_killed_while_idle(
    autocommit: bool, postgres_server: Server, name: str
) -> None:
    """With ``check=check_connection`` the dead connection is discarded and the
    client gets a live one, idle and autocommit as configured."""
    async with contract_pool(
        ConnectionPool,
        postgres_server,
        name,
        min_size=2,
        kwargs={"autocommit": autocommit},
        check=ConnectionPool.check_connection,
    ) as pool:
        await pool.wait(5)
        alive, dead = await kill_the_next_but_one(pool, postgres_server)
        conns = [await pool.getconn(), await pool.getconn()]
        for conn in conns:
            assert conn.info.transaction_status == TransactionStatus.IDLE
            assert conn.autocommit is autocommit
            await conn.execute("SELECT 1")
            await pool.putconn(conn)
        pids = {conn.info.backend_pid for conn in conns}
        assert alive in pids and dead not in pids


# -- queueing -------------------------------------------------------------------------


async def test_fifo_with_many_waiters(
    pool_cls: PoolClass, postgres_server: Server, name: str
) -> None:
    """Twenty clients queued for one busy connection are served strictly in
    arrival order (a second connection stays lent throughout); one cancelled by
    its own scope while queued leaves the queue and the order of the others."""
    served: list[int] = []
    scopes = [trio.CancelScope() for _ in range(20)]

    async def client(i: int) -> None:
        with scopes[i]:
            async with pool.connection() as conn:
                served.append(i)
                await conn.execute("SELECT 1")

    async with contract_pool(
        pool_cls, postgres_server, name, min_size=min_for(pool_cls, 2), max_size=2
    ) as pool:
        held, circulating = await pool.getconn(), await pool.getconn()
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(client, i)
                await wait_queued(pool, i + 1)
            scopes[7].cancel()
            await wait_queued(pool, 19)
            await pool.putconn(circulating)
        assert scopes[7].cancelled_caught
        assert served == [i for i in range(20) if i != 7]
        await pool.putconn(held)


async def test_max_waiting_refuses_at_once(
    pool_cls: PoolClass, postgres_server: Server, name: str
) -> None:
    """With ``max_waiting=2`` and two clients queued, a third request fails at
    once with `TooManyRequests` naming the pool; the queued ones are served."""
    async with contract_pool(
        pool_cls,
        postgres_server,
        name,
        min_size=min_for(pool_cls, 1),
        max_size=1,
        max_waiting=2,
        timeout=30,
    ) as pool:
        conn = await pool.getconn()
        async with queued_client(pool) as a, queued_client(pool) as b:
            started = trio.current_time()
            message = re.escape(f"{pool.name!r} has already 2 requests")
            with pytest.raises(TooManyRequests, match=message):
                await pool.getconn()
            assert trio.current_time() - started < 0.1
            await pool.putconn(conn)
        assert a.pid and b.pid and a.error is None and b.error is None
        assert pool.get_stats()["requests_errors"] == 1


async def test_timeouts_pool_and_per_call(
    pool_cls: PoolClass, postgres_server: Server, name: str
) -> None:
    """The pool's ``timeout`` (0.2 s) bounds a wait, with psycopg_pool's message; a
    per-call ``timeout`` overrides it, shorter or longer."""
    async with contract_pool(
        pool_cls, postgres_server, name, min_size=min_for(pool_cls, 1), max_size=1, timeout=0.2
    ) as pool:
        conn = await pool.getconn()
        for call_timeout, words in [(None, "0.20"), (0.3, "0.30")]:
            started = trio.current_time()
            with pytest.raises(PoolTimeout, match=rf"^couldn't get a connection after {words} sec"):
                async with pool.connection(call_timeout):
                    pytest.fail("served while the only connection is lent")
            waited = trio.current_time() - started
            assert float(words) <= waited < float(words) + 1.0
        with pytest.raises(PoolTimeout, match=r"after 0\.10 sec"):
            await pool.getconn(timeout=0.1)

        async def give_back_later() -> None:
            await trio.sleep(0.4)  # longer than the pool's timeout
            await pool.putconn(conn)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(give_back_later)
            async with pool.connection(timeout=5) as again:
                await again.execute("SELECT 1")


async def test_getconn_timeout_zero(
    pool_cls: PoolClass, postgres_server: Server, name: str
) -> None:
    """``getconn(timeout=0)`` serves an idle connection if there is one and never
    waits: with none idle it is `PoolTimeout` at once.  A null pool keeps no idle
    connection, so it refuses ``timeout=0`` with a clear ValueError."""
    async with contract_pool(
        pool_cls, postgres_server, name, min_size=min_for(pool_cls, 1), max_size=1
    ) as pool:
        await pool.wait(5)
        if is_null(pool_cls):
            with pytest.raises(ValueError, match="timeout must be > 0 for a NullConnectionPool"):
                await pool.getconn(timeout=0)
            return
        held = await pool.getconn(timeout=0)  # triopool: served (psycopg_pool times out)
        started = trio.current_time()
        with pytest.raises(PoolTimeout, match=r"after 0\.00 sec"):
            await pool.getconn(timeout=0)
        assert trio.current_time() - started < 0.1
        await pool.putconn(held)


async def test_timed_out_waiter_loses_nothing(
    pool_cls: PoolClass, postgres_server: Server, name: str
) -> None:
    """A client in the middle of the queue times out; those around it are served,
    in order, and no connection is lost (psycopg_pool's ``test_dead_client``)."""
    async with contract_pool(
        pool_cls, postgres_server, name, min_size=min_for(pool_cls, 2), max_size=2
    ) as pool:
        held = [await pool.getconn(), await pool.getconn()]
        async with (
            queued_client(pool, timeout=5) as a,
            queued_client(pool, timeout=5) as b,
            queued_client(pool, timeout=0.1) as impatient,
            queued_client(pool, timeout=5) as c,
        ):
            await impatient.done.wait()
            assert isinstance(impatient.error, PoolTimeout)
            assert pool.status().waiting == 3
            for conn in held:
                await pool.putconn(conn)
        assert all(seen.pid and seen.error is None for seen in (a, b, c))
        expected = 0 if is_null(pool_cls) else 2
        await eventually(lambda: pool.status().size == expected)


async def test_outer_cancel_scope_bounds_the_wait(
    pool_cls: PoolClass, postgres_server: Server, name: str
) -> None:
    """The caller's cancel scope bounds a wait the pool's ``timeout`` (30 s) would
    not: the client leaves the queue, and the pool serves the next one."""
    async with contract_pool(
        pool_cls, postgres_server, name, min_size=min_for(pool_cls, 1), max_size=1, timeout=30
    ) as pool:
        conn = await pool.getconn()
        pid = conn.info.backend_pid
        started = trio.current_time()
        with trio.move_on_after(0.2) as scope:
            await pool.getconn()
        assert scope.cancelled_caught
        assert 0.2 <= trio.current_time() - started < 1.0
        with pytest.raises(trio.TooSlowError), trio.fail_after(0.1):
            async with pool.connection():
                pytest.fail("served while the only connection is lent")
        await trio.testing.wait_all_tasks_blocked()  # the scheduler's turn
        assert pool.status().waiting == 0
        async with queued_client(pool) as seen:
            await pool.putconn(conn)
        assert seen.pid == pid


async def test_cancelling_a_crowded_queue(
    pool_cls: PoolClass, postgres_server: Server, name: str
) -> None:
    """Nine clients on three connections, all cancelled at once (psycopg_pool
    issue 509): nothing is left waiting or lent, and the pool serves."""
    async with contract_pool(
        pool_cls, postgres_server, name, min_size=min_for(pool_cls, 3), max_size=3
    ) as pool:
        await pool.wait(5)

        async def client() -> None:
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
                await trio.sleep_forever()

        async with trio.open_nursery() as nursery:
            for _ in range(9):
                nursery.start_soon(client)
            await eventually(lambda: len(pool.holders()) == 3 and pool.status().waiting == 6)
            nursery.cancel_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        stats = pool.get_stats()
        assert stats["requests_waiting"] == 0
        assert stats["pool_available"] == min_for(pool_cls, 3)
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")


async def test_waiter_cancelled_right_after_its_grant(
    pool_cls: PoolClass, postgres_server: Server, name: str
) -> None:
    """A client cancelled after a connection was assigned to it but before it ran
    (psycopg_pool's ``test_cancelled_waiter_assigned_conn_is_reclaimed``): the
    connection comes back, not lost and not lent twice."""
    async with contract_pool(
        pool_cls, postgres_server, name, min_size=min_for(pool_cls, 1), max_size=1
    ) as pool:
        conn = await pool.getconn()
        pid = conn.info.backend_pid
        got: list[int] = []
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def client() -> None:
                with scope:
                    async with pool.connection() as mine:
                        got.append(mine.info.backend_pid)
                        await trio.sleep_forever()

            nursery.start_soon(client)
            await wait_queued(pool, 1)
            await pool.putconn(conn)  # assigned to the client: it is rescheduled...
            scope.cancel()  # ...and cancelled before it runs
        assert got in ([], [pid])
        await trio.testing.wait_all_tasks_blocked()
        assert pool.holders() == [] and pool.status().waiting == 0
        async with pool.connection(timeout=2) as again:
            if not is_null(pool_cls):
                assert again.info.backend_pid == pid  # the same one, back in the pool


async def test_hanging_connect_does_not_stretch_the_wait(
    pool_cls: PoolClass, postgres_server: Server, tcp_proxy: TcpProxy, name: str
) -> None:
    """With the network blackholed, a request needing a new connection still gets
    `PoolTimeout` at its timeout; once the network heals the pool serves."""
    async with contract_pool(
        pool_cls,
        postgres_server,
        name,
        min_size=0,
        max_size=1,
        kwargs={"host": tcp_proxy.host, "port": tcp_proxy.port},
    ) as pool:
        tcp_proxy.blackhole()
        started = trio.current_time()
        with pytest.raises(PoolTimeout, match=r"after 0\.30 sec"):
            await pool.getconn(timeout=0.3)
        assert 0.3 <= trio.current_time() - started < 1.0
        tcp_proxy.heal()
        async with pool.connection(timeout=5) as conn:
            await conn.execute("SELECT 1")


# -- close_returns ----------------------------------------------------------------------


async def test_close_returns(pool_cls: PoolClass, postgres_server: Server, name: str) -> None:
    """With ``close_returns=True`` (and a connection subclass), ``conn.close()``
    gives a `ConnectionPool`'s connection back instead of closing it; for a null
    pool giving back means closing.  Closing inside ``connection()`` is no double
    return."""
    async with contract_pool(
        pool_cls,
        postgres_server,
        name,
        min_size=min_for(pool_cls, 2),
        max_size=2,
        close_returns=True,
        connection_class=MyConnection,
    ) as pool:
        await pool.wait(5)
        conn = await pool.getconn()
        assert pool.status().available == min_for(pool_cls, 1)
        await conn.close()
        await trio.testing.wait_all_tasks_blocked()
        assert pool.holders() == []
        assert conn.closed is is_null(pool_cls)
        assert pool.status().available == min_for(pool_cls, 2)
        async with pool.connection() as conn:
            await conn.close()
        assert pool.get_stats()["returns_bad"] == 0
    assert conn.closed


async def test_close_returns_past_max_lifetime(postgres_server: Server, name: str) -> None:
    """With ``close_returns``, closing a connection past its lifetime gives it back
    and the pool really closes it (no close/return loop) and replaces it."""
    async with contract_pool(
        ConnectionPool, postgres_server, name, min_size=1, close_returns=True, max_lifetime=0.2
    ) as pool:
        conn = await pool.getconn()
        pid = conn.info.backend_pid
        await trio.sleep(0.25)  # past its lifetime
        await conn.close()
        await eventually(lambda: conn.closed)
        async with pool.connection() as again:
            assert again.info.backend_pid != pid
