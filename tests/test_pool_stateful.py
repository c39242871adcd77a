"""Property-based test of the real pool (trio shell + policy): hypothesis state machines.

`PoolMachine` drives a `ConnectionPool` under a `MockClock` that moves only
when a rule says so, with clients that request, hold, return (clean, dirty,
broken or closed by their user), get cancelled or time out, while connection
attempts fail and succeed, idle connections die, the pool is resized, drained
and closed.  After every step (once every trio task is blocked) it checks the
pool's promises:

* ``size <= max_size`` (above it only with connections lent before a
  ``resize`` lowered it, and then nothing is connecting);
* no connection is held by two clients; no client is handed a broken
  connection (the pool has a ``check``);
* FIFO: nobody is served while an earlier client (that never failed a check)
  is still waiting;
* nobody waits past their deadline, and nobody waits while a connection is
  idle;
* at the end (`teardown`): after ``close``, every client ended as served,
  timed out, cancelled, rejected (``max_waiting``) or refused (closed), and
  every connection is closed.

It runs twice.  `FakePoolMachine` uses `FakeConnection` (server-free, see
_fake_server.py), so connection attempts take mock time and the server's
books can be compared with the pool's after every step; many examples.
`RealPoolMachine` uses real connections to the test server through a
`TcpProxy`: "server down" refuses new connections at the proxy, a network
cut resets every connection, idle connections die by
``pg_terminate_backend``, and a broken return is a connection whose backend
was terminated; fewer examples.  Real I/O runs in real time, pool timers in
mock time.

Trio runs in a thread of its own for each example; each rule runs one step
in it with `trio.from_thread.run` and waits for all tasks to block, so a
step's effects are complete when the invariants are checked.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import psycopg
import trio
import trio.testing
from _fake_server import FakeConnection, FakeServer
from _pool_checks import Server, app_name, assert_no_leaks, eventually, pool_connections
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from psycopg import pq

from triopool import Connection, ConnectionPool, PoolClosed, PoolTimeout, TooManyRequests
from triopool._policy import SlotState
from triopool.testing import TcpProxy

T = TypeVar("T")
State = Literal["waiting", "holding", "returned", "timed_out", "cancelled", "rejected", "refused"]
Return = Literal["clean", "dirty", "broken", "closed"]


class TrioThread:
    """`trio.run` in a thread of its own, taking steps from another thread."""

    def __init__(self, clock: trio.abc.Clock, settle: float = 0.0) -> None:
        self._ready = threading.Event()
        self._clock = clock
        self._settle = settle
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        trio.run(self._main, clock=self._clock)

    async def _main(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self._ready.set()
            await self._stop.wait()

    def step(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``await fn()`` in trio, then wait until every task is blocked.

        With `settle`, until they have been blocked (no I/O either) for that
        many real seconds: time for real I/O in flight to land.
        """

        async def step() -> T:
            result = await fn()
            await trio.testing.wait_all_tasks_blocked(self._settle)
            return result

        return trio.from_thread.run(step, trio_token=self.token)

    def stop(self) -> None:
        """End `trio.run`: every task started in `nursery` must have ended."""
        trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
        self._thread.join(timeout=10)
        assert not self._thread.is_alive()


@dataclass(eq=False)
class Client:
    id: int
    requested_at: float
    deadline: float
    state: State = "waiting"
    conn: Connection | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    give_back: trio.Event = field(default_factory=trio.Event)
    failed_check: bool = False
    in_check: bool = False


POOL_TIMEOUT = 5.0
SERVED = ("holding", "returned")
CHECK_TIME = 0.25


