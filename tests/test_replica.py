"""Pools over a real primary and its streaming standby: libpq's host selection
(``target_session_attrs``, ``load_balance_hosts``) through the pool, and a real
failover (primary stopped, standby promoted) under load.

One primary/standby pair serves the module; the failover test destroys a pair
of its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
import trio
from _fault_helpers import settle, until
from _pool_checks import app_name, assert_settled, backends, settled_backends

from triopool import Connection, ConnectionPool, ListenerGap, NullConnectionPool, PoolTimeout
from triopool.testing import PostgresServer, StandbyServer, multi_host_conninfo
from triopool.testing.pytest_plugin import started_replica_pair

Pair = tuple[PostgresServer, StandbyServer]

#: Reported by every probe: is the server a standby, is the session read-only, its port.
PROBE = "SELECT pg_is_in_recovery(), current_setting('transaction_read_only'), inet_server_port()"


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    """The module's primary and standby (not to be stopped or promoted)."""
    with started_replica_pair() as servers:
        yield servers


@pytest.fixture
def name() -> str:
    return app_name("tp_replica")


@dataclass(frozen=True)
class Probe:
    """Where a connection landed."""

    in_recovery: bool
    read_only: bool
    port: int


async def probe(conn: Connection[Any]) -> Probe:
    cur = await conn.execute(PROBE)
    row = await cur.fetchone()
    assert row is not None
    in_recovery, read_only, port = row
    return Probe(bool(in_recovery), read_only == "on", int(port))


async def probe_every_connection(pool: ConnectionPool) -> list[Probe]:
    """Take every connection of a pool filled to ``min_size`` at once; probe each."""
    await pool.wait(10)
    conns = [await pool.getconn() for _ in range(pool.min_size)]
    try:
        return [await probe(conn) for conn in conns]
    finally:
        for conn in conns:
            await pool.putconn(conn)  # noqa: ASYNC102  # putconn never waits


@pytest.mark.parametrize(
    ("attrs", "standby_first", "lands_on_standby"),
    [
        ("read-write", True, False),
        ("primary", True, False),
        ("read-only", False, True),
        ("standby", False, True),
        ("prefer-standby", False, True),
        ("any", True, True),  # the first host that answers
    ],
)
async def test_target_session_attrs_select_the_server(
    pair: Pair, name: str, attrs: str, standby_first: bool, lands_on_standby: bool
) -> None:
    """Every connection of the pool lands on the server ``target_session_attrs``
    asks for, skipping a first host of the wrong kind; the other server never
    sees one of them."""
    primary, standby = pair
    hosts = (standby, primary) if standby_first else (primary, standby)
    conninfo = multi_host_conninfo(*hosts, target_session_attrs=attrs, application_name=name)
    chosen, other = (standby, primary) if lands_on_standby else (primary, standby)
    async with ConnectionPool(conninfo, min_size=3) as pool:
        probes = await probe_every_connection(pool)
        assert probes == [Probe(lands_on_standby, lands_on_standby, chosen.port)] * 3
        assert await backends(other, name) == 0
        await assert_settled(pool, chosen, name)
    await assert_settled(pool, chosen, name)


async def test_prefer_standby_falls_back_and_standby_refuses_without_one(
    pair: Pair, name: str
) -> None:
    """With no standby among the hosts, ``prefer-standby`` connects to the primary
    and ``standby`` cannot connect at all (`PoolTimeout` from ``wait``, with the
    connection error as its cause)."""
    primary, _ = pair
    hosts = (primary, primary)
    prefer = multi_host_conninfo(*hosts, target_session_attrs="prefer-standby")
    async with ConnectionPool(prefer, min_size=2, kwargs={"application_name": name}) as pool:
        probes = await probe_every_connection(pool)
        assert probes == [Probe(False, False, primary.port)] * 2
        await assert_settled(pool, primary, name)
    refused = multi_host_conninfo(*hosts, target_session_attrs="standby")
    async with ConnectionPool(refused, min_size=1, kwargs={"application_name": name}) as pool:
        with pytest.raises(PoolTimeout) as info:
            await pool.wait(0.5)
        assert isinstance(info.value.__cause__, psycopg.OperationalError)
    await assert_settled(pool, primary, name)


