"""Shared pieces of the pool contract suite, run over both pool classes.

The suite (``test_pool_contract.py``, ``test_pool_lifetimes.py``,
``test_pool_callbacks.py``) mirrors psycopg_pool's own tests
(``tests/pool/test_pool_common_async.py`` and friends) against the real
server.  Import the fixtures with ``from _contract_helpers import pool_cls as
pool_cls`` (the redundant alias tells linters the name is used).

Most tests have one shape for both classes: a connection handed from one
client straight to a queued one (`queued_client`) is reused by the null pool
too, so "same backend" and "new backend" mean the same thing for both.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import psycopg
import pytest
import trio
import trio.testing
from _pool_checks import Server, app_name, assert_no_leaks, assert_settled

from triopool import Connection, ConnectionPool, NullConnectionPool

PoolClass: TypeAlias = type[ConnectionPool]
AnyConnection: TypeAlias = Connection[Any]
Probe: TypeAlias = Callable[[AnyConnection], Awaitable[object]]


@pytest.fixture(params=[ConnectionPool, NullConnectionPool], ids=["pool", "null"])
def pool_cls(request: pytest.FixtureRequest) -> PoolClass:
    """Each pool class in turn: the contract is the same, but where spec §3 says."""
    cls: PoolClass = request.param
    return cls


@pytest.fixture
def name() -> str:
    """This test's ``application_name``: its backends, counted on the server."""
    return app_name("tp_contract")


@pytest.fixture
def refused_dsn() -> Iterator[str]:
    """A DSN whose connections are refused at once.

    The port is bound but not listening for the whole test, so nothing else
    can take it and every connect gets ECONNREFUSED.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres?connect_timeout=2"


def is_null(cls: PoolClass) -> bool:
    return issubclass(cls, NullConnectionPool)


def min_for(cls: PoolClass, wanted: int) -> int:
    """`wanted` as ``min_size`` for a `ConnectionPool`; the null pool only takes 0."""
    return 0 if is_null(cls) else wanted


@asynccontextmanager
async def contract_pool(
    cls: PoolClass, server: Server, name: str, **options: Any
) -> AsyncIterator[ConnectionPool]:
    """An open pool of `cls` on `server`, its backends named `name`.

    The block's end is the leak check: nothing lent and the books balanced
    while open; then, once closed, no task left and no backend on the server.
    """
    kwargs = {"application_name": name, **options.pop("kwargs", {})}
    async with cls(server.dsn, kwargs=kwargs, **options) as pool:
        yield pool
        await trio.testing.wait_all_tasks_blocked()
        assert_no_leaks(pool)
    await assert_settled(pool, server, name)


async def wait_queued(pool: ConnectionPool, count: int) -> None:
    """Let every task run until it blocks, then `count` clients must be queued."""
    await trio.testing.wait_all_tasks_blocked()
    assert pool.status().waiting == count


def pending(pool: ConnectionPool) -> int:
    """Clients waiting for a connection: queued, or (null pool) with one opened for them."""
    return len(pool._policy.waiters())


async def eventually(check: Callable[[], bool], within: float = 5.0) -> float:
    """Wait until `check()` holds (polled; the pool's actors do real I/O); return when.

    Fails if it does not hold within `within` seconds.
    """
    with trio.fail_after(within):
        await trio.lowlevel.checkpoint()
        while not check():  # noqa: ASYNC110  # the state changes after network round trips
            await trio.sleep(0.01)
    return trio.current_time()


async def backend_pids(server: Server, name: str) -> set[int]:
    """The pids of the server's backends named `name`."""
    rows = await trio.to_thread.run_sync(
        server.execute,
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
        (name,),
    )
    return {int(str(row[0])) for row in rows}


async def terminate(server: Server, pid: int) -> None:
    """``pg_terminate_backend(pid)``, waiting until that backend is gone."""
    await trio.to_thread.run_sync(server.execute, "SELECT pg_terminate_backend(%s)", (pid,))
    with trio.fail_after(5):
        while await trio.to_thread.run_sync(  # noqa: ASYNC110  # server-side state
            server.execute, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)
        ):
            await trio.sleep(0.01)


@dataclass
class Seen:
    """What a client saw of the connection it got (see `queued_client`)."""

    pid: int = 0
    status: psycopg.pq.TransactionStatus | None = None
    probed: object = None
    error: BaseException | None = None
    done: trio.Event = field(default_factory=trio.Event)


@asynccontextmanager
async def queued_client(
    pool: ConnectionPool,
    probe: Probe | None = None,
    *,
    timeout: float | None = None,  # noqa: ASYNC109  # the client's request timeout
) -> AsyncIterator[Seen]:
    """A client queued for `pool`'s next connection while the block runs.

    It must be queued at once (the block starts with nothing available); the
    block then typically gives a connection back, and the client records the
    backend pid and transaction status it got, and `probe`'s result.  A pool
    error it gets (e.g. `PoolClosed`) is recorded instead.  Leaving the
    block waits for the client to finish.
    """
    seen = Seen()
    waiting = pending(pool)

    async def client() -> None:  # noqa: ASYNC910  # pool.connection() always checkpoints
        try:
            async with pool.connection(timeout) as conn:
                seen.pid = conn.info.backend_pid
                seen.status = conn.info.transaction_status
                if probe is not None:
                    seen.probed = await probe(conn)
        except psycopg.OperationalError as error:
            seen.error = error
        finally:
            seen.done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client)
        await trio.testing.wait_all_tasks_blocked()
        assert pending(pool) == waiting + 1
        yield seen
        with trio.fail_after(5):
            await seen.done.wait()


async def fetch_value(conn: AnyConnection, query: str) -> object:
    """The first column of the first row of `query`."""
    cur = await conn.execute(query)
    row = await cur.fetchone()
    assert row is not None
    return row[0]


def pool_records(caplog: pytest.LogCaptureFixture, pool: ConnectionPool) -> list[str]:
    """The messages the ``triopool`` logger wrote; each must name `pool`."""
    messages = [r.getMessage() for r in caplog.records if r.name == "triopool"]
    for message in messages:
        assert pool.name in message, message
    return messages


def capture_pool_logs(caplog: pytest.LogCaptureFixture) -> None:
    """Capture the ``triopool`` logger from INFO up."""
    caplog.set_level(logging.INFO, logger="triopool")
