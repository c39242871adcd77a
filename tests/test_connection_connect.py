"""``triopool.Connection.connect``: the ways to connect, and the errors, under plain trio."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import trio
from _connection_helpers import (
    PostgresServer,
    PrivateServer,
    TcpProxy,
    assert_same_error,
    assert_usable_idle,
    connect,
    opened,
    refused_port,
    stock_connect_error,
)
from psycopg import errors as e
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

import triopool


async def check_connection(conn: triopool.Connection[Any], server: PostgresServer) -> None:
    """The connection is a live triopool.Connection to ``server``, able to run a query."""
    assert isinstance(conn, triopool.Connection)
    assert isinstance(conn, psycopg.AsyncConnection)
    assert_usable_idle(conn)
    assert conn.info.port == server.port
    params = conninfo_to_dict(server.dsn)
    cur = await conn.execute("SELECT current_user, current_database(), 40 + 2")
    assert await cur.fetchone() == (params.get("user", "postgres"), params["dbname"], 42)


# --- successful connections -------------------------------------------------------------------


async def test_connect_url(postgres_server: PostgresServer, app_name: str) -> None:
    assert postgres_server.dsn.startswith("postgresql://")
    sep = "&" if "?" in postgres_server.dsn else "?"
    async with opened(f"{postgres_server.dsn}{sep}application_name={app_name}") as conn:
        await check_connection(conn, postgres_server)
        cur = await conn.execute("SHOW application_name")
        assert await cur.fetchone() == (app_name,)


async def test_connect_key_value_conninfo(postgres_server: PostgresServer, app_name: str) -> None:
    conninfo = postgres_server.conninfo(application_name=app_name)
    assert "=" in conninfo
    assert not conninfo.startswith("postgresql://")
    async with opened(conninfo) as conn:
        await check_connection(conn, postgres_server)
        cur = await conn.execute("SHOW application_name")
        assert await cur.fetchone() == (app_name,)


async def test_connect_kwargs(postgres_server: PostgresServer, app_name: str) -> None:
    params = conninfo_to_dict(postgres_server.dsn)
    async with opened(
        host=postgres_server.host,
        port=postgres_server.port,
        user=params.get("user", "postgres"),
        dbname=params["dbname"],
        application_name=app_name,
        autocommit=True,
        password=params.get("password"),
    ) as conn:
        await check_connection(conn, postgres_server)
        assert conn.autocommit
        assert conn.info.host == postgres_server.host


async def test_connect_kwargs_override_conninfo(
    postgres_server: PostgresServer, app_name: str
) -> None:
    # kwargs win over the conninfo string, as in psycopg.
    conninfo = postgres_server.conninfo(application_name="overridden")
    async with opened(conninfo, application_name=app_name) as conn:
        cur = await conn.execute("SHOW application_name")
        assert await cur.fetchone() == (app_name,)


async def test_connect_options_applied(postgres_dsn: str, app_name: str) -> None:
    conn = await connect(
        postgres_dsn, app_name, autocommit=True, prepare_threshold=None, row_factory=dict_row
    )
    try:
        assert conn.autocommit
        assert conn.prepare_threshold is None
        cur = await conn.execute("SELECT 1 AS one")
        assert await cur.fetchone() == {"one": 1}
    finally:
        with trio.move_on_after(5, shield=True):
            await conn.close()


async def test_connect_localhost_dns(postgres_server: PostgresServer, app_name: str) -> None:
    # "localhost" must be resolved (through trio) before libpq connects; the server listens on
    # 127.0.0.1 only, so a ::1 address, if any, is refused and the next one is tried.
    async with opened(
        postgres_server.conninfo(host="localhost", application_name=app_name)
    ) as conn:
        await check_connection(conn, postgres_server)
        assert conn.info.host == "localhost"
        assert conn.info.hostaddr == "127.0.0.1"


async def test_connect_multi_host_dead_first(
    postgres_server: PostgresServer, app_name: str
) -> None:
    with refused_port() as dead:
        conninfo = postgres_server.conninfo(
            host=f"127.0.0.1,{postgres_server.host}",
            port=f"{dead},{postgres_server.port}",
            application_name=app_name,
        )
        conn = await triopool.Connection.connect(conninfo)
    try:
        await check_connection(conn, postgres_server)
        assert conn.info.port == postgres_server.port
    finally:
        with trio.move_on_after(5, shield=True):
            await conn.close()


async def test_connect_multi_host_all_dead(postgres_server: PostgresServer) -> None:
    with refused_port() as dead1, refused_port() as dead2:
        conninfo = postgres_server.conninfo(host="127.0.0.1,127.0.0.1", port=f"{dead1},{dead2}")
        with pytest.raises(psycopg.OperationalError) as excinfo:
            await triopool.Connection.connect(conninfo)
        stock = await stock_connect_error(conninfo)
    assert_same_error(excinfo.value, stock)
    message = str(excinfo.value)
    assert "Multiple connection attempts failed" in message
    assert f"port {dead1} failed" in message
    assert f"port {dead2} failed" in message


@pytest.mark.parametrize("attrs", ["read-write", "any", "primary"])
async def test_connect_target_session_attrs(
    postgres_server: PostgresServer, app_name: str, attrs: str
) -> None:
    async with opened(
        postgres_server.conninfo(target_session_attrs=attrs, application_name=app_name)
    ) as conn:
        await check_connection(conn, postgres_server)
        cur = await conn.execute("SELECT pg_is_in_recovery()")
        assert await cur.fetchone() == (False,)


@pytest.mark.parametrize("attrs", ["read-only", "standby"])
async def test_connect_target_session_attrs_unmatched(
    postgres_server: PostgresServer, attrs: str
) -> None:
    # The test server is a read-write primary: these attributes must make the attempt fail,
    # exactly as they do with stock psycopg.
    conninfo = postgres_server.conninfo(target_session_attrs=attrs)
    with pytest.raises(psycopg.OperationalError) as excinfo:
        await triopool.Connection.connect(conninfo)
    assert_same_error(excinfo.value, await stock_connect_error(conninfo))


async def test_connect_target_session_attrs_picks_matching_host(
    postgres_server: PostgresServer, app_name: str
) -> None:
    # With a dead first host and read-write, the second (primary) host is chosen.
    with refused_port() as dead:
        conn = await triopool.Connection.connect(
            postgres_server.conninfo(
                host="127.0.0.1,127.0.0.1",
                port=f"{dead},{postgres_server.port}",
                target_session_attrs="read-write",
                application_name=app_name,
            )
        )
    try:
        await check_connection(conn, postgres_server)
    finally:
        with trio.move_on_after(5, shield=True):
            await conn.close()


async def test_connect_load_balance_random_equal_hosts(
    postgres_server: PostgresServer, app_name: str
) -> None:
    port = postgres_server.port
    conninfo = postgres_server.conninfo(
        host="127.0.0.1,127.0.0.1",
        port=f"{port},{port}",
        load_balance_hosts="random",
        application_name=app_name,
    )
    for _ in range(3):
        async with opened(conninfo) as conn:
            await check_connection(conn, postgres_server)


async def _count_and_drop(listeners: list[trio.SocketListener], hits: list[int]) -> None:
    """Accept every connection and close it at once: a 'host' that is up but fails."""
    async with trio.open_nursery() as nursery:
        for listener in listeners:

            async def serve(listener: trio.SocketListener = listener) -> None:
                while True:
                    stream = await listener.accept()
                    hits.append(1)
                    await stream.aclose()

            nursery.start_soon(serve)


@pytest.mark.parametrize(("policy", "expected"), [("disable", "all"), ("random", "some")])
async def test_connect_load_balance_hosts_order(
    postgres_server: PostgresServer, app_name: str, policy: str, expected: str
) -> None:
    # The first host accepts and immediately drops every connection. Without load balancing it
    # is tried on every connect; with load_balance_hosts=random it is tried first only about
    # half of the time (the probability that 16 connects all pick the same order is 2**-15).
    n = 16
    hits: list[int] = []
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    failing_port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_count_and_drop, listeners, hits)
        conninfo = postgres_server.conninfo(
            host="127.0.0.1,127.0.0.1",
            port=f"{failing_port},{postgres_server.port}",
            load_balance_hosts=policy,
            application_name=app_name,
        )
        for _ in range(n):
            async with opened(conninfo) as conn:
                assert conn.info.port == postgres_server.port
        nursery.cancel_scope.cancel()
    for listener in listeners:
        await listener.aclose()
    if expected == "all":
        assert len(hits) == n
    else:
        assert 0 < len(hits) < n, len(hits)


# --- connect_timeout, enforced with trio --------------------------------------------------------


async def test_connect_timeout_blackholed_proxy(tcp_proxy: TcpProxy) -> None:
    tcp_proxy.blackhole()
    conninfo = f"host={tcp_proxy.host} port={tcp_proxy.port} user=postgres dbname=postgres"
    ours: list[BaseException] = []
    stock: list[BaseException] = []

    async def run_ours() -> None:
        t0 = trio.current_time()
        with pytest.raises(psycopg.OperationalError) as excinfo:
            await triopool.Connection.connect(conninfo, connect_timeout=1)
        elapsed = trio.current_time() - t0
        # libpq alone would wait at least 2 s: 1 s means the timeout is enforced by trio.
        assert 0.8 <= elapsed <= 1.8, elapsed
        ours.append(excinfo.value)

    async def run_stock() -> None:
        # Stock psycopg rounds the timeout up to 2 s, so this runs alongside ours.
        stock.append(await stock_connect_error(conninfo, connect_timeout=1))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_ours)
        nursery.start_soon(run_stock)

    assert isinstance(ours[0], e.ConnectionTimeout)
    assert_same_error(ours[0], stock[0])


@pytest.mark.faults
async def test_connect_timeout_paused_server(private_server: PrivateServer) -> None:
    await trio.to_thread.run_sync(private_server.pause)
    try:
        t0 = trio.current_time()
        with pytest.raises(psycopg.OperationalError) as excinfo:
            await triopool.Connection.connect(private_server.dsn, connect_timeout=1)
        elapsed = trio.current_time() - t0
    finally:
        with trio.move_on_after(5, shield=True):
            await trio.to_thread.run_sync(private_server.resume)
    assert 0.8 <= elapsed <= 1.8, elapsed
    assert isinstance(excinfo.value, e.ConnectionTimeout)
    assert "timeout" in str(excinfo.value)


async def test_connect_timeout_per_attempt_then_next_host(
    postgres_server: PostgresServer, tcp_proxy: TcpProxy, app_name: str
) -> None:
    # The first host hangs: after connect_timeout (1 s) the second host is tried and works.
    tcp_proxy.blackhole()
    conninfo = postgres_server.conninfo(
        host=f"{tcp_proxy.host},{postgres_server.host}",
        port=f"{tcp_proxy.port},{postgres_server.port}",
        connect_timeout=1,
        application_name=app_name,
    )
    t0 = trio.current_time()
    conn = await triopool.Connection.connect(conninfo)
    elapsed = trio.current_time() - t0
    try:
        assert 0.8 <= elapsed <= 1.8, elapsed
        await check_connection(conn, postgres_server)
    finally:
        with trio.move_on_after(5, shield=True):
            await conn.close()


async def test_connect_cancelled_by_scope(tcp_proxy: TcpProxy) -> None:
    # A trio cancel scope interrupts a hanging connect promptly.
    tcp_proxy.blackhole()
    t0 = trio.current_time()
    with trio.move_on_after(0.3) as scope:
        await triopool.Connection.connect(
            f"host={tcp_proxy.host} port={tcp_proxy.port} user=postgres dbname=postgres"
        )
    assert scope.cancelled_caught
    assert trio.current_time() - t0 < 1.0


# --- errors: same as stock psycopg on asyncio, raised promptly ---------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"user": "nosuchuser"}, 'role "nosuchuser" does not exist'),
        ({"dbname": "nosuchdb"}, 'database "nosuchdb" does not exist'),
    ],
    ids=["role", "database"],
)
async def test_connect_error_does_not_exist(
    postgres_server: PostgresServer, overrides: dict[str, str], message: str
) -> None:
    conninfo = postgres_server.conninfo(**overrides)
    t0 = trio.current_time()
    with pytest.raises(psycopg.OperationalError) as excinfo:
        await triopool.Connection.connect(conninfo)
    assert trio.current_time() - t0 < 1.0
    assert message in str(excinfo.value)
    assert_same_error(excinfo.value, await stock_connect_error(conninfo))


async def test_connect_error_refused_port(postgres_server: PostgresServer) -> None:
    with refused_port() as dead:
        conninfo = postgres_server.conninfo(host="127.0.0.1", port=dead)
        t0 = trio.current_time()
        with pytest.raises(psycopg.OperationalError) as excinfo:
            await triopool.Connection.connect(conninfo)
        assert trio.current_time() - t0 < 1.0
        stock = await stock_connect_error(conninfo)
    assert "Connection refused" in str(excinfo.value)
    assert_same_error(excinfo.value, stock)


@pytest.mark.parametrize("conninfo", ["host=foo bar==", "postgresql://[bad"])
async def test_connect_error_malformed_conninfo(conninfo: str) -> None:
    t0 = trio.current_time()
    with pytest.raises(psycopg.ProgrammingError) as excinfo:
        await triopool.Connection.connect(conninfo)
    assert trio.current_time() - t0 < 0.5
    assert_same_error(excinfo.value, await stock_connect_error(conninfo))


async def test_connect_error_unknown_host() -> None:
    # Resolution failure of a name that cannot exist (RFC 6761 .invalid).
    conninfo = "host=nosuchhost.invalid port=5432 user=postgres dbname=postgres"
    with pytest.raises(psycopg.OperationalError) as excinfo:
        await triopool.Connection.connect(conninfo)
    assert_same_error(excinfo.value, await stock_connect_error(conninfo))
