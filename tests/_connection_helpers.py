"""Shared helpers for the ``triopool.Connection`` tests.

The server fixtures (``postgres_server``, ``private_server``, ``tcp_proxy``...) come from
``triopool.testing.pytest_plugin``; the protocols below describe only what these tests use, so
the tests type-check without depending on the harness's concrete classes.
"""

from __future__ import annotations

import asyncio
import re
import socket
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Protocol, TypeVar, cast

import psycopg
import trio
from psycopg.pq import TransactionStatus

import triopool

# How long a cancelled query may take to come back when the server cannot be reached at all
# (cancel request bounded at ~5 s, then the connection is closed).  Generous on purpose.
UNREACHABLE_CANCEL_BOUND = 8.0

T = TypeVar("T")


class PostgresServer(Protocol):
    @property
    def dsn(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    def conninfo(self, **overrides: Any) -> str: ...
    def terminate_backends(self, application_name: str | None = None) -> int: ...
    def count_backends(self, application_name: str) -> int: ...


class PrivateServer(PostgresServer, Protocol):
    def pause(self) -> None: ...
    def resume(self) -> None: ...


class TcpProxy(Protocol):
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    def blackhole(self) -> None: ...
    def heal(self) -> None: ...


def make_app_name(nodename: str) -> str:
    """A unique, readable ``application_name`` (at most 63 bytes) for one test."""
    base = re.sub(r"[^A-Za-z0-9_]+", "_", nodename).strip("_")
    return f"tp_{base[:48]}_{uuid.uuid4().hex[:8]}"


async def connect(dsn: str, app_name: str, **kwargs: Any) -> triopool.Connection[Any]:
    """Open a ``triopool.Connection`` tagged with ``app_name``."""
    return await triopool.Connection.connect(dsn, application_name=app_name, **kwargs)


@asynccontextmanager
async def opened(*args: Any, **kwargs: Any) -> AsyncIterator[triopool.Connection[Any]]:
    """``triopool.Connection.connect(*args, **kwargs)``, closed at the end (shielded, 5 s)."""
    conn = await triopool.Connection.connect(*args, **kwargs)
    try:
        yield conn
    finally:
        with trio.move_on_after(5, shield=True):
            await conn.close()


async def backend_activity(admin: triopool.Connection[Any], pid: int) -> tuple[str, str] | None:
    """``(state, query)`` of backend ``pid`` from ``pg_stat_activity``; None if it is gone."""
    cur = await admin.execute(
        "SELECT state, query FROM pg_stat_activity WHERE pid = %s", [pid], prepare=False
    )
    row = await cur.fetchone()
    if row is None:
        return None
    return (str(row[0]), str(row[1]))


async def wait_until_active(admin: triopool.Connection[Any], pid: int, what: str) -> None:
    """Wait (at most 5 s) until backend ``pid`` is running a query containing ``what``.

    This polls server-side state, which has no event to wait on; the loop is bounded.
    """
    with trio.fail_after(5):
        while True:
            activity = await backend_activity(admin, pid)
            if activity is not None and activity[0] == "active" and what in activity[1]:
                return
            await trio.sleep(0.01)


async def wait_backends_gone(server: PostgresServer, app_name: str) -> int:
    """Wait (at most 3 s) until no backend carries ``app_name``; return the last count."""
    count = -1
    with trio.move_on_after(3):
        while True:
            count = await trio.to_thread.run_sync(server.count_backends, app_name)
            if count == 0:
                break
            await trio.sleep(0.02)
    return count


@contextmanager
def refused_port() -> Iterator[int]:
    """A 127.0.0.1 TCP port that refuses connections while the context is open.

    The socket is bound but never listens, so nobody else can take the port and every connection
    attempt gets ECONNREFUSED at once.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def _stock_connect_error_sync(conninfo: str, kwargs: dict[str, Any]) -> BaseException:
    async def attempt() -> BaseException:
        try:
            conn = await psycopg.AsyncConnection.connect(conninfo, **kwargs)
        except Exception as ex:
            return ex  # noqa: ASYNC910  # asyncio code (the reference), not trio
        await conn.close()
        raise AssertionError(f"stock psycopg connected to {conninfo!r} {kwargs!r}")

    # asyncio is confined to this worker thread: it is the reference behaviour we compare to.
    return asyncio.run(attempt())


async def stock_connect_error(conninfo: str, **kwargs: Any) -> BaseException:
    """What stock ``psycopg.AsyncConnection.connect`` raises, run on asyncio in a thread."""
    return await trio.to_thread.run_sync(_stock_connect_error_sync, conninfo, kwargs)


def first_line(ex: BaseException) -> str:
    return str(ex).splitlines()[0] if str(ex) else ""


def assert_same_error(ours: BaseException, stock: BaseException) -> None:
    """Same exception class and same first message line as stock psycopg on asyncio."""
    assert type(ours) is type(stock), (type(ours), type(stock), str(ours), str(stock))
    assert first_line(ours) == first_line(stock)


def assert_usable_idle(conn: triopool.Connection[Any]) -> None:
    assert not conn.closed
    assert not conn.broken
    assert conn.info.transaction_status == TransactionStatus.IDLE


def agen(iterator: AsyncIterator[T]) -> AsyncGenerator[T, None]:
    """Type ``cursor.stream()`` (an async generator, annotated as an iterator) for ``aclosing``."""
    assert hasattr(iterator, "aclose")
    return cast(AsyncGenerator[T, None], iterator)


def tx_status(conn: triopool.Connection[Any]) -> TransactionStatus:
    """The transaction status, read afresh (keeps mypy from narrowing it across awaits)."""
    return conn.info.transaction_status
