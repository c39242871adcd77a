"""Shared helpers for the fault, cancellation, soak and diagnostics tests.

* `cancel_after_steps` / `sweep_checkpoints`: cancel a scope after exactly k
  scheduling steps of a task, for k = 0, 1, 2... until the operation completes.
* `Clients`: tasks looping acquire/query/release against a pool, recording
  every outcome and catching any connection lent to two clients at once.
* `settle`: wait for the pool's actors to finish what they are doing, then
  run the shared leak check (`_pool_checks.assert_settled`).
* `until`, `pool_pids`, `serves`, `custom_server`: small waits and probes.
"""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
import trio
import trio.testing
from _pool_checks import Server, assert_settled, pool_connections
from trio.lowlevel import Task

from triopool import Connection, ConnectionPool, PoolClosed, PoolTimeout
from triopool._policy import SlotState
from triopool.testing import PostgresServer, ServerUnavailable

AnyConnection = Connection[Any]

#: Transitional slot states: the pool is busy until none is left.
_BUSY = (SlotState.CONNECTING, SlotState.RESETTING, SlotState.CLOSING)


# -- cancellation at every checkpoint -------------------------------------------


class StepCanceller(trio.abc.Instrument):
    """Call `action` when `task` (None: any task) finishes its `k`-th step.

    A task finishes a step each time it suspends at a checkpoint, so with the
    action being ``scope.cancel`` the cancellation lands exactly at that
    task's k-th checkpoint (or, counting every task, after the program's k-th
    scheduling step, which also catches hand-offs between tasks).
    """

    def __init__(self, k: int, action: Callable[[], object], task: Task | None) -> None:
        self.k = k
        self.action = action
        self.task = task
        self.steps = 0
        self.fired = False

    def after_task_step(self, task: Task) -> None:
        if self.task is not None and task is not self.task:
            return
        self.steps += 1
        if self.steps == self.k and not self.fired:
            self.fired = True
            self.action()


@contextmanager
def cancel_after_steps(
    k: int,
    action: Callable[[], object],
    *,
    task: Task | bool | None = True,
) -> Iterator[StepCanceller]:
    """Run `action` (e.g. ``scope.cancel``) after `k` steps; ``k == 0``: at once.

    `task`: ``True`` counts the current task's steps, ``None`` every task's,
    or a given task's.
    """
    counted = trio.lowlevel.current_task() if task is True else task
    canceller = StepCanceller(k, action, counted if isinstance(counted, Task) else None)
    if k == 0:
        canceller.fired = True
        action()
    trio.lowlevel.add_instrument(canceller)
    try:
        yield canceller
    finally:
        trio.lowlevel.remove_instrument(canceller)


async def completes_despite(
    k: int, operation: Callable[[], Awaitable[object]], *, every_task: bool = False
) -> bool:
    """Run `operation` in a scope cancelled after `k` steps; True if it completed.

    When it did not complete, the scope must have caught the cancellation:
    nothing else may escape.
    """
    done = False
    with trio.CancelScope() as scope:
        with cancel_after_steps(k, scope.cancel, task=None if every_task else True):
            await operation()
        done = True
    assert done or scope.cancelled_caught
    return done


async def sweep_checkpoints(case: Callable[[int], Awaitable[bool]], limit: int = 400) -> int:
    """Run ``case(k)`` for k = 0, 1, 2... until it completes uncancelled; return that k.

    `case` runs the operation cancelled after k steps, checks what must hold
    afterwards, and returns whether the operation completed.  The sweep proves
    something only if at least one run was cancelled, so k == 0 must cancel
    (unless the operation has no checkpoint at all, which the caller asserts).
    """
    for k in range(limit):
        if await case(k):
            return k
    raise AssertionError(f"still cancelled after {limit} checkpoints")


# -- waiting for the pool and the server ----------------------------------------


async def until(
    condition: Callable[[], bool | Awaitable[bool]], within: float, what: str = "condition"
) -> float:
    """Poll `condition` until true; return the seconds it took, fail after `within`.

    For state with no event to wait on (the server's, or the pool's internals
    across reconnections); polls every 10 ms.
    """
    await trio.lowlevel.checkpoint()
    start = trio.current_time()
    with trio.move_on_after(within):
        while True:
            result = condition()
            if not isinstance(result, bool):
                result = await result
            if result:
                return trio.current_time() - start
            await trio.sleep(0.01)
    raise AssertionError(f"{what}: not true after {within} s")


def busy(pool: ConnectionPool) -> bool:
    """Is any slot connecting, resetting or closing?"""
    return any(pool._policy.count(state) for state in _BUSY)


async def quiesce(pool: ConnectionPool, within: float = 5.0) -> None:
    """Wait until the pool's actors are done: no slot connecting, resetting or closing."""
    await trio.testing.wait_all_tasks_blocked()
    await until(lambda: not busy(pool), within, "pool quiescent")
    await trio.testing.wait_all_tasks_blocked()


