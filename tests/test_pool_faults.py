"""The pool against real faults: killed backends, restarts, crashes, a frozen server,
a broken network, a server down for long, bad credentials, a full server.

Each test runs a pool (``min_size=2, max_size=4``) with clients under load
(`_fault_helpers.Clients`), breaks something for real, and checks that every
request ends by its timeout or cancel scope (plus a small margin), that the
errors clients see are the expected ones, that nothing leaks, and that the pool
recovers within a bound.  Recovery times are printed (``pytest -s``).

Destructive faults share one throwaway server for the module (``server``),
started again and unfrozen after each test.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import psycopg
import pytest
import trio
from _fault_helpers import (
    Attempt,
    Clients,
    call_server,
    clients_running,
    custom_server,
    live_at_min_size,
    pool_pids,
    quiesce,
    recording_connection_class,
    settle,
    until,
)
from _pool_checks import Server, app_name, backends
from psycopg import errors

import triopool
from triopool import ConnectionPool, PoolTimeout
from triopool.testing import PostgresServer, TcpProxy

pytestmark = pytest.mark.faults

#: Seconds within which the pool must serve again / be back to min_size once a fault
#: is over.  The first reconnection delay is ~1 s (±10 %); the rest is margin.
RECOVERY_BOUND = 5.0
#: Slack for a request beyond its timeout or cancel scope: the query itself, and
#: scheduling on a loaded 2-core machine.
SLACK = 0.4
#: Errors a client may see when the server goes away under it.
SERVER_GONE = {"AdminShutdown", "CrashShutdown", "OperationalError"}


@pytest.fixture(scope="module")
def fault_server() -> Iterator[PostgresServer]:
    with custom_server() as server:
        yield server


@pytest.fixture
def server(fault_server: PostgresServer) -> Iterator[PostgresServer]:
    """The module's throwaway server; running (and not frozen) again after the test."""
    yield fault_server
    if fault_server.running:
        fault_server.resume()
    else:
        fault_server.start()


def pool_options(name: str, **options: Any) -> dict[str, Any]:
    kwargs = {"application_name": name, **options.pop("kwargs", {})}
    return {"min_size": 2, "max_size": 4, "kwargs": kwargs, **options}


@asynccontextmanager
async def loaded_pool(
    conninfo: str,
    server: Server,
    name: str,
    *,
    clients: dict[str, Any] | None = None,
    **options: Any,
) -> AsyncIterator[tuple[ConnectionPool, Clients]]:
    """A pool with clients running and warmed up; the leak check after both are done."""
    async with triopool.open_pool(conninfo, wait=True, **pool_options(name, **options)) as pool:
        async with clients_running(pool, **(clients or {})) as load:
            await until(lambda: load.outcomes.served >= 20, 5, "warm-up")
            yield pool, load
    await settle(pool, server, name)


async def recovery(
    pool: ConnectionPool, load: Clients, server: Server, name: str
) -> tuple[float, float]:
    """Seconds from now until a request is served again, and until min_size live
    connections (each within `RECOVERY_BOUND`)."""
    back = trio.current_time()
    refill_times: list[float] = []

    async def refilled() -> None:
        await until(lambda: live_at_min_size(pool, server, name), RECOVERY_BOUND, "min_size")
        refill_times.append(trio.current_time() - back)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(refilled)
        served = await until(lambda: load.outcomes.served_since(back) > 0, RECOVERY_BOUND, "served")
    return served, refill_times[0]


async def no_backends(server: Server, name: str) -> bool:
    return await backends(server, name) == 0


def report(fault: str, **numbers: object) -> None:
    details = ", ".join(
        f"{key} {value:.3f} s" if isinstance(value, float) else f"{key} {value}"
        for key, value in numbers.items()
    )
    print(f"\n[fault] {fault}: {details}")


# -- backends terminated ----------------------------------------------------------------


