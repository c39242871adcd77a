"""``triopool.Connection`` never touches asyncio.

Every asyncio entry point psycopg could reach (loop accessors, tasks, futures, locks, queues,
``to_thread``), *and* every copy of them that psycopg's modules took at import time
(``from asyncio import get_running_loop`` in ``psycopg.waiting``...), is replaced by a function
that records the call and raises. A representative workload then runs under trio. Calls are also
recorded, so a use swallowed by an ``except Exception`` somewhere still fails the test.
"""

from __future__ import annotations

import asyncio
import asyncio.events
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing
from typing import Any

import psycopg
import pytest
import trio
import trio.testing
from _connection_helpers import (
    PostgresServer,
    agen,
    make_app_name,
    refused_port,
    tx_status,
    wait_until_active,
)
from psycopg import errors as e
from psycopg.pq import TransactionStatus

import triopool

Conn = triopool.Connection[Any]

# asyncio module attributes (functions and classes) that only make sense with an event loop.
_ASYNCIO_FUNCTIONS = [
    "get_running_loop",
    "get_event_loop",
    "new_event_loop",
    "set_event_loop",
    "get_event_loop_policy",
    "run",
    "Runner",
    "create_task",
    "ensure_future",
    "gather",
    "wait",
    "wait_for",
    "shield",
    "sleep",
    "to_thread",
    "run_coroutine_threadsafe",
    "timeout",
]
# Classes are not replaced in the asyncio module (isinstance() checks anywhere would break),
# but psycopg's own copies of them are (found by identity, like the functions).
_ASYNCIO_CLASSES = ["Future", "Task"]
_EVENTS_FUNCTIONS = [
    "get_running_loop",
    "_get_running_loop",
    "get_event_loop",
    "new_event_loop",
    "get_event_loop_policy",
]
# Methods of asyncio synchronisation classes (psycopg's default lock is an asyncio.Lock, its
# queued COPY writer an asyncio.Queue): patched on the classes, so subclasses are covered too.
_ASYNCIO_METHODS = {
    asyncio.Lock: ["acquire", "release", "__aenter__"],
    asyncio.Event: ["wait", "set"],
    asyncio.Condition: ["wait", "__aenter__"],
    asyncio.Semaphore: ["acquire"],
    asyncio.Queue: ["get", "put", "get_nowait", "put_nowait"],
}


class AsyncioUsed(AssertionError):
    pass


def _raiser(name: str, calls: list[str]) -> Callable[..., Any]:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        raise AsyncioUsed(f"asyncio used under trio: {name}")

    forbidden.__name__ = f"forbidden_{name.rsplit('.', 1)[-1]}"
    return forbidden


def _psycopg_module_copies(originals: dict[int, str]) -> Iterator[tuple[Any, str, str]]:
    """(module, attribute, label) for every psycopg module attribute that *is* an asyncio object.

    Found by identity, not by name, so whatever psycopg version is installed, each
    ``from asyncio import ...`` copy is found (``psycopg.waiting.get_running_loop``, ...).
    """
    for modname, module in list(sys.modules.items()):
        if module is None or not (modname == "psycopg" or modname.startswith("psycopg.")):
            continue
        for attr, value in list(vars(module).items()):
            if id(value) in originals and not attr.startswith("__"):
                yield module, attr, f"{modname}.{attr} (= asyncio.{originals[id(value)]})"


