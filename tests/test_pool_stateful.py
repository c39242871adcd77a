"""Property-based test of the real pool (trio shell + policy): a hypothesis state machine.

`PoolMachine` drives a `ConnectionPool` of `FakeConnection` (server-free, see
_fake_server.py) under a `MockClock` that moves only when a rule says so, with
clients that request, hold, return (clean, dirty, broken or closed by their
user), get cancelled or time out, while connection attempts fail and succeed,
idle connections die, the pool is resized, drained and closed.  After every
step (once every trio task is blocked) it checks the pool's promises:

* ``size <= max_size`` (above it only with connections lent before a
  ``resize`` lowered it, and then nothing is connecting);
* no connection is held by two clients; no client is handed a broken
  connection (the pool has a ``check``);
* FIFO: nobody is served while an earlier client (that never failed a check)
  is still waiting;
* nobody waits past their deadline, and nobody waits while a connection is
  idle;
* every connection the fake server opened and the pool did not close is one
  the pool holds (nothing leaked, nothing closed twice);
* at the end (`teardown`): after ``close``, every client ended as served,
  timed out, cancelled, rejected (``max_waiting``) or refused (closed), and
  every connection is closed.

Trio runs in a thread of its own for each example; each rule runs one step
in it with `trio.from_thread.run` and waits for all tasks to block, so a
step's effects are complete when the invariants are checked.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import psycopg
import trio
import trio.testing
from _fake_server import FakeConnection, FakeServer
from _pool_checks import assert_no_leaks
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from triopool import ConnectionPool, PoolClosed, PoolTimeout, TooManyRequests
from triopool._policy import SlotState

T = TypeVar("T")
State = Literal["waiting", "holding", "returned", "timed_out", "cancelled", "rejected", "refused"]
Return = Literal["clean", "dirty", "broken", "closed"]


class TrioThread:
    """`trio.run` in a thread of its own, taking steps from another thread."""

    def __init__(self, clock: trio.abc.Clock) -> None:
        self._ready = threading.Event()
        self._clock = clock
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
        """Run ``await fn()`` in trio, then wait until every task is blocked."""

        async def step() -> T:
            result = await fn()
            await trio.testing.wait_all_tasks_blocked()
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
    conn: FakeConnection | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    give_back: trio.Event = field(default_factory=trio.Event)
    how: Return = "clean"
    failed_check: bool = False
    in_check: bool = False


POOL_TIMEOUT = 5.0
SERVED = ("holding", "returned")
CHECK_TIME = 0.25


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = trio.testing.MockClock()  # time moves only in `advance`
        self.trio = TrioThread(self.clock)
        self.server = FakeServer(connect_delay=0.5)
        self.clients: list[Client] = []
        self.ids = itertools.count()
        self.violations: list[str] = []
        self.max_size = 3
        self.pool = ConnectionPool(
            kwargs={"server": self.server},
            connection_class=FakeConnection,
            min_size=1,
            max_size=self.max_size,
            max_waiting=4,
            timeout=POOL_TIMEOUT,
            max_idle=20.0,
            max_lifetime=50.0,
            reconnect_timeout=10.0,
            check=self._check,
        )
        self.trio.step(self._open)

    async def _open(self) -> None:
        await self.trio.nursery.start(self.pool.run)

    async def _check(self, conn: psycopg.AsyncConnection) -> None:
        # Takes time, so that clients can be cancelled or time out in it.
        client = next(c for c in self.clients if c.state == "waiting" and self._is_me(c))
        client.in_check = True
        try:
            await trio.sleep(CHECK_TIME)
        finally:
            client.in_check = False
        if conn.closed:
            client.failed_check = True
            raise psycopg.OperationalError("dead connection (fake)")

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
            assert isinstance(conn, FakeConnection)
            self._granted(client, conn)
            try:
                await client.give_back.wait()
            finally:
                self._give_back(client, conn)
        if client.state == "waiting":
            client.state = "cancelled"

    def _granted(self, client: Client, conn: FakeConnection) -> None:
        if conn.closed:
            self.violations.append(f"client {client.id} got a broken connection")
        if any(other.conn is conn for other in self.clients):
            self.violations.append(f"client {client.id} got a connection someone holds")
        client.state, client.conn = "holding", conn

    def _give_back(self, client: Client, conn: FakeConnection) -> None:
        if client.how == "dirty":
            conn.begin()
        elif client.how == "broken":
            conn.kill()
        elif client.how == "closed":
            conn._close_now()
        client.state, client.conn = "returned", None
        self._putconn(conn)

    def _putconn(self, conn: FakeConnection) -> None:
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
        client.how = how
        self.trio.step(self._set(client.give_back))

    @precondition(lambda self: self.waiting() or self.holding())
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        client = data.draw(st.sampled_from(self.waiting() + self.holding()))
        self.trio.step(self._cancel(client.scope))

    @rule(seconds=st.sampled_from([0.25, 0.5, 1.0, 3.0, 25.0, 60.0]))
    def advance(self, seconds: float) -> None:
        async def jump() -> None:
            self.clock.jump(seconds)
            await trio.lowlevel.checkpoint()

        self.trio.step(jump)

    @rule(down=st.booleans())
    def server_down(self, down: bool) -> None:
        self.server.down = down

    @precondition(lambda self: self.idle_connections())
    @rule(data=st.data())
    def kill_idle(self, data: st.DataObject) -> None:
        data.draw(st.sampled_from(self.idle_connections())).kill()

    def idle_connections(self) -> list[FakeConnection]:
        policy = self.pool._policy
        return [
            conn  # type: ignore[misc]
            for slot, conn in self.pool._conns.items()
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
    @rule()
    def close(self) -> None:
        self.trio.step(self.pool.close)

    @staticmethod
    def _set(event: trio.Event) -> Callable[[], Awaitable[None]]:
        async def set_() -> None:  # noqa: ASYNC124, ASYNC910  # runs as a step in trio
            event.set()

        return set_

    @staticmethod
    def _cancel(scope: trio.CancelScope) -> Callable[[], Awaitable[None]]:
        async def cancel() -> None:  # noqa: ASYNC124, ASYNC910  # runs as a step in trio
            scope.cancel()

        return cancel

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
        waiting = self.waiting()  # queued, or checking the connection granted
        assert all(client.deadline > now for client in waiting)
        queued = [client for client in waiting if not client.in_check]
        assert self.pool.status().waiting == len(queued)
        if queued:
            assert self.pool.status().available == 0

    @invariant()
    def server_connections_are_the_pools(self) -> None:
        not_closed = {id(c) for c in self.server.connections if c.closed_at is None}
        assert not_closed == {id(c) for c in self.pool._conns.values()}
        held = [c.conn for c in self.holding()]
        assert len({id(conn) for conn in held}) == len(held)
        assert all(conn in self.pool._conns.values() for conn in held)

    def teardown(self) -> None:
        try:
            self.trio.step(self._autojump)  # from now on, time runs to each deadline
            self.trio.step(self.pool.close)
            for client in self.holding():
                self.trio.step(self._set(client.give_back))
            self.trio.step(self._clients_ended)
            self.trio.step(self._assert_no_leaks)
            assert self.pool._nursery is None
            assert all(conn.closed_at is not None for conn in self.server.connections)
        finally:
            self.trio.stop()

    async def _autojump(self) -> None:  # noqa: ASYNC910  # runs as a step in trio
        # Set in the trio thread: the run loop learns of it only there.
        self.clock.autojump_threshold = 0

    async def _clients_ended(self) -> None:  # noqa: ASYNC910  # runs as a step in trio
        """Clients still checking a connection end their check, then return it."""
        with trio.fail_after(3600):  # noqa: ASYNC912  # the loop sleeps
            while unfinished := [c for c in self.clients if c.state in ("waiting", "holding")]:
                for client in unfinished:
                    client.give_back.set()
                await trio.sleep(CHECK_TIME)

    async def _assert_no_leaks(self) -> None:  # noqa: ASYNC910  # runs as a step in trio
        assert_no_leaks(self.pool)


def test_pool_state_machine() -> None:
    run_state_machine_as_test(
        PoolMachine,
        settings=settings(
            max_examples=150,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
