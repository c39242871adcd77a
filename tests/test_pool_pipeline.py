"""One-shot statements pipelined by the connection actors, against the real server.

How one-shot calls (``fetch``, ``execute``...) and borrowers (``connection()``,
``getconn``) share connections, and what happens around a statement in
flight: many statements from many callers ride one connection, at most
``pipeline_depth`` at a time; one FIFO queue serves both kinds and a
connection with statements in flight is never lent; a cancelled caller's
statement is cancelled on the server only when nothing else runs there; a
connection that breaks fails every statement on it and is replaced; prepared
statements work in pipelines.

A statement is held on the server by an advisory lock another connection
holds (`lock_held`), so that the statements sent behind it stay in flight
for as long as a test needs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest
import trio
import trio.testing
from _contract_helpers import contract_pool, terminate
from _contract_helpers import name as name
from _fault_helpers import until
from _pool_checks import Server
from psycopg import errors

from triopool import Connection, ConnectionPool, PoolClosed
from triopool._policy import SlotState

LOCK_KEY = 4242
#: A statement that waits until the test releases `LOCK_KEY`, then returns "waited".
WAITS = "SELECT 'waited' FROM (SELECT pg_advisory_xact_lock(%s)) AS locked"


class Lock:
    """An advisory lock held by a connection of the test's own."""

    def __init__(self, conn: Connection[Any], server: Server, name: str) -> None:
        self.conn = conn
        self.server = server
        self.name = name
        self.held = True

    async def waited_on(self) -> None:
        """Wait until a backend of the pool under test waits for the lock."""

        def waiting() -> bool:
            rows = self.server.execute(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = %s"
                " AND wait_event_type = 'Lock'",
                (self.name,),
            )
            return bool(rows)

        await until(lambda: trio.to_thread.run_sync(waiting), 5, "a backend waits for the lock")

    async def release(self) -> None:  # noqa: ASYNC910  # released already: nothing to do
        if self.held:
            self.held = False
            await self.conn.execute("SELECT pg_advisory_unlock(%s)", [LOCK_KEY])


@asynccontextmanager
async def lock_held(server: Server, name: str) -> AsyncIterator[Lock]:
    async with await Connection.connect(server.dsn, autocommit=True) as conn:
        await conn.execute("SELECT pg_advisory_lock(%s)", [LOCK_KEY])
        lock = Lock(conn, server, name)
        try:
            yield lock
        finally:
            await lock.release()  # noqa: ASYNC102  # test clean-up: one quick round trip


def pipelining(pool: ConnectionPool) -> list[int]:
    """Statements in flight on each pipelining connection of `pool`."""
    return [s.in_flight for s in pool._policy.slots.values() if s.state is SlotState.PIPELINING]


