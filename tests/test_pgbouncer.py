"""Pools through a real PgBouncer (transaction pooling) in front of the real server.

Through PgBouncer, the pool's connections are PgBouncer's clients: the leak
check counts them in PgBouncer's ``SHOW CLIENTS`` (by ``application_name``),
and the server's backends are PgBouncer's, at most its ``default_pool_size``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import trio
import trio.testing
from _fault_helpers import clients_running, quiesce, serves, until
from _pool_checks import (
    Server,
    app_name,
    assert_settled,
    backends,
    pool_connections,
    settled_backends,
)

from triopool import Connection, ConnectionPool, ListenerGap
from triopool.listener import Notifications
from triopool.testing import PgBouncer

Factory = Callable[..., PgBouncer]

#: psycopg must not prepare statements behind a transaction pooler.
NO_PREPARE: dict[str, Any] = {"prepare_threshold": None}


@pytest.fixture
def name() -> str:
    return app_name("tp_bouncer")


def bouncer_pool(bouncer: PgBouncer, name: str, **options: Any) -> ConnectionPool:
    """A pool whose connections go through `bouncer`, named `name`."""
    options.setdefault("kwargs", NO_PREPARE)
    return ConnectionPool(bouncer.conninfo(application_name=name), **options)


async def bouncer_clients(bouncer: PgBouncer, name: str) -> int:
    rows = await trio.to_thread.run_sync(bouncer.admin, "SHOW CLIENTS")
    return sum(1 for row in rows if row["application_name"] == name)


async def server_connections(bouncer: PgBouncer) -> int:
    return await trio.to_thread.run_sync(bouncer.server_connections)


async def settled_through(pool: ConnectionPool, bouncer: PgBouncer, name: str) -> None:
    """The leak check through PgBouncer: the pool's books balance, and PgBouncer
    has exactly one client connection per connection the pool holds."""
    if not pool.closed:
        await quiesce(pool)
    await assert_settled(pool)
    expected = 0 if pool.closed else len(pool_connections(pool))
    with trio.move_on_after(3):
        while await bouncer_clients(bouncer, name) != expected:  # noqa: ASYNC110  # PgBouncer's state: no event to wait on
            await trio.sleep(0.02)
    assert await bouncer_clients(bouncer, name) == expected


async def repeat_query(conn: Connection[Any], times: int) -> None:  # noqa: ASYNC910  # times >= 1
    """The same parametrized query `times` times (by default psycopg prepares it
    on the 6th run, once it has run ``prepare_threshold`` = 5 times)."""
    for i in range(times):
        cur = await conn.execute("SELECT %s::int + 1", (i,))
        assert await cur.fetchone() == (i + 1,)


async def test_pool_works_with_prepare_threshold_none(
    pgbouncer_factory: Factory, name: str
) -> None:
    """Concurrent clients repeating the same queries through PgBouncer: with
    ``prepare_threshold=None`` every one succeeds, and the server runs them on at
    most ``default_pool_size`` backends."""
    bouncer = pgbouncer_factory(default_pool_size=2)
    async with bouncer_pool(bouncer, name, min_size=2, max_size=6) as pool:

        async def client() -> None:
            for _ in range(5):
                async with pool.connection() as conn:
                    await repeat_query(conn, 8)

        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(client)
        assert pool.get_stats()["requests_errors"] == 0
        assert await server_connections(bouncer) <= 2
        await settled_through(pool, bouncer, name)
    await settled_through(pool, bouncer, name)


async def test_prepared_statements_collide_without_it(
    pgbouncer_factory: Factory, name: str
) -> None:
    """Without ``prepare_threshold=None``, two client connections sharing one
    server connection both prepare ``_pg3_0``: the second fails with
    `DuplicatePreparedStatement` (PgBouncer 1.18, transaction mode).  The pool
    survives it: the failed transaction is rolled back and the connection kept."""
    bouncer = pgbouncer_factory(default_pool_size=1)
    async with bouncer_pool(bouncer, name, min_size=2, kwargs={}) as pool:
        await pool.wait(5)
        first, second = await pool.getconn(), await pool.getconn()
        try:
            await repeat_query(first, 6)
            await first.commit()
            with pytest.raises(psycopg.errors.DuplicatePreparedStatement, match="_pg3_0"):
                await repeat_query(second, 6)
        finally:
            await pool.putconn(first)  # noqa: ASYNC102  # putconn never waits
            await pool.putconn(second)  # noqa: ASYNC102  # putconn never waits
        assert pool.get_stats()["returns_bad"] == 0
        await settled_through(pool, bouncer, name)
    await settled_through(pool, bouncer, name)


async def test_check_connection_through_pgbouncer(pgbouncer_factory: Factory, name: str) -> None:
    """``check=ConnectionPool.check_connection`` and ``pool.check()`` work through
    PgBouncer, and leave the connections in their transactional mode."""
    bouncer = pgbouncer_factory()
    async with bouncer_pool(
        bouncer, name, min_size=2, check=ConnectionPool.check_connection
    ) as pool:
        await pool.wait(5)
        await pool.check()
        for _ in range(4):
            async with pool.connection() as conn:
                assert not conn.autocommit
                await conn.execute("SELECT 1")
                assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        assert pool.get_stats()["connections_num"] == 2  # none discarded
        await settled_through(pool, bouncer, name)
    await settled_through(pool, bouncer, name)


async def test_pool_larger_than_pgbouncer_pool(
    pgbouncer_factory: Factory, postgres_server: Server, name: str
) -> None:
    """Pool of 8 over a PgBouncer pool of 2: all 8 clients get a connection at
    once from the pool, their transactions queue inside PgBouncer, and the server
    never sees more than 2 backends."""
    bouncer = pgbouncer_factory(default_pool_size=2)
    async with bouncer_pool(bouncer, name, min_size=8) as pool:
        await pool.wait(5)
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(8):

                async def client() -> None:
                    async with pool.connection() as conn:
                        await conn.execute("SELECT pg_sleep(0.1)")

                nursery.start_soon(client)
        elapsed = trio.current_time() - t0
        # 8 transactions of 0.1 s, two at a time: 4 rounds.
        assert elapsed >= 0.4
        stats = pool.get_stats()
        assert stats["requests_num"] == 8 and stats["requests_queued"] == 0
        assert await server_connections(bouncer) == 2
        assert await settled_backends(postgres_server, name, 2) == 2
        await settled_through(pool, bouncer, name)
    await settled_through(pool, bouncer, name)


@pytest.mark.faults
async def test_pgbouncer_restart(pgbouncer_factory: Factory, name: str) -> None:
    """PgBouncer restarted: idle connections are dead and ``pool.check()``
    replaces them; under load, requests in flight fail with an
    `psycopg.OperationalError`, the pool replaces its connections and serves
    again right away."""
    bouncer = pgbouncer_factory()
    async with bouncer_pool(
        bouncer, name, min_size=2, max_size=4, check=ConnectionPool.check_connection
    ) as pool:
        await pool.wait(5)
        before = set(pool_connections(pool).values())
        await trio.to_thread.run_sync(bouncer.restart)
        await pool.check()
        await quiesce(pool)
        after = pool_connections(pool).values()
        assert len(after) == 2
        assert before.isdisjoint(after)
        await serves(pool)

        async with clients_running(pool, count=4, timeout=2.0) as clients:
            await until(lambda: clients.outcomes.served >= 50, 10, "served before")
            await trio.to_thread.run_sync(bouncer.restart)
            restarted = trio.current_time()
            await until(lambda: clients.outcomes.served_since(restarted) >= 50, 10, "served after")
        outcomes = clients.outcomes
        first = min(at for at in outcomes.served_at if at >= restarted)
        print(
            f"\nPgBouncer restart: first request served {first - restarted:.3f} s after;"
            f" {outcomes.summary()}"
        )
        # A connection attempt made while PgBouncer was down is retried after the
        # first reconnection delay (~1 s +-10 %).
        assert first - restarted < 1.1 + 0.9
        assert outcomes.timed_out == 0 and outcomes.closed == 0
        assert set(outcomes.errors) <= {"OperationalError"}, outcomes.summary()
        clients.assert_bounded()
        await settled_through(pool, bouncer, name)
    await settled_through(pool, bouncer, name)


async def next_payload(notifications: Notifications) -> str:
    """The payload of the next item, which must be a notification (within 10 s)."""
    with trio.fail_after(10):
        item = await anext(notifications)
    assert isinstance(item, psycopg.Notify), item
    return item.payload


def notifications_to(conn: Connection[Any]) -> list[psycopg.Notify]:
    """Record the notifications `conn` receives (psycopg's notify handler)."""
    received: list[psycopg.Notify] = []
    conn.add_notify_handler(received.append)
    return received


async def test_listener_through_transaction_mode_is_deaf_and_the_bypass(
    pgbouncer_factory: Factory, postgres_server: Server, name: str
) -> None:
    """``listener()`` through PgBouncer in transaction mode enters without error but
    listens on a *shared* server connection: a NOTIFY sent by another client on
    that server connection is delivered to that client, never to the listener.
    The documented bypass -- a listener on a pool connected straight to the
    server -- receives notifications sent through PgBouncer."""
    bouncer = pgbouncer_factory(default_pool_size=1)
    async with bouncer_pool(bouncer, name, min_size=1, max_size=1) as pool:
        async with pool.listener("tp_bounced") as notifications:
            async with pool.connection() as conn:
                received = notifications_to(conn)
                await conn.execute("NOTIFY tp_bounced, 'lost'")
                await conn.commit()
                await conn.execute("SELECT 1")  # the notification arrives with the next reply
                await conn.commit()
            # The only listening backend is the one server connection: the server
            # delivered the notification once, to the client holding it then.
            assert [(n.channel, n.payload) for n in received] == [("tp_bounced", "lost")]
            assert not notifications._buffer

            direct = ConnectionPool(
                postgres_server.conninfo(application_name=name), min_size=0, max_size=1
            )
            async with direct, direct.listener("tp_bounced") as direct_notifications:
                async with pool.connection() as conn:
                    await conn.execute("NOTIFY tp_bounced, 'bypass'")
                assert await next_payload(direct_notifications) == "bypass"
            await assert_settled(direct)
        await settled_through(pool, bouncer, name)
    await settled_through(pool, bouncer, name)


async def test_listener_through_session_mode(
    pgbouncer_factory: Factory, postgres_server: Server, name: str
) -> None:
    """In session mode PgBouncer gives the listener a server connection of its
    own: notifications arrive, and a reconnection (its server backend terminated)
    yields a gap and listens again."""
    bouncer = pgbouncer_factory(pool_mode="session")
    async with bouncer_pool(bouncer, name, min_size=0, max_size=1) as pool:
        async with pool.listener("tp_session") as notifications:
            assert await settled_backends(postgres_server, name, 1) == 1
            await trio.to_thread.run_sync(postgres_server.execute, "NOTIFY tp_session, 'one'")
            assert await next_payload(notifications) == "one"
            await trio.to_thread.run_sync(postgres_server.terminate_backends, name)
            with trio.fail_after(10):
                assert await anext(notifications) == ListenerGap("reconnected")
            await trio.to_thread.run_sync(postgres_server.execute, "NOTIFY tp_session, 'two'")
            assert await next_payload(notifications) == "two"
        assert await backends(postgres_server, name) <= 1  # PgBouncer keeps it, idle
        await settled_through(pool, bouncer, name)
    await settled_through(pool, bouncer, name)


@pytest.mark.parametrize("depth", [16, 1])
async def test_one_shot_statements_pipelined_through_transaction_mode(
    pgbouncer_factory: Factory, name: str, depth: int
) -> None:
    """One-shot statements from many callers pipelined on few connections, through
    PgBouncer in transaction mode with fewer server connections than client ones: every
    caller gets its own result (no answer goes to another), errors reach their caller
    only, and writes commit."""
    bouncer = pgbouncer_factory(default_pool_size=2)
    async with bouncer_pool(bouncer, name, min_size=3, max_size=3, pipeline_depth=depth) as pool:
        await pool.execute("DROP TABLE IF EXISTS t_bounced")
        await pool.execute("CREATE TABLE t_bounced (id int PRIMARY KEY)")
        results: dict[int, object] = {}

        async def caller(i: int) -> None:  # noqa: ASYNC910  # five rounds, each awaiting a statement
            for round_no in range(5):
                n = i * 100 + round_no
                try:
                    if n % 7 == 0:
                        results[n] = await pool.fetchval("SELECT 1 / (%s::int - %s)", (n, n))
                    elif n % 3 == 0:
                        results[n] = await pool.execute("INSERT INTO t_bounced VALUES (%s)", (n,))
                    else:
                        results[n] = await pool.fetchval("SELECT %s::int, pg_sleep(0.001)", (n,))
                except psycopg.errors.DivisionByZero:
                    results[n] = "division by zero"

        async with trio.open_nursery() as nursery:
            for i in range(30):
                nursery.start_soon(caller, i)
        for n, result in results.items():
            expected = "division by zero" if n % 7 == 0 else 1 if n % 3 == 0 else n
            assert result == expected, (n, result)
        inserted = {n for n in results if n % 7 and n % 3 == 0}
        rows = await pool.fetch("SELECT id FROM t_bounced")
        assert {row[0] for row in rows} == inserted
        await pool.execute("DROP TABLE t_bounced")
        assert await server_connections(bouncer) <= 2
        await settled_through(pool, bouncer, name)
    await settled_through(pool, bouncer, name)