@pytest.mark.parametrize("check", [True, False], ids=["check", "no-check"])
async def test_idle_backends_terminated(
    postgres_dsn: str, postgres_server: Server, check: bool
) -> None:
    """Idle backends killed: replaced, and no client ever sees a dead connection, with
    ``check`` or without: before lending an idle connection the pool reads what is on
    its socket (the server's goodbye and the end of the stream) without a round trip."""
    name = app_name("tp_fault_idle")
    options = pool_options(name, check=ConnectionPool.check_connection if check else None)
    async with triopool.open_pool(postgres_dsn, wait=True, **options) as pool:
        async with clients_running(pool, slack=SLACK) as load:
            await until(lambda: load.outcomes.served >= 20, 5, "warm-up")
        await quiesce(pool)
        before = pool_pids(pool)
        assert await call_server(postgres_server.terminate_backends, name) == len(before)
        # Every backend gone, so every socket closed: the pool holds only dead connections.
        await until(lambda: no_backends(postgres_server, name), 5, "backends gone")
        async with clients_running(pool, slack=SLACK) as load:
            replaced = await until(
                lambda: live_at_min_size(pool, postgres_server, name), RECOVERY_BOUND, "min_size"
            )
            await until(lambda: load.outcomes.served >= 20, 5, "served after")
        load.assert_bounded()
        assert load.outcomes.failed == 0, load.outcomes.summary()
        await pool.check()  # any dead connection still idle is found and replaced
        await quiesce(pool)
        assert pool_pids(pool).isdisjoint(before)
        assert len(pool_pids(pool)) >= pool.min_size
        report(
            f"idle backends terminated ({'check' if check else 'no check'})",
            killed=len(before),
            back_to_min_size=replaced,
            client_errors=load.outcomes.failed,
        )
    await settle(pool, postgres_server, name)


async def test_lent_backend_terminated_mid_query(
    postgres_dsn: str, postgres_server: Server
) -> None:
    """A backend killed while its query runs: that client gets `AdminShutdown`, the
    connection is discarded on return and replaced by exactly one new connection; the
    others are untouched (one ``pg_terminate_backend`` is no failover: no reconnect
    storm), and no other client sees an error."""
    name = app_name("tp_fault_lent")
    async with loaded_pool(postgres_dsn, postgres_server, name, clients={"slack": SLACK}) as (
        pool,
        load,
    ):
        others = pool_pids(pool)
        opened_before = pool.get_stats()["connections_num"]

        async def kill_when_running(pid: int) -> None:
            async def running() -> bool:
                rows = await call_server(
                    postgres_server.execute,
                    "SELECT state FROM pg_stat_activity WHERE pid = %s AND query LIKE %s",
                    (pid, "%pg_sleep%"),
                )
                return bool(rows == [("active",)])

            await until(running, 5, "query running")
            assert await call_server(
                postgres_server.execute, "SELECT pg_terminate_backend(%s)", (pid,)
            ) == [(True,)]

        async with trio.open_nursery() as nursery:
            with pytest.raises(errors.AdminShutdown):
                async with pool.connection() as conn:
                    pid = conn.info.backend_pid
                    nursery.start_soon(kill_when_running, pid)
                    await conn.execute("SELECT pg_sleep(30)")
        assert conn.closed or conn.broken
        assert pid not in pool_pids(pool)
        refilled = await until(
            lambda: live_at_min_size(pool, postgres_server, name), RECOVERY_BOUND, "refill"
        )
        await quiesce(pool)
        assert pool_pids(pool) & others == others - {pid}
        stats = pool.get_stats()
        assert stats["connections_num"] - opened_before == 1
        assert stats["returns_bad"] >= 1
    assert load.outcomes.failed == 0, load.outcomes.summary()
    load.assert_bounded()
    report("lent backend terminated", back_to_min_size=refilled)


# -- the server restarted, crashed, frozen; the network broken ------------------------