async def settle(pool: ConnectionPool, server: Server, name: str) -> None:
    """`quiesce`, then the shared leak check (books, and the server's backends)."""
    if not pool.closed:
        await quiesce(pool)
    await assert_settled(pool, server, name)


async def serves(pool: ConnectionPool, timeout: float = 5.0) -> int:  # noqa: ASYNC109
    """One request through `pool`; return the backend pid that served it."""
    async with pool.connection(timeout) as conn:
        cur = await conn.execute("SELECT pg_backend_pid()")
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


def pool_pids(pool: ConnectionPool) -> set[int]:
    """Backend pids of the connections the pool holds (idle or lent), without I/O."""
    return {conn.info.backend_pid for conn in pool_connections(pool).values() if not conn.closed}


async def server_pids(server: Server, name: str) -> set[int]:
    """Backend pids the server has for application `name`."""
    rows = await trio.to_thread.run_sync(
        server.execute,
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
        (name,),
    )
    return {int(str(row[0])) for row in rows}


async def live_at_min_size(pool: ConnectionPool, server: Server, name: str) -> bool:
    """At least ``min_size`` connections, all of them backed by a live backend."""
    alive = await server_pids(server, name)
    mine = pool_pids(pool)
    return not busy(pool) and len(mine) >= pool.min_size and mine <= alive


async def call_server(fn: Callable[..., Any], *args: Any) -> Any:
    """Run one of the harness's blocking server methods in a thread."""
    return await trio.to_thread.run_sync(fn, *args)


# -- connection attempts ------------------------------------------------------------


@dataclass
class Attempt:
    """One call of ``connection_class.connect``: when, how long, and how it ended."""

    started: float
    seconds: float
    error: BaseException | None


def recording_connection_class(
    cancel_timeout: float | None = None,
) -> tuple[type[Connection[Any]], list[Attempt]]:
    """A `Connection` subclass, and the list where it records every connection attempt.

    `cancel_timeout` overrides how long a cancelled query may take to be
    cancelled on the server before the connection is closed.
    """
    recorded: list[Attempt] = []

    class RecordingConnection(Connection[Any]):
        @classmethod
        async def connect(cls, conninfo: str = "", **kwargs: Any) -> RecordingConnection:
            started = trio.current_time()
            try:
                conn = await super().connect(conninfo, **kwargs)
            except BaseException as ex:
                recorded.append(Attempt(started, trio.current_time() - started, ex))
                raise
            recorded.append(Attempt(started, trio.current_time() - started, None))
            assert isinstance(conn, RecordingConnection)
            return conn

    if cancel_timeout is not None:
        RecordingConnection.cancel_timeout = cancel_timeout
    return RecordingConnection, recorded


# -- throwaway servers with settings of their own --------------------------------


@contextmanager
def custom_server(**settings: str) -> Iterator[PostgresServer]:
    """A private throwaway server started with extra ``postgres -c`` settings.

    Like the ``private_server`` fixture: skipped when no server can be had,
    except under CI, where that fails.
    """
    try:
        server = PostgresServer(settings=settings)
        server.start()
    except ServerUnavailable as error:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI needs a PostgreSQL server: {error}", pytrace=False)
        pytest.skip(str(error))
    try:
        yield server
    finally:
        server.cleanup()


# -- clients under load ------------------------------------------------------------


@dataclass
class Outcomes:
    """What happened to every request of a `Clients` run."""

    started: int = 0
    served: int = 0
    timed_out: int = 0
    cancelled: int = 0
    failed: int = 0
    closed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    #: By outcome, the longest time a request took beyond what bounds it: its cancel
    #: scope if cancelled, its timeout if timed out, else the shorter of the two.
    #: Negative when every such request ended well within it.
    excess: dict[str, float] = field(default_factory=dict)
    #: Instants (trio clock) at which requests were served.
    served_at: list[float] = field(default_factory=list)

    @property
    def accounted(self) -> int:
        return self.served + self.timed_out + self.cancelled + self.failed + self.closed

    def summary(self) -> str:
        return (
            f"{self.started} requests: {self.served} served, {self.timed_out} timed out,"
            f" {self.cancelled} cancelled, {self.failed} failed, {self.closed} pool closed;"
            f" errors {dict(self.errors)}; worst excess {self.excess_ms()}"
        )

    def excess_ms(self) -> str:
        return ", ".join(f"{kind} {value * 1000:+.0f} ms" for kind, value in self.excess.items())

    @property
    def worst_excess(self) -> float:
        return max(self.excess.values(), default=-math.inf)

    def _ended(self, kind: str, elapsed: float, bound: float) -> None:
        self.excess[kind] = max(self.excess.get(kind, -math.inf), elapsed - bound)

    def served_since(self, instant: float) -> int:
        return sum(1 for at in self.served_at if at >= instant)