class PoolMachine(RuleBasedStateMachine):
    """Rules and invariants for any server; subclasses connect and break connections."""

    #: Real seconds for I/O in flight to land after each step (see `TrioThread.step`).
    settle = 0.0

    def __init__(self) -> None:
        super().__init__()
        self.clock = trio.testing.MockClock()  # time moves only in `advance`
        self.trio = TrioThread(self.clock, self.settle)
        self.clients: list[Client] = []
        self.ids = itertools.count()
        self.violations: list[str] = []
        self.turn = 0  # of `progress`
        self.killed: list[Connection] = []  # dead, whether they know it yet or not
        self.max_size = 2
        self.pool = ConnectionPool(
            min_size=1,
            max_size=self.max_size,
            max_waiting=4,
            timeout=POOL_TIMEOUT,
            max_idle=20.0,
            max_lifetime=50.0,
            reconnect_timeout=10.0,
            check=self._check,
            **self.connection_options(),
        )
        self.trio.step(self._open)

    def connection_options(self) -> dict[str, Any]:
        """``conninfo``, ``kwargs``, ``connection_class`` for the pool."""
        raise NotImplementedError

    async def probe(self, conn: Connection) -> None:
        """Raise `psycopg.OperationalError` if `conn` is dead."""
        raise NotImplementedError

    async def spoil(self, conn: Connection, how: Return) -> None:
        """Leave `conn` as a user would before giving it back `how`."""
        raise NotImplementedError

    def kill(self, conn: Connection) -> None:
        """Make `conn` dead (it notices when next used)."""
        raise NotImplementedError

    async def _open(self) -> None:
        await self.trio.nursery.start(self.pool.run)

    async def _check(self, conn: psycopg.AsyncConnection) -> None:
        # Takes time, so that clients can be cancelled or time out in it.
        client = next(c for c in self.clients if c.state == "waiting" and self._is_me(c))
        client.in_check = True
        try:
            await trio.sleep(CHECK_TIME)
            assert isinstance(conn, Connection)
            await self.probe(conn)
        except psycopg.OperationalError:
            client.failed_check = True
            raise
        finally:
            client.in_check = False

    def _is_me(self, client: Client) -> bool:
        return trio.lowlevel.current_task().name == f"client-{client.id}"

    # -- clients --------------------------------------------------------------

    async def _client(self, client: Client, wait_for: float | None) -> None:
        with client.scope:
            try:
                conn = await self.pool.getconn(wait_for)
            except PoolTimeout:
                client.state = "timed_out"
                return  # noqa: ASYNC910  # after a failed request
            except TooManyRequests:
                client.state = "rejected"
                return  # noqa: ASYNC910  # after a failed request
            except PoolClosed:
                client.state = "refused"
                return  # noqa: ASYNC910  # after a failed request
            assert isinstance(conn, Connection)
            self._granted(client, conn)
            try:
                await client.give_back.wait()
            finally:
                if client.conn is not None:  # (else the machine gave it back)
                    client.state, client.conn = "returned", None
                    self._putconn(conn)
        if client.state == "waiting":
            client.state = "cancelled"

    def _granted(self, client: Client, conn: Connection) -> None:
        if conn.closed or any(conn is dead for dead in self.killed):
            self.violations.append(f"client {client.id} got a broken connection")
        elif conn.pgconn.transaction_status != pq.TransactionStatus.IDLE:
            self.violations.append(f"client {client.id} got a connection not idle")
        if any(other.conn is conn for other in self.clients):
            self.violations.append(f"client {client.id} got a connection someone holds")
        client.state, client.conn = "holding", conn

    def _putconn(self, conn: Connection) -> None:
        coro = self.pool.putconn(conn)
        try:
            coro.send(None)  # putconn never waits: it completes without suspending
        except StopIteration:
            return
        raise AssertionError("putconn suspended")

    def waiting(self) -> list[Client]:
        return [c for c in self.clients if c.state == "waiting"]

    def holding(self) -> list[Client]:
        return [c for c in self.clients if c.state == "holding"]

    # -- rules ----------------------------------------------------------------

    @rule(timeout=st.sampled_from([None, 0.0, 1.0, 3.0]))
    def request(self, timeout: float | None) -> None:
        now = self.clock.current_time()
        client = Client(next(self.ids), now, now + (POOL_TIMEOUT if timeout is None else timeout))
        self.clients.append(client)

        async def start() -> None:  # noqa: ASYNC124, ASYNC910  # runs as a step in trio
            self.trio.nursery.start_soon(self._client, client, timeout, name=f"client-{client.id}")

        self.trio.step(start)

    @precondition(lambda self: self.holding())
    @rule(data=st.data(), how=st.sampled_from(["clean", "dirty", "broken", "closed"]))
    def give_back(self, data: st.DataObject, how: Return) -> None:
        client = data.draw(st.sampled_from(self.holding()))
        assert client.conn is not None
        if how == "broken":
            self._kill(client.conn)
        conn = client.conn

        async def give_back() -> None:
            await self.spoil(conn, how)
            client.give_back.set()

        self.trio.step(give_back)

    @precondition(lambda self: self.holding() and self.queued())
    @rule(data=st.data())
    def give_back_as_the_first_waiter_is_cancelled(self, data: st.DataObject) -> None:
        """A connection comes back, then the oldest queued client is cancelled, in one
        step: the scheduler sees the return first and grants the connection to a
        request that is already dead, so it must pass it on (to the next waiter, or
        to idle)."""
        holder = data.draw(st.sampled_from(self.holding()))
        first = self.queued()[0]
        conn = holder.conn
        assert conn is not None

        async def step() -> None:  # noqa: ASYNC124, ASYNC910  # runs as a step in trio
            holder.state, holder.conn = "returned", None
            self._putconn(conn)
            holder.give_back.set()
            first.scope.cancel()

        self.trio.step(step)

    def queued(self) -> list[Client]:
        """Waiting clients that are surely in the pool's queue (not checking, not backing off)."""
        return [c for c in self.waiting() if not (c.failed_check or c.in_check)]

    @precondition(lambda self: self.waiting() or self.holding())
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        client = data.draw(st.sampled_from(self.waiting() + self.holding()))
        self.trio.step(self._call(client.scope.cancel))

    @rule(seconds=st.sampled_from([0.25, 0.5, 1.0, 3.0, 25.0, 60.0]))
    def advance(self, seconds: float) -> None:
        async def jump() -> None:
            self.clock.jump(seconds)
            await trio.lowlevel.checkpoint()

        self.trio.step(jump)

    @rule()
    def progress(self) -> None:
        """In turn: half a second passes (a connection attempt's time, twice a
        check's), or the client holding a connection longest gives it back clean.

        The only rule without arguments, so hypothesis picks it often: it keeps
        connections being made, checked, lent and given back while the other rules
        strike.
        """
        self.turn += 1
        holding = self.holding()
        if self.turn % 2 and holding:
            self.trio.step(self._call(holding[0].give_back.set))
        else:
            self.advance(2 * CHECK_TIME)

    @precondition(lambda self: self.idle_connections())
    @rule(data=st.data())
    def kill_idle(self, data: st.DataObject) -> None:
        self._kill(data.draw(st.sampled_from(self.idle_connections())))

    @precondition(lambda self: len(self.idle_connections()) > 1)
    @rule()
    def kill_every_idle(self) -> None:
        """As after a server restart: a client may then fail ``check`` twice and back off."""
        for conn in self.idle_connections():
            self._kill(conn)

    def _kill(self, conn: Connection) -> None:
        self.kill(conn)
        self.killed.append(conn)

    def idle_connections(self) -> list[Connection]:
        policy = self.pool._policy
        return [
            conn
            for slot, conn in pool_connections(self.pool).items()
            if policy.state_of(slot) is SlotState.IDLE and not conn.closed
        ]

    @precondition(lambda self: not self.pool.closed)
    @rule(min_size=st.integers(0, 2), extra=st.integers(0, 2))
    def resize(self, min_size: int, extra: int) -> None:
        self.max_size = max(min_size + extra, 1)
        self.trio.step(lambda: self.pool.resize(min_size, self.max_size))

    @precondition(lambda self: not self.pool.closed)
    @rule()
    def drain(self) -> None:
        self.trio.step(self.pool.drain)

    @precondition(lambda self: not self.pool.closed)
    @rule(chance=st.integers(0, 9))
    def close(self, chance: int) -> None:
        # (Hypothesis would otherwise pick this rule so often that most runs would
        # be spent on a closed pool: close one time in ten.)
        if chance == 9:
            self.trio.step(self.pool.close)

    @staticmethod
    def _call(fn: Callable[..., object], *args: object) -> Callable[[], Awaitable[None]]:
        """``fn(*args)`` as a step (trio objects are called in trio's thread)."""

        async def call() -> None:  # noqa: ASYNC124, ASYNC910  # runs as a step in trio
            fn(*args)

        return call

    # -- invariants -----------------------------------------------------------

    @invariant()
    def no_violation(self) -> None:
        assert self.violations == []

    @invariant()
    def first_come_first_served(self) -> None:
        # Checked once every task is blocked, not when a client resumes:
        # trio may resume two clients granted in one batch in either order.
        waiting = [c.id for c in self.waiting() if not (c.failed_check or c.in_check)]
        if waiting:
            served_later = [c.id for c in self.clients if c.id > waiting[0] and c.state in SERVED]
            assert served_later == [], f"{served_later} served while {waiting[0]} waits"

    @invariant()
    def size_within_max_size(self) -> None:
        policy = self.pool._policy
        lent = policy.count(SlotState.LENT)
        assert policy.size <= max(self.max_size, lent), (policy.size, self.max_size, lent)
        if policy.size > self.max_size:
            assert policy.count(SlotState.CONNECTING) == 0

    @invariant()
    def nobody_waits_past_deadline_or_beside_an_idle_connection(self) -> None:
        now = self.clock.current_time()
        # Waiting: queued, checking the connection granted, or (after failed checks)
        # backing off before asking again.
        waiting = self.waiting()
        not_checking = [client for client in waiting if not client.in_check]
        surely_queued = [client for client in not_checking if not client.failed_check]
        assert all(client.deadline > now for client in waiting)
        status = self.pool.status()
        assert len(surely_queued) <= status.waiting <= len(not_checking)
        if status.waiting:
            assert status.available == 0

    def teardown(self) -> None:
        try:
            self.trio.step(self._wind_up)
            assert self.pool._nursery is None
            self.all_closed()
        finally:
            self.trio.stop()

    def all_closed(self) -> None:
        """After the pool closed: assert that no connection is left open."""
        raise NotImplementedError

    async def _wind_up(self) -> None:
        """Close the pool, let every client end, check the books: in one step.

        Time runs to each deadline meanwhile (autojump), and only inside this
        step: left on between steps, the clock would jump while this thread
        prepares the next one, and runs would not replay the same way.
        """
        self.clock.autojump_threshold = 0
        try:
            await self.pool.close()
            with trio.fail_after(3600):  # noqa: ASYNC912  # the loop sleeps
                # Clients still checking a connection end their check, then return it.
                while unfinished := [c for c in self.clients if c.state in ("waiting", "holding")]:
                    for client in unfinished:
                        client.give_back.set()
                    await trio.sleep(CHECK_TIME)
            await trio.testing.wait_all_tasks_blocked()
            assert_no_leaks(self.pool)
        finally:
            self.clock.autojump_threshold = math.inf