async def restart(server: PostgresServer, mode: str) -> None:
    """Stop the server (`mode`: a shutdown mode, or a crash), and start it again."""
    if mode == "crash":  # SIGKILL of the postmaster: the backends exit when they notice
        await call_server(partial(server.crash, postmaster_only=True))
    elif mode == "crash-all":  # SIGKILL of every server process
        await call_server(server.crash)
    else:
        await call_server(server.stop, mode)
    await call_server(server.start)


@pytest.mark.parametrize("mode", ["fast", "immediate", "crash", "crash-all"])
async def test_server_restart(server: PostgresServer, mode: str) -> None:
    """Server restarted (fast, immediate) or crashed (SIGKILL of the postmaster, or of
    every server process) under load: clients fail fast or are served after recovery
    within their timeout; the pool is back to min_size within `RECOVERY_BOUND`."""
    name = app_name(f"tp_fault_{mode}")
    load_options = {"count": 3, "timeout": 2.0, "slack": SLACK}
    async with loaded_pool(server.dsn, server, name, clients=load_options) as (pool, load):
        failed_before = load.outcomes.failed
        before = pool_pids(pool)
        down_at = trio.current_time()
        await restart(server, mode)
        downtime = trio.current_time() - down_at
        served, refilled = await recovery(pool, load, server, name)
        assert pool_pids(pool).isdisjoint(before)
    load.assert_bounded()
    assert set(load.outcomes.errors) <= SERVER_GONE, load.outcomes.summary()
    report(
        f"server restart ({mode})",
        server_down=downtime,
        first_served_after=served,
        back_to_min_size=refilled,
        client_errors=load.outcomes.failed - failed_before,
        timeouts=load.outcomes.timed_out,
        excess=load.outcomes.excess_ms(),
    )


async def ride_out_a_hang(
    pool: ConnectionPool,
    load: Clients,
    attempts: list[Attempt],
    connect_timeout: float,
    break_: Callable[[], Awaitable[object]],
    heal: Callable[[], Awaitable[object]],
) -> float:
    """Freeze the path to the server until a connection attempt and a request have
    timed out; heal it.

    Return how long it was broken.
    """
    broken_at = trio.current_time()
    outcomes = load.outcomes
    cancelled, timed_out = outcomes.cancelled, outcomes.timed_out
    await break_()
    try:
        await until(
            lambda: (
                any(isinstance(a.error, errors.ConnectionTimeout) for a in attempts)
                and outcomes.timed_out > timed_out
            ),
            10,
            "a connection attempt and a request timed out",
        )
    finally:
        with trio.move_on_after(5, shield=True):  # heal even if the wait failed
            await heal()
    # It was broken for real: queries were cut by their scopes, requests timed out.
    assert outcomes.cancelled > cancelled and outcomes.timed_out > timed_out, outcomes.summary()
    assert outcomes.excess["timed out"] <= SLACK, outcomes.summary()
    during = [a for a in attempts if a.started >= broken_at]
    assert during, "no connection attempt while broken"
    for attempt in during:  # every attempt bounded by connect_timeout
        assert attempt.seconds <= connect_timeout + SLACK, attempt
    return trio.current_time() - broken_at


HANG_CONNECT_TIMEOUT = 0.5
HANG_CANCEL_TIMEOUT = 0.3
#: Each request in a cancel scope of this many seconds, and waiting at most
#: `HANG_TIMEOUT` for a connection.
HANG_SCOPE = 0.8
HANG_TIMEOUT = 0.5


@asynccontextmanager
async def hang_pool(
    conninfo: str, server: Server, name: str
) -> AsyncIterator[tuple[ConnectionPool, Clients, list[Attempt]]]:
    """A loaded pool for a frozen path: bounded connects, cancels and requests."""
    connection_class, attempts = recording_connection_class(cancel_timeout=HANG_CANCEL_TIMEOUT)
    load_options = {
        "count": 3,
        "timeout": HANG_TIMEOUT,
        "scope": HANG_SCOPE,
        # A query cut by its scope is cancelled on the (unreachable) server: up to
        # cancel_timeout more, then the connection is closed.
        "slack": HANG_CANCEL_TIMEOUT + SLACK,
    }
    async with loaded_pool(
        conninfo,
        server,
        name,
        clients=load_options,
        connection_class=connection_class,
        kwargs={"connect_timeout": HANG_CONNECT_TIMEOUT},
    ) as (pool, load):
        yield pool, load, attempts