class Calls:
    """Callers started in a nursery, each recording its result or its error."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.results: dict[str, object] = {}
        self.scopes: dict[str, trio.CancelScope] = {}

    async def start(self, key: str, call: Callable[[], Awaitable[object]]) -> None:
        """Start a caller, and let it (and everything else) run until blocked."""
        scope = self.scopes[key] = trio.CancelScope()

        async def caller() -> None:  # noqa: ASYNC910  # the call awaits, or its scope was cancelled
            with scope:
                try:
                    self.results[key] = await call()
                except psycopg.Error as ex:
                    self.results[key] = ex
            if scope.cancelled_caught:
                self.results[key] = "cancelled"

        self.nursery.start_soon(caller)
        await trio.testing.wait_all_tasks_blocked()


@asynccontextmanager
async def calls() -> AsyncIterator[Calls]:
    async with trio.open_nursery() as nursery:
        yield Calls(nursery)


async def behind_the_lock(c: Calls, pool: ConnectionPool, count: int, factor: int = 1) -> None:
    """Start a statement waiting for `LOCK_KEY`, then `count` callers behind it
    (``s0``...: each asks for ``i * factor``)."""
    await c.start("waits", lambda: pool.fetchval(WAITS, [LOCK_KEY]))
    for i in range(count):
        await c.start(f"s{i}", lambda i=i: pool.fetchval("SELECT %s::int * %s", [i, factor]))  # type: ignore[misc]


async def test_statements_of_many_callers_share_one_connection(
    postgres_server: Server, name: str
) -> None:
    """Eleven callers on a pool of one: all their statements are in flight on the one
    connection at once (sent behind a statement that waits), then each caller gets its
    own result."""
    async with (
        contract_pool(ConnectionPool, postgres_server, name, min_size=1, max_size=1) as pool,
        lock_held(postgres_server, name) as lock,
        calls() as c,
    ):
        await pool.wait(5)
        await behind_the_lock(c, pool, 10, factor=2)
        assert pipelining(pool) == [11]
        assert pool.status().waiting == 0
        await lock.waited_on()
        await lock.release()
    assert c.results == {"waits": "waited", **{f"s{i}": 2 * i for i in range(10)}}
    assert pool.get_stats()["requests_num"] == 11


async def test_pipeline_depth_bounds_statements_in_flight(
    postgres_server: Server, name: str
) -> None:
    async with (
        contract_pool(
            ConnectionPool, postgres_server, name, min_size=1, max_size=1, pipeline_depth=3
        ) as pool,
        lock_held(postgres_server, name) as lock,
        calls() as c,
    ):
        await pool.wait(5)
        await behind_the_lock(c, pool, 5)
        assert pipelining(pool) == [3]
        assert pool.status().waiting == 3
        await lock.release()
    assert c.results == {"waits": "waited", **{f"s{i}": i for i in range(5)}}
    assert pool.get_stats()["requests_queued"] == 3


async def test_fifo_across_statements_and_borrowers_and_no_loan_while_in_flight(
    postgres_server: Server, name: str
) -> None:
    """A borrower arriving while statements are in flight waits, and statements arriving
    after it wait behind it, though the connection has room: it gets the connection once
    nothing is in flight, out of pipeline mode and idle; the statements behind it run
    after it gave the connection back."""
    seen: list[str] = []
    async with (
        contract_pool(ConnectionPool, postgres_server, name, min_size=1, max_size=1) as pool,
        lock_held(postgres_server, name) as lock,
        calls() as c,
    ):
        await pool.wait(5)
        await c.start("waits", lambda: pool.fetchval(WAITS, [LOCK_KEY]))

        async def borrower() -> object:
            async with pool.connection() as conn:
                assert conn.pgconn.pipeline_status == psycopg.pq.PipelineStatus.OFF
                assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
                seen.append("borrower")
                await trio.testing.wait_all_tasks_blocked()
                cur = await conn.execute("SELECT 'borrowed'")
                return (await cur.fetchone() or [None])[0]

        async def after() -> object:
            value = await pool.fetchval("SELECT 'after'")
            seen.append("after")
            return value

        await c.start("borrower", borrower)
        await c.start("after", after)
        assert pipelining(pool) == [1]
        assert pool.status().waiting == 2
        await lock.release()
    assert c.results == {"waits": "waited", "borrower": "borrowed", "after": "after"}
    assert seen == ["borrower", "after"]


async def test_cancelled_caller_behind_others_leaves_its_statement_running(
    postgres_server: Server, name: str
) -> None:
    """A caller cancelled while its statement is in flight between two others': no
    cancel request is sent (it would hit another caller's statement); the statement
    runs and commits; the callers around it get their results."""
    async with (
        contract_pool(ConnectionPool, postgres_server, name, min_size=1, max_size=1) as pool,
        lock_held(postgres_server, name) as lock,
    ):
        await pool.execute("DROP TABLE IF EXISTS t_cancelled")
        await pool.execute("CREATE TABLE t_cancelled (note text)")
        async with calls() as c:
            await c.start("waits", lambda: pool.fetchval(WAITS, [LOCK_KEY]))
            await c.start(
                "cancelled", lambda: pool.execute("INSERT INTO t_cancelled VALUES ('ran')")
            )
            await c.start("next", lambda: pool.fetchval("SELECT 'next'"))
            c.scopes["cancelled"].cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert c.results == {"cancelled": "cancelled"}
            assert pipelining(pool) == [3]  # still in flight, result to be dropped
            assert not pool._policy.slots[0].held  # no cancel request: "next" is behind it
            await lock.release()
        assert c.results == {"cancelled": "cancelled", "waits": "waited", "next": "next"}
        assert await pool.fetch("SELECT note FROM t_cancelled") == [("ran",)]
        await pool.execute("DROP TABLE t_cancelled")


async def test_cancelled_caller_last_in_flight_is_cancelled_on_the_server(
    postgres_server: Server, name: str
) -> None:
    """A caller cancelled while its statement is the last one sent: the connection takes
    no new statement, and once the statements before it are done a cancel request stops
    it on the server; then the connection serves again."""
    async with (
        contract_pool(ConnectionPool, postgres_server, name, min_size=1, max_size=1) as pool,
        lock_held(postgres_server, name) as lock,
        calls() as c,
    ):
        await pool.wait(5)
        await c.start("waits", lambda: pool.fetchval(WAITS, [LOCK_KEY]))
        await c.start("sleeps", lambda: pool.execute("SELECT pg_sleep(60)"))
        c.scopes["sleeps"].cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert pool._policy.slots[0].held
        await c.start("later", lambda: pool.fetchval("SELECT 'later'"))
        assert pipelining(pool) == [2]  # "later" waits: the connection is held
        assert pool.status().waiting == 1
        started = trio.current_time()
        await lock.release()
        with trio.fail_after(10):  # noqa: ASYNC912  # bounds the wait for the caller
            while "later" not in c.results:  # noqa: ASYNC110  # the caller sets it
                await trio.sleep(0.01)
        assert trio.current_time() - started < 5  # not pg_sleep(60)
    assert c.results == {"sleeps": "cancelled", "waits": "waited", "later": "later"}


async def test_killed_backend_fails_every_statement_in_flight_and_is_replaced(
    postgres_server: Server, name: str
) -> None:
    async with (
        contract_pool(ConnectionPool, postgres_server, name, min_size=1, max_size=1) as pool,
        lock_held(postgres_server, name) as lock,
    ):
        pid = await pool.fetchval("SELECT pg_backend_pid()")
        async with calls() as c:
            await behind_the_lock(c, pool, 4)
            await lock.waited_on()
            await terminate(postgres_server, pid)
        await lock.release()
        assert pool.get_stats()["connections_lost"] == 1
        assert await pool.fetchval("SELECT pg_backend_pid()") != pid
    assert set(c.results) == {"waits", "s0", "s1", "s2", "s3"}
    for error in c.results.values():
        assert isinstance(error, psycopg.OperationalError), error
        assert isinstance(error, errors.AdminShutdown)  # the server's reason, for each
    assert len({id(error) for error in c.results.values()}) == 5  # an error each


async def test_prepared_statements_in_pipelines(postgres_server: Server, name: str) -> None:
    """With ``prepare_threshold`` the statements repeated in pipelines are prepared
    (once), results stay right, and psycopg's cache evicts what exceeds
    ``prepared_max`` on the server too (shared with the connection's borrowers);
    with None nothing is prepared."""

    async def configure(conn: Connection[Any]) -> None:  # noqa: ASYNC124, ASYNC910  # the pool's configure callback is async
        conn.prepared_max = 3

    for threshold in (0, None):
        async with contract_pool(
            ConnectionPool,
            postgres_server,
            name,
            min_size=1,
            max_size=1,
            kwargs={"prepare_threshold": threshold},
            configure=configure,
        ) as pool:
            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(pool.fetchval, "SELECT %s::int + 1", [i])
            results = [await pool.fetchval(f"SELECT %s::int + {j}", [j]) for j in range(6)]
            assert results == [2 * j for j in range(6)]
            async with pool.connection() as conn:
                # (The deallocation psycopg asks for last rides on the next statement.)
                for _ in range(2):
                    cur = await conn.execute(
                        "SELECT count(*) FROM pg_prepared_statements", prepare=False
                    )
                    prepared = (await cur.fetchone() or [None])[0]
            assert prepared == (3 if threshold == 0 else 0)


async def test_statements_that_would_open_a_transaction_are_refused(
    postgres_server: Server, name: str
) -> None:
    async with contract_pool(ConnectionPool, postgres_server, name, min_size=1) as pool:
        for query in ("BEGIN", "  /* a /* nested */ comment */ begin", "-- x\nSTART TRANSACTION"):
            with pytest.raises(psycopg.ProgrammingError, match="cannot open one"):
                await pool.execute(query)
        with pytest.raises(errors.SyntaxError, match="multiple commands"):
            await pool.execute("SELECT 1; SELECT 2")
        assert await pool.fetchval("SELECT 'fine'") == "fine"
        assert pool.get_stats()["connections_lost"] == 0


async def test_executemany_adapts_everything_before_sending(
    postgres_server: Server, name: str
) -> None:
    async with contract_pool(ConnectionPool, postgres_server, name, min_size=1) as pool:
        await pool.execute("DROP TABLE IF EXISTS t_many")
        await pool.execute("CREATE TABLE t_many (id int)")
        with pytest.raises(psycopg.ProgrammingError):
            await pool.executemany("INSERT INTO t_many VALUES (%s)", [[1], [2], [object()]])
        assert await pool.executemany("INSERT INTO t_many VALUES (%s)", []) == 0
        assert await pool.fetchval("SELECT count(*) FROM t_many") == 0
        await pool.execute("DROP TABLE t_many")


async def test_close_with_statements_in_flight(postgres_server: Server, name: str) -> None:
    """Closing the pool lets the statements in flight finish within its timeout, then
    fails those still there with `PoolClosed`; nothing hangs."""
    async with (
        lock_held(postgres_server, name) as lock,
        contract_pool(ConnectionPool, postgres_server, name, min_size=1, max_size=1) as pool,
        calls() as c,
    ):
        await pool.wait(5)
        await c.start("waits", lambda: pool.fetchval(WAITS, [LOCK_KEY]))
        await c.start("next", lambda: pool.fetchval("SELECT 1"))
        with trio.fail_after(10):
            await pool.close(timeout=0.5)
        await trio.testing.wait_all_tasks_blocked()
        assert set(c.results) == {"waits", "next"}
        assert all(isinstance(r, PoolClosed) for r in c.results.values()), c.results
        await lock.release()


async def test_a_statement_larger_than_the_socket_takes_goes_out(
    postgres_server: Server, name: str
) -> None:
    """Megabytes of executemany behind a statement that waits: the server reads nothing
    meanwhile, so the socket takes only part of it; the actor is woken to write the rest
    as the server reads, nothing stalls, and the statement behind it gets its result."""
    rows = [[i, "x" * 2000] for i in range(3000)]  # ~6 MB of parameters
    async with (
        contract_pool(ConnectionPool, postgres_server, name, min_size=1, max_size=1) as pool,
        lock_held(postgres_server, name) as lock,
    ):
        await pool.execute("DROP TABLE IF EXISTS t_big")
        await pool.execute("CREATE TABLE t_big (id int, note text)")
        async with calls() as c:
            await c.start("waits", lambda: pool.fetchval(WAITS, [LOCK_KEY]))
            await c.start(
                "many", lambda: pool.executemany("INSERT INTO t_big VALUES (%s, %s)", rows)
            )
            await c.start("after", lambda: pool.fetchval("SELECT 'after'"))
            assert pipelining(pool) == [3]
            await lock.release()
        assert c.results == {"waits": "waited", "many": 3000, "after": "after"}
        assert await pool.fetchval("SELECT count(*) FROM t_big") == 3000
        await pool.execute("DROP TABLE t_big")