class Clients:
    """`count` tasks looping: acquire, query, release, recording each outcome.

    Every connection handed out is registered under its holder while lent, so
    a connection lent to two clients at once fails the run at once.  A request
    should end by its timeout or its cancel scope, plus `slack` (for the query,
    and a cancel sent to the server): the worst excess is recorded, and
    `assert_bounded` checks it.

    `scope`: every request runs in a cancel scope of that many seconds.
    `chaos` (0..1) is the share of requests given a random short cancel scope
    and a random short timeout (the soak test); `manual` the share using
    getconn/putconn instead of ``connection()``.
    """

    def __init__(
        self,
        pool: ConnectionPool,
        *,
        count: int = 3,
        timeout: float = 1.0,  # noqa: ASYNC109
        query: str = "SELECT 1",
        pause: float = 0.002,
        scope: float = math.inf,
        slack: float = 0.5,
        chaos: float = 0.0,
        manual: float = 0.0,
        seed: int | None = None,
    ) -> None:
        self.pool = pool
        self.count = count
        self.timeout = timeout
        self.query = query
        self.pause = pause
        self.scope = scope
        self.slack = slack
        self.chaos = chaos
        self.manual = manual
        self.random = random.Random(seed)
        self.outcomes = Outcomes()
        self.holding: dict[AnyConnection, int] = {}
        self.max_held = 0
        self._stop = trio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Run the clients until `stop`."""
        async with trio.open_nursery() as nursery:
            for client in range(self.count):
                nursery.start_soon(self._client, client, name=f"client-{client}")

    async def _client(self, client: int) -> None:
        while True:
            await self._request(client)
            if self._stop.is_set():
                return
            await trio.sleep(self.pause * self.random.random())

    async def _request(self, client: int) -> None:  # noqa: ASYNC910  # both branches await the pool
        outcomes = self.outcomes
        outcomes.started += 1
        timeout, scope_after = self.timeout, self.scope
        if self.chaos and self.random.random() < self.chaos:
            timeout = self.random.uniform(0.01, self.timeout)
            scope_after = self.random.uniform(0.0, 0.05)
        start = trio.current_time()
        kind, bound = "served", min(timeout, scope_after)
        with trio.move_on_after(scope_after) as scope:  # noqa: ASYNC912  # as above
            try:
                if self.manual and self.random.random() < self.manual:
                    await self._manual(client, timeout)
                else:
                    await self._with_block(client, timeout)
            except PoolTimeout:
                outcomes.timed_out += 1
                kind, bound = "timed out", timeout
            except PoolClosed:
                outcomes.closed += 1
                kind = "closed"
            except psycopg.OperationalError as ex:
                outcomes.failed += 1
                outcomes.errors[type(ex).__name__] += 1
                kind = "failed"
            else:
                outcomes.served += 1
                outcomes.served_at.append(trio.current_time())
        if scope.cancelled_caught:
            outcomes.cancelled += 1
            kind, bound = "cancelled", scope_after
        outcomes._ended(kind, trio.current_time() - start, bound)

    def assert_bounded(self) -> None:
        """Every request ended by its timeout or cancel scope, plus `slack`."""
        assert self.outcomes.worst_excess <= self.slack, self.outcomes.summary()

    def _take(self, conn: AnyConnection, client: int) -> None:
        other = self.holding.get(conn)
        assert other is None, f"connection lent to client {client} while client {other} holds it"
        self.holding[conn] = client
        self.max_held = max(self.max_held, len(self.holding))

    async def _with_block(self, client: int, timeout: float) -> None:  # noqa: ASYNC109
        conn: AnyConnection | None = None
        try:
            async with self.pool.connection(timeout) as conn:
                self._take(conn, client)
                await conn.execute(self.query)
        finally:
            # Right after the block gave it back: no checkpoint in between.
            if conn is not None:
                self.holding.pop(conn, None)

    async def _manual(self, client: int, timeout: float) -> None:  # noqa: ASYNC109
        conn = await self.pool.getconn(timeout)
        self._take(conn, client)
        try:
            await conn.execute(self.query)
        finally:
            await self.pool.putconn(conn)  # noqa: ASYNC102  # putconn never waits
            self.holding.pop(conn, None)


@asynccontextmanager
async def clients_running(pool: ConnectionPool, **options: Any) -> AsyncIterator[Clients]:
    """`Clients` running against `pool` for the block; stopped (and finished) at its end."""
    clients = Clients(pool, **options)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(clients.run)  # noqa: ASYNC113  # the clients need not have started when the block begins
        try:
            yield clients
        finally:
            clients.stop()
    assert clients.holding == {}, clients.holding
    assert clients.outcomes.accounted == clients.outcomes.started, clients.outcomes.summary()