@pytest.mark.parametrize("balance", ["random", "disable"])
async def test_load_balance_hosts(pair: Pair, name: str, balance: str) -> None:
    """``load_balance_hosts=random`` spreads a pool's new connections over both
    servers; ``disable`` (the default) puts them all on the first host.

    With 16 connections, a random spread misses a server with probability 2**-15.
    """
    primary, standby = pair
    conninfo = multi_host_conninfo(
        primary, standby, load_balance_hosts=balance, application_name=name
    )
    async with ConnectionPool(conninfo, min_size=16) as pool:
        probes = await probe_every_connection(pool)
        on_primary = sum(1 for p in probes if p == Probe(False, False, primary.port))
        on_standby = sum(1 for p in probes if p == Probe(True, True, standby.port))
        assert on_primary + on_standby == 16
        if balance == "random":
            assert on_primary > 0 and on_standby > 0
        else:
            assert on_standby == 0
        # The server's view agrees.
        assert await settled_backends(primary, name, on_primary) == on_primary
        assert await settled_backends(standby, name, on_standby) == on_standby
    await assert_settled(pool, primary, name)
    await assert_settled(pool, standby, name)


async def test_null_pool_reads_from_the_standby(pair: Pair, name: str) -> None:
    """A `NullConnectionPool` (a new connection per request) with
    ``prefer-standby`` reads rows replicated from the primary."""
    primary, standby = pair
    table = f"tp_rep_{name}"
    await trio.to_thread.run_sync(primary.execute, f"CREATE TABLE {table} AS SELECT 42 AS x")
    await trio.to_thread.run_sync(standby.wait_replayed)
    conninfo = multi_host_conninfo(
        primary, standby, target_session_attrs="prefer-standby", application_name=name
    )
    async with NullConnectionPool(conninfo, max_size=2) as pool:
        for _ in range(3):
            async with pool.connection() as conn:
                assert await probe(conn) == Probe(True, True, standby.port)
                cur = await conn.execute(f"SELECT x FROM {table}")
                assert await cur.fetchall() == [(42,)]
    await trio.to_thread.run_sync(primary.execute, f"DROP TABLE {table}")
    await assert_settled(pool, standby, name)


async def test_listener_needs_the_primary(pair: Pair, name: str) -> None:
    """A listener whose pool lands on the standby fails to enter with the server's
    own error (LISTEN is refused during recovery): a clear error, not silence."""
    primary, standby = pair
    conninfo = multi_host_conninfo(
        primary, standby, target_session_attrs="standby", application_name=name
    )
    async with ConnectionPool(conninfo, min_size=0, max_size=1) as pool:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction, match="during recovery"):
            async with pool.listener("tp_on_standby"):
                raise AssertionError("not reached")
        await assert_settled(pool, standby, name)


# -- failover --------------------------------------------------------------------


@dataclass
class Writers:
    """Clients writing through a read-write pool, probing every connection they get."""

    pool: ConnectionPool
    table: str
    served: list[tuple[float, Probe]] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    async def client(self, client: int) -> None:
        for request in range(1_000_000):
            try:
                async with self.pool.connection(timeout=5) as conn:
                    found = await probe(conn)
                    # Checked on *every* connection handed out, before using it.
                    assert not found.in_recovery and not found.read_only, found
                    await conn.execute(
                        f"INSERT INTO {self.table} VALUES (%s, %s, %s)",
                        (client, request, found.port),
                    )
                self.served.append((trio.current_time(), found))
            except psycopg.OperationalError as ex:  # PoolTimeout included
                self.errors[type(ex).__name__] = self.errors.get(type(ex).__name__, 0) + 1
            await trio.sleep(0.005)

    def served_on(self, port: int, since: float = -math.inf) -> int:
        return sum(1 for at, p in self.served if p.port == port and at >= since)

    def first_on(self, port: int) -> float:
        return min(at for at, p in self.served if p.port == port)