@pytest.fixture
def no_asyncio(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Make every asyncio entry point raise; yield the list of (forbidden) calls seen."""
    calls: list[str] = []
    originals: dict[int, str] = {}
    for name in _ASYNCIO_FUNCTIONS:
        originals[id(getattr(asyncio, name))] = name
    for name in _EVENTS_FUNCTIONS:
        originals.setdefault(id(getattr(asyncio.events, name)), name)
    for name in _ASYNCIO_CLASSES:
        originals[id(getattr(asyncio, name))] = name

    # Copies first (they are found by identity with the unpatched objects).
    copies = list(_psycopg_module_copies(originals))
    for module, attr, label in copies:
        monkeypatch.setattr(module, attr, _raiser(label, calls))
    for name in _ASYNCIO_FUNCTIONS:
        monkeypatch.setattr(asyncio, name, _raiser(f"asyncio.{name}", calls))
    for name in _EVENTS_FUNCTIONS:
        monkeypatch.setattr(asyncio.events, name, _raiser(f"asyncio.events.{name}", calls))
    for cls, methods in _ASYNCIO_METHODS.items():
        for method in methods:
            monkeypatch.setattr(cls, method, _raiser(f"{cls.__name__}.{method}", calls))
    # psycopg's asyncio waiting functions and helpers themselves: the trio connection must
    # never fall back to them.
    import psycopg._acompat
    import psycopg.waiting

    for module, attrs in [
        (psycopg.waiting, ["wait_async", "wait_conn_async"]),
        (psycopg._acompat, ["aspawn", "agather"]),
    ]:
        for attr in attrs:
            if hasattr(module, attr):
                monkeypatch.setattr(module, attr, _raiser(f"{module.__name__}.{attr}", calls))

    # The accessors psycopg copied at import time must have been found and patched
    # (psycopg 3.3 copies get_running_loop into psycopg.waiting; 3.2 calls asyncio.* instead).
    labels = [label for _, _, label in copies]
    if hasattr(psycopg.waiting, "get_running_loop"):
        assert any(label.startswith("psycopg.waiting.get_running_loop") for label in labels), labels

    yield calls
    assert calls == [], f"asyncio was used: {calls}"


def test_fixture_really_forbids_asyncio(no_asyncio: list[str]) -> None:
    # Guard against a fixture that patches nothing: stock psycopg must trip it.
    import psycopg.waiting

    with pytest.raises(AsyncioUsed):
        asyncio.get_running_loop()
    if hasattr(psycopg.waiting, "get_running_loop"):  # psycopg 3.3's import-time copy
        with pytest.raises(AsyncioUsed):
            psycopg.waiting.get_running_loop()
    with pytest.raises(AsyncioUsed):
        asyncio.Lock().acquire()  # type: ignore[unused-coroutine]
    no_asyncio.clear()


def test_stock_psycopg_trips_the_fixture(no_asyncio: list[str], postgres_dsn: str) -> None:
    # Stock psycopg's AsyncConnection, run by trio, must fail here: proof the check has teeth.
    async def main() -> None:
        with pytest.raises(AsyncioUsed):
            await psycopg.AsyncConnection.connect(postgres_dsn)

    trio.run(main)
    assert no_asyncio
    no_asyncio.clear()


@pytest.fixture
async def aconn(postgres_dsn: str, request: pytest.FixtureRequest) -> AsyncIterator[Conn]:
    c = await triopool.Connection.connect(
        postgres_dsn, autocommit=True, application_name=make_app_name(str(request.node.name))
    )
    try:
        yield c
    finally:
        with trio.move_on_after(5, shield=True):
            await c.close()


async def test_connect_and_execute(no_asyncio: list[str], postgres_dsn: str) -> None:
    async with await triopool.Connection.connect(postgres_dsn) as conn:
        cur = await conn.execute("SELECT %s::int, %s::text", [1, "a"])
        assert await cur.fetchone() == (1, "a")
        cur = await conn.execute("SELECT %(x)s::int", {"x": 2})
        assert await cur.fetchone() == (2,)
        await cur.execute("SELECT generate_series(1, 10)")
        assert len(await cur.fetchall()) == 10


async def test_connect_paths(no_asyncio: list[str], postgres_server: PostgresServer) -> None:
    # DNS, several hosts (the first one dead), load balancing, connect_timeout.
    with refused_port() as dead:
        conninfo = postgres_server.conninfo(
            host="localhost,127.0.0.1",
            port=f"{dead},{postgres_server.port}",
            connect_timeout=2,
            load_balance_hosts="random",
            target_session_attrs="read-write",
        )
        for _ in range(3):
            conn = await triopool.Connection.connect(conninfo)
            assert conn.info.port == postgres_server.port
            await conn.close()
        with pytest.raises(psycopg.OperationalError):
            await triopool.Connection.connect(postgres_server.conninfo(host="127.0.0.1", port=dead))


async def failing_savepoint(conn: Conn) -> None:
    async with conn.transaction():
        await conn.execute("INSERT INTO t VALUES (2)")
        raise ValueError


async def test_transaction_and_cursors(no_asyncio: list[str], postgres_dsn: str) -> None:
    conn = await triopool.Connection.connect(postgres_dsn)
    try:
        await conn.execute("CREATE TEMP TABLE t (id int)")
        async with conn.transaction():
            await conn.execute("INSERT INTO t VALUES (1)")
            with pytest.raises(ValueError):
                await failing_savepoint(conn)
        async with conn.cursor("named") as cur:
            await cur.execute("SELECT generate_series(1, 100)")
            assert len(await cur.fetchmany(10)) == 10
        n = 0
        async with aclosing(agen(conn.cursor().stream("SELECT generate_series(1, 100)"))) as rows:
            async for _ in rows:
                n += 1
        assert n == 100
        cur2 = await conn.execute("SELECT id FROM t")
        assert await cur2.fetchall() == [(1,)]
        await conn.commit()
        await conn.set_autocommit(True)
        await conn.execute("SELECT 1", prepare=True)
    finally:
        with trio.move_on_after(5, shield=True):
            await conn.close()


async def test_pipeline_and_copy(no_asyncio: list[str], aconn: Conn) -> None:
    async with aconn.pipeline() as p:
        c1 = await aconn.execute("SELECT 1")
        c2 = await aconn.execute("SELECT 2")
        await p.sync()
        assert (await c1.fetchone(), await c2.fetchone()) == ((1,), (2,))
    await aconn.execute("CREATE TEMP TABLE c (id int, data text)")
    cur = aconn.cursor()
    async with cur.copy("COPY c FROM STDIN") as copy:
        await copy.write_row((1, "a"))
        await copy.write(b"2\tb\n")
    async with cur.copy("COPY c TO STDOUT") as copy:
        data = b"".join([bytes(b) async for b in copy])
    # (psycopg sends raw write() data before rows still buffered by write_row(): compare sets)
    assert sorted(data.splitlines()) == [b"1\ta", b"2\tb"]


async def test_notifies(no_asyncio: list[str], aconn: Conn, postgres_dsn: str) -> None:
    await aconn.execute("LISTEN ch")
    assert [n async for n in aconn.notifies(timeout=0.1)] == []
    async with await triopool.Connection.connect(postgres_dsn, autocommit=True) as other:
        got: list[str] = []
        async with trio.open_nursery() as nursery:

            async def listen() -> None:
                async for n in aconn.notifies(timeout=5, stop_after=1):
                    got.append(n.payload)

            nursery.start_soon(listen)
            await trio.testing.wait_all_tasks_blocked()
            await other.execute("NOTIFY ch, 'x'")
    assert got == ["x"]


async def test_cancellation(no_asyncio: list[str], aconn: Conn, postgres_dsn: str) -> None:
    # Cancel scope (cancel request + drain), interrupted stream and cancel_safe: the three
    # paths that use asyncio in stock psycopg.
    with trio.move_on_after(0.2) as scope:
        await aconn.execute("SELECT pg_sleep(30)")
    assert scope.cancelled_caught
    assert tx_status(aconn) == TransactionStatus.IDLE

    query = (
        "SELECT repeat('x', 10000) FROM generate_series(1, 5) UNION ALL SELECT pg_sleep(30)::text"
    )
    async with aclosing(agen(aconn.cursor().stream(query))) as rows:
        async for _ in rows:
            break
    assert tx_status(aconn) == TransactionStatus.IDLE

    async def run_query() -> None:
        with pytest.raises(e.QueryCanceled):
            await aconn.execute("SELECT pg_sleep(30)")

    admin = await triopool.Connection.connect(postgres_dsn, autocommit=True)
    async with admin, trio.open_nursery() as nursery:
        nursery.start_soon(run_query)
        await wait_until_active(admin, aconn.info.backend_pid, "pg_sleep")
        await aconn.cancel_safe()
    cur = await aconn.execute("SELECT 1")
    assert await cur.fetchone() == (1,)


async def test_contended_lock(no_asyncio: list[str], aconn: Conn) -> None:
    results: list[int] = []

    async def query(i: int) -> None:
        cur = await aconn.execute("SELECT %s::int", [i])
        row = await cur.fetchone()
        assert row is not None
        results.append(row[0])

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(query, i)
    assert sorted(results) == list(range(10))


def test_plain_trio_run(no_asyncio: list[str], postgres_dsn: str) -> None:
    # Outside pytest-trio: a bare trio.run, nothing else around.
    async def main() -> list[Any]:
        async with await triopool.Connection.connect(postgres_dsn, autocommit=True) as conn:
            cur = await conn.execute("SELECT 'plain trio'")
            with trio.move_on_after(0.1):
                await conn.execute("SELECT pg_sleep(10)")
            rows = await cur.fetchall()
            cur = await conn.execute("SELECT 1")
            return rows + await cur.fetchall()

    assert trio.run(main) == [("plain trio",), (1,)]
