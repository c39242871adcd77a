"""Features for bad days, against the real server: leak warnings, what `PoolTimeout`
and `holders()` say, draining after a failover error, and passwords kept out of
logs, exceptions and reprs.
"""

from __future__ import annotations

import logging
import socket
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest
import trio
import trio.testing
from _fault_helpers import call_server, pool_pids, quiesce, settle, until
from _pool_checks import Server, app_name
from psycopg import errors

import triopool
from triopool import Connection, ConnectionPool, Holder, PoolTimeout

AnyConnection = Connection[Any]


class EventHandler(logging.Handler):
    """Sets a trio event when a matching record is logged (records come from trio tasks)."""

    def __init__(self, level: int, text: str) -> None:
        super().__init__(level)
        self.text = text
        self.seen = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


@asynccontextmanager
async def watching(level: int, text: str) -> AsyncIterator[EventHandler]:
    """A handler on the ``triopool`` logger whose ``seen`` event fires on `text`."""
    handler = EventHandler(level, text)
    logger = logging.getLogger("triopool")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
    await trio.lowlevel.checkpoint()


# -- leak detection -------------------------------------------------------------------


async def acquire_and_keep(pool: ConnectionPool) -> AnyConnection:
    """The code that 'forgets' to give its connection back (named in the warning)."""
    return await pool.getconn()


LEAK_TIMEOUT = 0.2


