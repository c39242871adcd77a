"""Shared pieces of the hostile tests (``test_hostile_*.py``).

Those tests attack the pool as a hostile (or careless) user would: parameters
at their edges, callbacks that misbehave, one object used by two tasks,
cancellation and errors on every exit path.  Each ends with the pool's
invariants: nothing lent, the books balanced, ``size <= max_size``, and no
backend left on the server once the pool is closed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from _fake_server import FakeConnection, FakeServer
from _pool_checks import Server, app_name, assert_no_leaks, assert_settled

from triopool import ConnectionPool, NullConnectionPool

PoolClass = type[ConnectionPool]

#: Bound of any single wait on the real server (generous: the machine is shared).
WITHIN = 5.0

both_classes = pytest.mark.parametrize(
    "pool_class", [ConnectionPool, NullConnectionPool], ids=["pool", "null"]
)


class Boom(Exception):
    """An error of the test's own."""


class Stop(BaseException):
    """Not an Exception, as KeyboardInterrupt or SystemExit are not."""


@pytest.fixture
def name() -> str:
    """This test's ``application_name``: its backends, found on the server."""
    return app_name("tp_hostile")


@pytest.fixture
def table(postgres_server: Server) -> Iterator[str]:
    """A table of this test's own, ``(x int)``, dropped afterwards."""
    table = app_name("tp_hostile_t")
    postgres_server.execute(f"CREATE TABLE {table} (x int)")
    yield table
    postgres_server.execute(f"DROP TABLE {table}")


def min_for(pool_class: PoolClass, wanted: int) -> int:
    """`wanted` as ``min_size`` for a `ConnectionPool`; a null pool takes only 0."""
    return 0 if issubclass(pool_class, NullConnectionPool) else wanted


async def rows_in(server: Server, table: str) -> list[int]:
    """The values committed in `table`, as another session sees them."""
    rows = await trio.to_thread.run_sync(server.execute, f"SELECT x FROM {table} ORDER BY x")
    return [int(str(row[0])) for row in rows]


@asynccontextmanager
async def real_pool(
    server: Server, name: str, pool_class: PoolClass = ConnectionPool, **options: Any
) -> AsyncIterator[ConnectionPool]:
    """An open pool on `server`, its backends named `name`.

    At the end of the block: nothing lent and the books balanced; once
    closed: no task left, no backend on the server.
    """
    kwargs = {"application_name": name, **options.pop("kwargs", {})}
    options.setdefault("timeout", WITHIN)
    async with pool_class(server.dsn, kwargs=kwargs, **options) as pool:
        yield pool
        await trio.testing.wait_all_tasks_blocked()
        assert_no_leaks(pool)
    await assert_settled(pool, server, name)


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
        assert_no_leaks(pool)
    assert server.open_connections == []