@pytest.mark.faults
async def test_failover_to_promoted_standby_under_load(replica_pair: Pair, name: str) -> None:
    """Primary stopped, standby promoted, four clients writing all along: a
    read-write pool (with ``check``) is serving on the new primary within its
    reconnect backoff, and no client is ever handed a connection to a read-only
    server (each one probes every connection it gets).  The pool's listener
    reconnects to the new primary too, with one gap."""
    primary, standby = replica_pair
    table = f"tp_failover_{name}"
    await trio.to_thread.run_sync(
        primary.execute, f"CREATE TABLE {table} (client int, request int, port int)"
    )
    await trio.to_thread.run_sync(standby.wait_replayed)
    conninfo = multi_host_conninfo(
        primary, standby, target_session_attrs="read-write", application_name=name
    )
    async with ConnectionPool(
        conninfo, min_size=2, max_size=4, check=ConnectionPool.check_connection
    ) as pool:
        writers = Writers(pool, table)
        gaps: list[float] = []
        async with pool.listener("tp_failover") as notifications:

            async def watch() -> None:
                async for item in notifications:
                    assert item == ListenerGap("reconnected")
                    gaps.append(trio.current_time())

            async with trio.open_nursery() as nursery:
                for client in range(4):
                    nursery.start_soon(writers.client, client)
                nursery.start_soon(watch)
                await until(lambda: writers.served_on(primary.port) >= 20, 10, "served on primary")

                lost_at = trio.current_time()
                await trio.to_thread.run_sync(primary.stop)
                promote_started = trio.current_time()
                await trio.to_thread.run_sync(standby.promote)
                promoted_at = trio.current_time()
                await until(
                    lambda: writers.served_on(standby.port) >= 20 and bool(gaps),
                    15,
                    "served on new primary, listener reconnected",
                )
                nursery.cancel_scope.cancel()
            # The listener listens on the new primary.
            await trio.to_thread.run_sync(standby.execute, "NOTIFY tp_failover, 'promoted'")
            with trio.fail_after(10):
                item = await anext(notifications)
            assert isinstance(item, psycopg.Notify) and item.payload == "promoted"
        assert len(gaps) == 1
        print(f"\nlistener back {gaps[0] - lost_at:.3f} s after the primary went away")

        recovered_at = writers.first_on(standby.port)
        recovery = recovered_at - promoted_at
        print(
            f"\nfailover: primary stopped in {promote_started - lost_at:.3f} s,"
            f" promoted in {promoted_at - promote_started:.3f} s; first write on the new"
            f" primary {recovered_at - lost_at:.3f} s after the primary went away,"
            f" {recovery:.3f} s after promotion; errors {writers.errors}"
        )
        # The first reconnection delay is ~1 s (+-10 %), the next ~2 s: the pool is back
        # before the second retry, plus slack for a loaded machine.
        assert recovery < 1.1 + 2.2
        # Before the loss only the primary served, after the promotion only the new one.
        assert all(p.port == primary.port for at, p in writers.served if at < lost_at)
        assert all(p.port == standby.port for at, p in writers.served if at > promoted_at)
        assert writers.served_on(standby.port) >= 20
        await settle(pool, standby, name)  # once no slot is still connecting (or backing off)
    await assert_settled(pool, standby, name)
    # Every write the clients saw succeed on the new primary is there.
    rows = await trio.to_thread.run_sync(
        standby.execute, f"SELECT count(*) FROM {table} WHERE port = %s", (standby.port,)
    )
    # (a client cancelled at the end may have committed without seeing it: one each at most)
    assert 0 <= int(str(rows[0][0])) - writers.served_on(standby.port) <= 4