async def test_leak_timeout_warns_once_with_task_and_stack(
    postgres_dsn: str, postgres_server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection held longer than ``leak_timeout``: one WARNING naming the task and the
    stack where it was acquired; an INFO when it comes back.  A short loan: nothing."""
    caplog.set_level(logging.INFO, logger="triopool")
    name = app_name("tp_diag_leak")
    async with triopool.open_pool(
        postgres_dsn,
        min_size=2,
        leak_timeout=LEAK_TIMEOUT,
        wait=True,
        kwargs={"application_name": name},
    ) as pool:
        async with pool.connection():
            pass  # returned well within leak_timeout
        async with watching(logging.WARNING, "held by task") as warned:
            got: list[AnyConnection] = []
            lent_at = trio.current_time()

            async def leaky_holder() -> None:
                got.append(await acquire_and_keep(pool))

            async with trio.open_nursery() as nursery:  # noqa: ASYNC112  # a task named for the warning
                nursery.start_soon(leaky_holder, name="leaky-holder")
            with trio.fail_after(5):
                await warned.seen.wait()
            warned_after = trio.current_time() - lent_at
            # Held for several more leak_timeouts: still a single warning.
            await trio.sleep(3 * LEAK_TIMEOUT)
            await pool.putconn(got[0])
            returned_after = trio.current_time() - lent_at
        await settle(pool, postgres_server, name)

    records = [r for r in caplog.records if r.name == "triopool" and "task" in r.getMessage()]
    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    warning = warnings[0].getMessage()
    assert "'leaky-holder'" in warning
    assert f"more than {LEAK_TIMEOUT} sec" in warning
    assert "in acquire_and_keep" in warning and "return await pool.getconn()" in warning
    assert "in leaky_holder" in warning and __file__ in warning
    assert getattr(warnings[0], "pool", None) == pool.name
    assert LEAK_TIMEOUT <= warned_after <= LEAK_TIMEOUT + 0.5
    infos = [r.getMessage() for r in records if r.levelno == logging.INFO]
    assert len(infos) == 1
    assert "'leaky-holder' returned after" in infos[0]
    held = float(infos[0].rsplit("after ", 1)[1].split()[0])
    assert abs(held - returned_after) <= 0.15


# -- what PoolTimeout and holders() say -------------------------------------------------


async def test_pool_timeout_diagnostics_and_holders(
    postgres_dsn: str, postgres_server: Server
) -> None:
    """`PoolTimeout` says how many connections exist, are lent, connecting and waiting,
    and the last connection error (also its ``__cause__``); ``holders()`` names the tasks
    holding connections, longest held first."""
    name = app_name("tp_diag_timeout")
    opened: list[int] = []

    def kwargs() -> dict[str, str]:
        # The first two connections work; then the database "disappears".
        opened.append(1)
        dbname = "postgres" if len(opened) <= 2 else "tp_diag_no_such_db"
        return {"application_name": name, "dbname": dbname}

    async with triopool.open_pool(
        postgres_dsn, min_size=1, max_size=3, kwargs=kwargs, wait=True
    ) as pool:
        release = trio.Event()

        async def holder(held: trio.Event) -> None:
            async with pool.connection():
                held.set()
                await release.wait()

        async with trio.open_nursery() as nursery:
            for task in ("holder-a", "holder-b"):
                held = trio.Event()
                nursery.start_soon(holder, held, name=task)
                await held.wait()
                await trio.sleep(0.05)  # not a wait: holder-a is to hold its connection longer
            # A waiter: the pool tries a third connection.
            nursery.start_soon(pool.getconn, 10, name="waiter")
            await until(lambda: pool.get_stats()["connections_errors"] > 0, 5, "failed")

            holders = pool.holders()
            assert [h.task_name for h in holders] == ["holder-a", "holder-b"]
            assert all(isinstance(h, Holder) for h in holders)
            assert holders[0].held_for - holders[1].held_for >= 0.05

            with pytest.raises(PoolTimeout) as info:
                await pool.getconn(timeout=0.2)
            message = str(info.value)
            assert message.startswith("couldn't get a connection after 0.20 sec")
            assert f"pool {pool.name!r}: 3 connections, 0 idle, 2 lent, 1 connecting" in message
            assert "; 1 requests waiting" in message  # the waiter (this one has left)
            assert "last connection error: OperationalError" in message
            assert 'database "tp_diag_no_such_db" does not exist' in message
            cause = info.value.__cause__
            assert isinstance(cause, psycopg.OperationalError)
            assert 'database "tp_diag_no_such_db" does not exist' in str(cause)
            release.set()
            nursery.cancel_scope.cancel()  # the waiter
        assert pool.holders() == []
    await settle(pool, postgres_server, name)


# -- failover awareness -------------------------------------------------------------------


async def read_only_write(conn: AnyConnection, server: Server) -> None:
    await conn.execute("SET TRANSACTION READ ONLY")
    await conn.execute("CREATE TABLE tp_diag_never (x int)")  # 25006


async def backend_terminated(conn: AnyConnection, server: Server) -> None:
    pid = conn.info.backend_pid
    await call_server(server.execute, "SELECT pg_terminate_backend(%s)", (pid,))
    await until(lambda: pid_gone(server, pid), 5, "backend gone")
    await conn.execute("SELECT 1")  # 57P01, read from the socket


async def pid_gone(server: Server, pid: int) -> bool:
    rows = await call_server(
        server.execute, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)
    )
    return bool(rows == [])


async def connection_exception(conn: AnyConnection, server: Server) -> None:
    # A real error from the server with a class 08 SQLSTATE (connection_failure); the
    # connection itself stays usable: only the code says "connection trouble".
    await conn.execute("DO $$ BEGIN RAISE EXCEPTION 'tp failover' USING ERRCODE = '08006'; END $$")


async def ordinary_error(conn: AnyConnection, server: Server) -> None:
    await conn.execute("SELECT 1 / 0")  # 22012: not a failover sign


Provoke = Callable[[AnyConnection, Server], Awaitable[None]]


@pytest.mark.parametrize("drain_on_failover", [True, False], ids=["drain", "no-drain"])
@pytest.mark.parametrize(
    ("provoke", "error", "sign"),
    [
        (read_only_write, errors.ReadOnlySqlTransaction, True),
        (backend_terminated, errors.AdminShutdown, False),
        (connection_exception, errors.ConnectionFailure, False),
        (ordinary_error, errors.DivisionByZero, False),
    ],
    ids=["25006", "57P01", "08006", "22012"],
)
async def test_failover_error_drains_older_connections(
    postgres_dsn: str,
    postgres_server: Server,
    provoke: Provoke,
    error: type[psycopg.Error],
    sign: bool,
    drain_on_failover: bool,
) -> None:
    """A query failing with 25006 (the server became a standby) inside ``connection()``
    replaces every connection opened before it (idle at once, the failing one on
    return).  Anything else is no sign of a failover: a terminated backend (57P01)
    replaces that connection alone (no reconnect storm), a class 08 error on a working
    connection or an ordinary error replaces none; so does ``drain_on_failover=False``."""
    name = app_name("tp_diag_failover")
    async with triopool.open_pool(
        postgres_dsn,
        min_size=3,
        wait=True,
        drain_on_failover=drain_on_failover,
        kwargs={"application_name": name},
    ) as pool:
        before = pool_pids(pool)
        assert len(before) == 3
        with pytest.raises(error):
            async with pool.connection() as conn:
                failing = conn.info.backend_pid
                await provoke(conn, postgres_server)
        await quiesce(pool)
        after = pool_pids(pool)
        assert len(after) == 3
        if sign and drain_on_failover:
            assert after.isdisjoint(before)
        elif error is errors.AdminShutdown:
            assert after & before == before - {failing}
        else:
            assert after == before
        async with pool.connection() as conn:  # and it serves
            await conn.execute("SELECT 1")
    await settle(pool, postgres_server, name)


# -- secrets ---------------------------------------------------------------------------


def closed_port() -> int:
    """A port on 127.0.0.1 nobody listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def shown(exc: BaseException) -> str:
    """Everything a user may see of `exc`: message, repr, traceback and causes."""
    return f"{exc}\n{exc!r}\n{''.join(traceback.format_exception(exc))}"


async def test_passwords_never_shown(
    postgres_server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """A password in a URL, in key=value conninfo or in kwargs appears in no log record
    (DEBUG, every logger), no exception (failing connects to a closed port) and no repr;
    and a pool with a password serving from the real server logs none either."""
    caplog.set_level(logging.DEBUG)
    port = closed_port()
    secrets = {"url": "tp-Url-s3cr3t", "kv": "tp-Kv-s3cr3t", "kwargs": "tp-Kw-s3cr3t"}
    refused: list[tuple[str, dict[str, Any]]] = [
        (f"postgresql://postgres:{secrets['url']}@127.0.0.1:{port}/postgres", {}),
        (f"host=127.0.0.1 port={port} user=postgres password={secrets['kv']}", {}),
        (f"host=127.0.0.1 port={port} user=postgres", {"password": secrets["kwargs"]}),
    ]
    seen: list[str] = []
    for conninfo, kwargs in refused:
        pool = ConnectionPool(conninfo, kwargs=kwargs, min_size=1, timeout=0.3)
        seen.append(repr(pool))
        async with pool:
            seen.append(repr(pool))
            with pytest.raises(PoolTimeout) as requested:
                await pool.getconn()
            seen.append(shown(requested.value))
        with pytest.raises(PoolTimeout) as waited:
            async with triopool.open_pool(
                conninfo, kwargs=kwargs, min_size=1, timeout=0.3, wait=True
            ):
                pass
        seen.append(shown(waited.value))
        assert "Connection refused" in shown(requested.value)  # the cause is there

    name = app_name("tp_diag_secret")
    served = triopool.open_pool(  # trust auth: the password is sent and ignored
        postgres_server.conninfo(password=secrets["kv"], application_name=name),
        min_size=1,
        wait=True,
    )
    async with served as pool:
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
        seen.append(repr(pool))
        await pool.drain()
        await quiesce(pool)
    await settle(pool, postgres_server, name)

    for record in caplog.records:
        seen.append(record.getMessage())
        if record.exc_info and record.exc_info[1] is not None:
            seen.append(shown(record.exc_info[1]))
    seen.append(caplog.text)
    assert any("error connecting" in text for text in seen)  # the logs were captured
    for where in seen:
        for secret in secrets.values():
            assert secret not in where, where
