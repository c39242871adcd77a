"""Cancellation at every checkpoint of every pool operation, against the real server.

Each test sweeps k = 0, 1, 2... : the operation runs in a cancel scope that is
cancelled after exactly k scheduling steps (`_fault_helpers.cancel_after_steps`,
a `trio.abc.Instrument`), until a run completes without being cancelled.
After every run the leak check passes (books and server backends agree) and,
unless the operation closes the pool, the pool still serves a request.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing
from _fault_helpers import (
    cancel_after_steps,
    completes_despite,
    pool_pids,
    quiesce,
    serves,
    settle,
    sweep_checkpoints,
)
from _pool_checks import Server, app_name, settled_backends

import triopool
from triopool import Connection, ConnectionPool

AnyConnection = Connection[Any]


@pytest.fixture
def name() -> str:
    return app_name("tp_cancel")


def pool_options(name: str, **options: Any) -> dict[str, Any]:
    return {"min_size": 2, "max_size": 4, "kwargs": {"application_name": name}, **options}


@pytest.fixture
async def pool(
    postgres_dsn: str, postgres_server: Server, name: str
) -> AsyncIterator[ConnectionPool]:
    async with triopool.open_pool(postgres_dsn, wait=True, **pool_options(name)) as pool:
        yield pool
    await settle(pool, postgres_server, name)


async def sweep_on_pool(
    pool: ConnectionPool,
    server: Server,
    name: str,
    run: Callable[[int], Awaitable[bool]],
) -> int:
    """`sweep_checkpoints` of `run`, with the leak check and a served request after each run."""

    async def case(k: int) -> bool:
        done = await run(k)
        await settle(pool, server, name)
        await serves(pool)
        await settle(pool, server, name)
        return done

    return await sweep_checkpoints(case)


# -- requests ------------------------------------------------------------------------


async def test_connection_enter_with_an_idle_connection(
    pool: ConnectionPool, postgres_server: Server, name: str
) -> None:
    """``connection()`` entered with a connection idle: a cancel at any step leaks nothing."""

    async def enter() -> None:
        async with pool.connection():
            pass

    k = await sweep_on_pool(pool, postgres_server, name, lambda k: completes_despite(k, enter))
    assert k >= 1  # k=0 was cancelled: entering checkpoints


async def test_connection_enter_while_queued_every_task_step(
    pool: ConnectionPool, postgres_server: Server, name: str
) -> None:
    """A queued ``connection()`` cancelled after any step of *any* task (the hand-off from
    the client giving a connection back included) loses nothing and never lends it twice."""
    held = [await pool.getconn() for _ in range(pool.max_size)]
    got: list[AnyConnection] = []

    async def queued_then_granted() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.putconn, held[0])  # gives it back once we queue
            async with pool.connection(timeout=5) as conn:
                got.append(conn)
                await conn.execute("SELECT 1")

    async def run(k: int) -> bool:
        got.clear()
        done = await completes_despite(k, queued_then_granted, every_task=True)
        # The connection given back is idle again (or was served and returned).
        await quiesce(pool)
        held[0] = await pool.getconn(timeout=5)
        assert pool.status().available == 0
        return done

    async def case(k: int) -> bool:
        done = await run(k)
        assert len(got) <= 1
        return done

    await sweep_checkpoints(case)
    for conn in held:
        await pool.putconn(conn)
    await settle(pool, postgres_server, name)
    await serves(pool)


async def test_connection_exit_commits_or_rolls_back(
    pool: ConnectionPool, postgres_server: Server, name: str
) -> None:
    """Leaving ``connection()`` (the commit) cancelled at any step: the connection is returned
    and the transaction is committed only if the exit completed."""
    table = f"tp_cancel_{uuid.uuid4().hex[:8]}"
    async with pool.connection() as conn:
        await conn.execute(f"CREATE TABLE {table} (k int)")
    ambiguous: list[int] = []

    async def run(k: int) -> bool:
        done = False
        with trio.CancelScope() as scope, ExitStack() as armed:
            async with pool.connection() as conn:
                await conn.execute(f"INSERT INTO {table} VALUES (%s)", [k])
                armed.enter_context(cancel_after_steps(k, scope.cancel))  # counts the exit's
            done = True
        async with pool.connection() as conn:
            cur = await conn.execute(f"SELECT count(*) FROM {table} WHERE k = %s", [k])
            row = await cur.fetchone()
        committed = row == (1,)
        if done:
            assert committed
        elif committed:
            ambiguous.append(k)  # COMMIT reached the server before the cancel: see below
        return done

    k = await sweep_on_pool(pool, postgres_server, name, run)
    assert k >= 1
    # A cancel that lands after COMMIT was sent cannot undo it; psycopg and every driver
    # share this ambiguity.  At most the last step (waiting for COMMIT's reply) may show it.
    assert all(step >= k - 1 for step in ambiguous), (ambiguous, k)
    async with pool.connection() as conn:
        await conn.execute(f"DROP TABLE {table}")


async def test_getconn(pool: ConnectionPool, postgres_server: Server, name: str) -> None:
    """``getconn`` cancelled at any step takes nothing (or the connection is held)."""
    got: list[AnyConnection] = []

    async def getconn() -> None:
        got.append(await pool.getconn())

    async def run(k: int) -> bool:
        got.clear()
        done = await completes_despite(k, getconn)
        assert len(got) == int(done)
        for conn in got:
            await pool.putconn(conn)
        return done

    assert await sweep_on_pool(pool, postgres_server, name, run) >= 1


async def test_putconn_in_a_cancelled_scope(
    pool: ConnectionPool, postgres_server: Server, name: str
) -> None:
    """``putconn`` is not a checkpoint: even in a cancelled scope the connection goes back."""

    async def run(k: int) -> bool:
        conn = await pool.getconn()
        await conn.execute("SELECT 1")  # dirty: rolled back by the pool
        done = await completes_despite(k, lambda: pool.putconn(conn))
        assert done
        return done

    assert await sweep_on_pool(pool, postgres_server, name, run) == 0


async def test_query_inside_connection(
    pool: ConnectionPool, postgres_server: Server, name: str
) -> None:
    """A query (in a transaction, rows fetched) cancelled at any step: the connection is
    rolled back and returned, or discarded if it could not be."""

    async def query() -> None:
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
            cur = await conn.execute("SELECT generate_series(1, 2000)")
            assert len(await cur.fetchall()) == 2000

    assert (
        await sweep_on_pool(pool, postgres_server, name, lambda k: completes_despite(k, query)) >= 2
    )


# -- callbacks ---------------------------------------------------------------------


@dataclass
class Plan:
    """What a callback does on its next call: run `action` after `k` of its steps."""

    k: int = 0
    action: Callable[[], object] | None = None
    completed: int = 0

    @contextmanager
    def armed(self) -> Iterator[None]:
        """Arm the plan (once) for the body of a callback; count completed bodies."""
        action, self.action = self.action, None
        if action is None:
            yield
        else:
            with cancel_after_steps(self.k, action):
                yield
        self.completed += 1


async def test_check_callback_cancelled_inside(
    postgres_dsn: str, postgres_server: Server, name: str
) -> None:
    """The client is cancelled while ``check`` runs (at each of its steps): the connection
    being checked goes back (or is discarded), and the pool keeps serving."""
    plan = Plan()

    async def check(conn: AnyConnection) -> None:
        with plan.armed():
            await ConnectionPool.check_connection(conn)

    options = pool_options(name, check=check)
    async with triopool.open_pool(postgres_dsn, wait=True, **options) as pool:

        async def run(k: int) -> bool:
            done = False
            with trio.CancelScope() as scope:
                plan.k, plan.action = k, scope.cancel
                async with pool.connection() as conn:
                    assert not conn.autocommit  # check restored it
                done = True
            assert done or scope.cancelled_caught
            return done

        assert await sweep_on_pool(pool, postgres_server, name, run) >= 2
    await settle(pool, postgres_server, name)


async def test_configure_cancelled_by_a_resize(
    postgres_dsn: str, postgres_server: Server, name: str
) -> None:
    """A connection attempt closed by ``resize`` while ``configure`` is at any of its steps:
    the attempt is abandoned without leaking a backend, and the pool keeps serving."""
    plan = Plan()

    async def configure(conn: AnyConnection) -> None:
        with plan.armed():
            await conn.execute("SELECT 1")
            await conn.execute("SELECT 2")
            await conn.rollback()

    options = pool_options(name, min_size=1, max_size=2, configure=configure)
    async with triopool.open_pool(postgres_dsn, wait=True, **options) as pool:
        served: list[AnyConnection] = []

        async def want_one() -> None:
            async with pool.connection(timeout=5) as conn:
                served.append(conn)

        async def run(k: int) -> bool:
            served.clear()
            held = await pool.getconn()
            async with trio.open_nursery() as nursery:
                # The waiter makes the pool grow by one; a shrink closes that attempt.
                plan.k, plan.action = k, lambda: nursery.start_soon(pool.resize, 1, 1)
                completed = plan.completed
                nursery.start_soon(want_one)
                await trio.testing.wait_all_tasks_blocked()
                await quiesce(pool)
                await pool.putconn(held)  # serves the waiter if the new one was closed
            assert len(served) == 1
            await pool.resize(1, 2)
            return plan.completed > completed

        assert await sweep_on_pool(pool, postgres_server, name, run) >= 2
    await settle(pool, postgres_server, name)


@pytest.mark.parametrize("callback", ["configure", "reset"])
async def test_pool_task_cancelled_inside_callback(
    postgres_dsn: str, postgres_server: Server, callback: str
) -> None:
    """The task running the pool is cancelled while ``configure``/``reset`` is at any of
    its steps: the pool closes, every backend goes (a lent connection when it comes
    back), and no task is left behind."""
    plan = Plan()

    async def body(conn: AnyConnection) -> None:
        with plan.armed():
            await conn.execute("SELECT 1")
            await conn.execute("SELECT 2")
            await conn.rollback()

    async def run(k: int) -> bool:
        name = app_name("tp_cancel_cb")
        pool = ConnectionPool(
            postgres_dsn, **pool_options(name, min_size=1, max_size=1, **{callback: body})
        )
        lent: AnyConnection | None = None
        with trio.CancelScope() as host:
            plan.k, plan.action = k, host.cancel
            async with trio.open_nursery() as nursery:
                await nursery.start(pool.run)
                if callback == "reset":
                    await pool.putconn(await pool.getconn(timeout=5))  # reset runs now
                lent = await pool.getconn(timeout=5)
                await pool.close()
        assert pool.closed
        if lent is not None:
            await pool.putconn(lent)
            assert lent.closed
        await settle(pool, postgres_server, name)
        return not host.cancelled_caught

    assert await sweep_checkpoints(run) >= 2


# -- administration ------------------------------------------------------------------


async def test_resize(pool: ConnectionPool, postgres_server: Server, name: str) -> None:
    """``resize`` cancelled: the sizes did not change; completed: they did."""

    async def run(k: int) -> bool:
        done = await completes_despite(k, lambda: pool.resize(3, 5))
        sizes = (pool.min_size, pool.max_size)
        assert sizes == ((3, 5) if done else (2, 4))
        await pool.resize(2, 4)
        return done

    assert await sweep_on_pool(pool, postgres_server, name, run) >= 1


async def test_drain(pool: ConnectionPool, postgres_server: Server, name: str) -> None:
    """``drain`` cancelled: nothing replaced; completed: every connection replaced."""

    async def run(k: int) -> bool:
        await quiesce(pool)
        before = pool_pids(pool)
        done = await completes_despite(k, pool.drain)
        await quiesce(pool)
        after = pool_pids(pool)
        assert (before & after == set()) if done else (before == after)
        return done

    assert await sweep_on_pool(pool, postgres_server, name, run) >= 1


async def test_close(postgres_dsn: str, postgres_server: Server, name: str) -> None:
    """``close`` cancelled at any step: the pool is closed all the same, and nothing is left."""

    async def run(k: int) -> bool:
        async with triopool.open_pool(postgres_dsn, wait=True, **pool_options(name)) as pool:
            lent = await pool.getconn()
            done = await completes_despite(k, pool.close, every_task=True)
            assert pool.closed
            await pool.putconn(lent)  # closed by its actor, or at once if none is left
        assert lent.closed
        await settle(pool, postgres_server, name)
        return done

    assert await sweep_checkpoints(run) >= 1


async def test_open_pool_wait(postgres_dsn: str, postgres_server: Server) -> None:
    """``open_pool(wait=True)`` cancelled at any step leaves no backend and no task."""
    names: list[str] = []

    async def open_and_use() -> None:
        async with triopool.open_pool(postgres_dsn, wait=True, **pool_options(names[-1])) as pool:
            await serves(pool)

    async def run(k: int) -> bool:
        names.append(app_name("tp_cancel_open"))
        done = await completes_despite(k, open_and_use)
        # The block is over: structured concurrency ended the pool's tasks; the backends:
        assert await settled_backends(postgres_server, names[-1], 0) == 0
        return done

    assert await sweep_checkpoints(run) >= 2


async def test_listener_enter(pool: ConnectionPool, postgres_server: Server, name: str) -> None:
    """Entering ``listener()`` cancelled at any step leaves no listening connection behind."""

    async def listen() -> None:
        async with pool.listener("tp_cancel_chan"):
            pass

    assert (
        await sweep_on_pool(
            pool, postgres_server, name, lambda k: completes_despite(k, listen, every_task=True)
        )
        >= 2
    )