async def test_server_frozen(server: PostgresServer) -> None:
    """Server frozen (SIGSTOP of every server process):
    requests end at their timeouts and cancel scopes (plus ``cancel_timeout`` for a query
    cut by its scope), connects at ``connect_timeout``; the pool recovers after SIGCONT."""
    name = app_name("tp_fault_frozen")
    async with hang_pool(server.dsn, server, name) as (pool, load, attempts):
        frozen = await ride_out_a_hang(
            pool,
            load,
            attempts,
            HANG_CONNECT_TIMEOUT,
            lambda: call_server(server.pause),
            lambda: call_server(server.resume),
        )
        during = load.outcomes.summary()
        served, refilled = await recovery(pool, load, server, name)
    load.assert_bounded()
    report(
        "server frozen",
        frozen_for=frozen,
        first_served_after=served,
        back_to_min_size=refilled,
        excess=load.outcomes.excess_ms(),
        load=during,
    )


async def test_check_on_a_frozen_server_ends_at_the_timeout(server: PostgresServer) -> None:
    """A ``check`` hanging on a frozen server is cut at the request's timeout: the client
    gets PoolTimeout then, not ``cancel_timeout`` (5 s) later; the connection is
    discarded, and the pool serves again once the server runs."""
    name = app_name("tp_fault_frozen_check")
    conninfo = server.conninfo(application_name=name)
    async with triopool.open_pool(
        conninfo, min_size=1, max_size=1, check=ConnectionPool.check_connection, wait=True
    ) as pool:
        (before,) = pool_pids(pool)
        await call_server(server.pause)
        try:
            start = trio.current_time()
            with pytest.raises(PoolTimeout):
                await pool.getconn(timeout=1.0)
            late = trio.current_time() - start - 1.0
        finally:
            with trio.move_on_after(5, shield=True):  # resume even if the test failed
                await call_server(server.resume)
        assert 0 <= late < SLACK, late
        async with pool.connection(timeout=RECOVERY_BOUND) as conn:
            assert conn.info.backend_pid != before
    report("check on a frozen server", timeout_late_by=late)


async def test_network_blackhole(tcp_proxy: TcpProxy, postgres_server: Server) -> None:
    """Network blackholed (TCP proxy holding every byte): requests end at their timeouts
    and cancel scopes, connects at ``connect_timeout``; the pool recovers once healed."""
    name = app_name("tp_fault_blackhole")
    conninfo = postgres_server.conninfo(host=tcp_proxy.host, port=tcp_proxy.port)

    async def break_() -> None:
        tcp_proxy.blackhole()
        await trio.lowlevel.checkpoint()

    async def heal() -> None:
        tcp_proxy.heal()
        await trio.lowlevel.checkpoint()

    async with hang_pool(conninfo, postgres_server, name) as (pool, load, attempts):
        broken = await ride_out_a_hang(pool, load, attempts, HANG_CONNECT_TIMEOUT, break_, heal)
        during = load.outcomes.summary()
        served, refilled = await recovery(pool, load, postgres_server, name)
    load.assert_bounded()
    report(
        "network blackhole",
        broken_for=broken,
        first_served_after=served,
        back_to_min_size=refilled,
        load=during,
    )


async def test_network_reset(tcp_proxy: TcpProxy, postgres_server: Server) -> None:
    """Every connection reset (TCP RST): clients on them fail fast, the broken connections
    are discarded and the pool refills at once (no backoff: the server is there)."""
    name = app_name("tp_fault_reset")
    conninfo = postgres_server.conninfo(host=tcp_proxy.host, port=tcp_proxy.port)
    async with loaded_pool(conninfo, postgres_server, name, clients={"slack": SLACK}) as (
        pool,
        load,
    ):
        before = pool_pids(pool)
        tcp_proxy.reset_all()
        served, refilled = await recovery(pool, load, postgres_server, name)
        await until(lambda: pool_pids(pool).isdisjoint(before), RECOVERY_BOUND, "all replaced")
    load.assert_bounded()
    assert set(load.outcomes.errors) <= SERVER_GONE, load.outcomes.summary()
    report(
        "network reset",
        first_served_after=served,
        back_to_min_size=refilled,
        client_errors=load.outcomes.failed,
    )