class FakePoolMachine(PoolMachine):
    """Connections to a `FakeServer` whose attempts take 0.5 s of mock time."""

    def __init__(self) -> None:
        self.server = FakeServer(connect_delay=0.5)
        super().__init__()

    def connection_options(self) -> dict[str, Any]:
        return {"kwargs": {"server": self.server}, "connection_class": FakeConnection}

    async def probe(self, conn: Connection) -> None:  # noqa: ASYNC910  # no I/O to wait for
        if conn.closed:
            raise psycopg.OperationalError("dead connection (fake)")

    async def spoil(self, conn: Connection, how: Return) -> None:  # noqa: ASYNC910  # no I/O
        assert isinstance(conn, FakeConnection)
        if how == "dirty":
            conn.begin()
        elif how == "closed":
            conn._close_now()

    def kill(self, conn: Connection) -> None:
        assert isinstance(conn, FakeConnection)
        conn.kill()

    @rule(down=st.booleans())
    def server_down(self, down: bool) -> None:
        self.server.down = down

    @invariant()
    def server_connections_are_the_pools(self) -> None:
        not_closed = {id(c) for c in self.server.connections if c.closed_at is None}
        assert not_closed == {id(c) for c in pool_connections(self.pool).values()}
        held = [c.conn for c in self.holding()]
        assert len({id(conn) for conn in held}) == len(held)
        assert all(conn in pool_connections(self.pool).values() for conn in held)

    def all_closed(self) -> None:
        assert all(conn.closed_at is not None for conn in self.server.connections)