# -- the server down for long -------------------------------------------------------------


async def test_server_down_longer_than_reconnect_timeout(
    server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Server down for longer than ``reconnect_timeout``: ``reconnect_failed`` is called
    once per abandoned attempt, the pool keeps trying while below min_size, and it
    recovers when the server returns."""
    caplog.set_level(logging.WARNING, logger="triopool")
    name = app_name("tp_fault_down")
    calls: list[float] = []

    async def reconnect_failed(pool: ConnectionPool) -> None:
        calls.append(trio.current_time())
        await trio.lowlevel.checkpoint()

    connection_class, attempts = recording_connection_class()
    async with loaded_pool(
        server.dsn,
        server,
        name,
        clients={"count": 2, "timeout": 0.3, "slack": SLACK},
        connection_class=connection_class,
        reconnect_timeout=1.0,
        reconnect_failed=reconnect_failed,
    ) as (pool, load):
        await call_server(server.stop, "fast")
        # Two rounds of abandoned attempts for both min_size slots: it keeps trying.
        await until(lambda: len(calls) >= 2 * pool.min_size, 10, "reconnect_failed calls")
        first_failure = min(a.started for a in attempts if a.error is not None)
        first_call = calls[0] - first_failure
        errors_then = pool.get_stats()["connections_errors"]
        await until(lambda: pool.get_stats()["connections_errors"] > errors_then, 5, "still trying")
        await call_server(server.start)
        served, refilled = await recovery(pool, load, server, name)
        await quiesce(pool)
        calls_at_recovery = len(calls)
    warnings = [r for r in caplog.records if "reconnection attempts failed" in r.getMessage()]
    assert len(calls) == len(warnings)
    # Nothing was abandoned once the pool had recovered.
    assert len(calls) == calls_at_recovery
    # The first abandon comes reconnect_timeout after the first failure.
    assert 1.0 <= first_call <= 1.0 + SLACK
    load.assert_bounded()
    report(
        "server down > reconnect_timeout (1 s)",
        reconnect_failed_calls=len(calls),
        first_call_after=first_call,
        first_served_after=served,
        back_to_min_size=refilled,
    )


# -- the server refuses us ------------------------------------------------------------


async def expect_startup_failure(
    conninfo: str, message: str, *, secret: str = "", **options: Any
) -> None:
    """`open_pool(wait=True)` fails at its timeout with the server's error as the cause;
    without `wait`, requests fail with `PoolTimeout` carrying that error."""
    timeout = 0.5
    started = trio.current_time()
    with pytest.raises(PoolTimeout) as waited:
        async with triopool.open_pool(conninfo, min_size=2, wait=True, timeout=timeout, **options):
            pytest.fail("the pool opened")
    elapsed = trio.current_time() - started
    assert timeout <= elapsed <= timeout + SLACK
    cause = waited.value.__cause__
    # psycopg reports a failed connection without its SQLSTATE: the message tells.
    assert isinstance(cause, psycopg.OperationalError)
    assert message in str(cause)

    async with triopool.open_pool(conninfo, min_size=2, **options) as pool:
        with pytest.raises(PoolTimeout) as requested:
            await pool.getconn(timeout=0.3)
    assert isinstance(requested.value.__cause__, psycopg.OperationalError)
    assert message in str(requested.value.__cause__)
    assert f"last connection error: {type(cause).__name__}" in str(requested.value)
    assert str(requested.value.__cause__).splitlines()[0] in str(requested.value)
    if secret:
        for exc in (waited.value, requested.value, cause):
            assert secret not in f"{exc} {exc!r}"
    report(f"startup failure ({message})", open_pool_wait_failed_after=elapsed)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"dbname": "tp_no_such_database"}, 'database "tp_no_such_database" does not exist'),
        ({"user": "tp_no_such_user"}, 'role "tp_no_such_user" does not exist'),
    ],
    ids=["unknown-database", "unknown-user"],
)
async def test_unknown_database_or_user(
    postgres_server: Server, override: dict[str, str], message: str
) -> None:
    """An unknown database or user: `PoolTimeout` at the timeout, the server's error as cause."""
    await expect_startup_failure(postgres_server.conninfo(**override), message)


async def test_wrong_password(server: PostgresServer) -> None:
    """A wrong password (a role with one, and an ``scram-sha-256`` line in pg_hba.conf):
    `PoolTimeout` with the server's refusal as the cause, and the password nowhere in it."""
    role, right, wrong = "tp_pw_role", "tp-right-Pa55", "tp-wrong-Pa55"
    await call_server(server.execute, f"DROP ROLE IF EXISTS {role}")
    await call_server(server.execute, f"CREATE ROLE {role} LOGIN PASSWORD '{right}'")
    hba = server.datadir / "pg_hba.conf"
    rules = hba.read_text()
    line = f"host all {role} 127.0.0.1/32 scram-sha-256\n"
    if line not in rules:
        hba.write_text(line + rules)
    await call_server(server.execute, "SELECT pg_reload_conf()")

    def password_required() -> bool:
        try:
            psycopg.connect(server.conninfo(user=role)).close()
        except psycopg.OperationalError:
            return True
        return False

    await until(lambda: call_server(password_required), 5, "pg_hba.conf reloaded")

    await expect_startup_failure(
        server.conninfo(user=role),
        f'password authentication failed for user "{role}"',
        secret=wrong,
        kwargs={"password": wrong},
    )
    async with triopool.open_pool(
        server.conninfo(user=role, password=right), min_size=1, wait=True, timeout=5
    ) as pool:  # the right one works: the failure above was the password's
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")


async def test_too_many_clients_backs_off() -> None:
    """The server full (``too many clients``, 53300): connection attempts back off (no busy
    loop), requests fail with `PoolTimeout` saying why, and the pool fills once there is
    room again."""
    with custom_server(max_connections="5", superuser_reserved_connections="0") as server:
        hogs = [
            await triopool.Connection.connect(server.conninfo(application_name="tp_hog"))
            for _ in range(5)
        ]
        name = app_name("tp_fault_full")
        connection_class, attempts = recording_connection_class()
        pool = ConnectionPool(server.dsn, connection_class=connection_class, **pool_options(name))
        window = 1.5
        async with pool, clients_running(pool, count=2, timeout=0.3, slack=SLACK) as load:
            # An observation window, not a wait for a result: count the attempts in it.
            await trio.sleep(window)
            in_window = len(attempts)
            assert load.outcomes.served == 0
            assert load.outcomes.timed_out >= 1
            with pytest.raises(PoolTimeout, match="too many clients already"):
                await pool.getconn(timeout=0.1)
            for hog in hogs:
                await hog.close()
            # Up to one backoff delay (~2 s by now) before the next attempt.
            first_served, refilled = await recovery(pool, load, server, name)
        await settle(pool, server, name)
    failed = [a for a in attempts[:in_window] if a.error is not None]
    assert failed
    assert all("too many clients already" in str(a.error) for a in failed), failed
    # Backoff: each of at most max_size slots tries at ~0, ~1 and ~3 s: a handful of
    # attempts per second, where a busy loop would make hundreds.
    rate = in_window / window
    assert in_window <= 4 * math.ceil(math.log2(window + 1) + 1), attempts
    load.assert_bounded()
    report(
        "too many clients",
        attempts_per_second=f"{rate:.1f}",
        attempts=in_window,
        first_served_after_room=first_served,
        back_to_min_size=refilled,
    )