class RealPoolMachine(PoolMachine):
    """Connections to the test server, through a `TcpProxy` run in the machine's trio."""

    settle = 0.02
    server: Server  # set by `test_pool_state_machine_real_server`

    def __init__(self) -> None:
        self.name = app_name("tp_machine")
        self.proxy = TcpProxy(self.server.host, self.server.port)
        self.proxy_scope = trio.CancelScope()
        super().__init__()

    def connection_options(self) -> dict[str, Any]:
        self.trio.step(self._start_proxy)
        return {
            "conninfo": self.server.conninfo(
                host=self.proxy.host, port=self.proxy.port, application_name=self.name
            )
        }

    async def _start_proxy(self) -> None:
        await self.trio.nursery.start(self._run_proxy)

    async def _run_proxy(  # noqa: ASYNC114, ASYNC128  # task_status goes to proxy.run
        self, task_status: trio.TaskStatus[TcpProxy]
    ) -> None:
        with self.proxy_scope:
            await self.proxy.run(task_status=task_status)

    async def probe(self, conn: Connection) -> None:
        await ConnectionPool.check_connection(conn)

    async def spoil(self, conn: Connection, how: Return) -> None:  # noqa: ASYNC910  # each branch awaits
        if how in ("dirty", "broken"):
            with suppress(psycopg.OperationalError):  # broken: the backend is gone
                await conn.execute("SELECT 1")  # not autocommit: a transaction begins
        elif how == "closed":
            await conn.close()
        else:
            await trio.lowlevel.checkpoint()

    def kill(self, conn: Connection) -> None:
        # Waits (up to 5 s) for the backend to exit, so that the next use fails.
        self.server.execute("SELECT pg_terminate_backend(%s, 5000)", (conn.info.backend_pid,))

    @rule(down=st.booleans())
    def server_down(self, down: bool) -> None:
        """New connections are refused (at the proxy) or accepted again."""
        self.trio.step(self._call(self.proxy.refuse_new, down))

    @rule()
    def network_cut(self) -> None:
        """Every connection is reset (TCP RST)."""
        self.killed.extend(pool_connections(self.pool).values())
        self.trio.step(self._call(self.proxy.reset_all))

    @precondition(lambda self: not self.pool.closed)
    @rule(cancel=st.booleans())
    def check_idle(self, cancel: bool) -> None:
        """``pool.check()`` in the background (maintenance), maybe cancelled as soon as
        it has begun: each idle connection is checked and comes back (a dead one is
        replaced); a cancelled call loses none and lends no connection it checked."""
        scope = trio.CancelScope()

        async def checking() -> None:
            with scope:
                await self.pool.check()

        async def step() -> None:
            self.trio.nursery.start_soon(checking)
            if cancel:
                await trio.lowlevel.checkpoint()
                scope.cancel()

        self.trio.step(step)

    def all_closed(self) -> None:
        self.trio.step(self._call(self.proxy_scope.cancel))
        # Backends exit asynchronously after their client left.
        assert eventually(lambda: self.server.count_backends(self.name) == 0)


def run_machine(machine: type[PoolMachine], examples: int) -> None:
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


def test_pool_state_machine() -> None:
    run_machine(FakePoolMachine, 150)


def test_pool_state_machine_real_server(postgres_server: Server) -> None:
    class Machine(RealPoolMachine):
        server = postgres_server

    run_machine(Machine, 30)
