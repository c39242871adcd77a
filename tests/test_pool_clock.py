"""The pool's time-based behaviour, at exact instants, under `MockClock`.

Every test here runs under ``MockClock(autojump_threshold=0)`` (pytest-trio's
``autojump_clock`` fixture) against `FakeServer`: time jumps straight to the
next deadline, so waiting an hour costs nothing and instants can be asserted
exactly.  The real-server counterparts, with small real timeouts, are in
test_pool_contract.py and test_pool_faults.py.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest
import trio
import trio.testing
from _fake_server import FakeConnection, FakeServer, fake_check
from _pool_checks import assert_no_leaks

from triopool import ConnectionPool, NullConnectionPool, PoolClosed, PoolTimeout


@asynccontextmanager
async def fake_pool(
    server: FakeServer,
    *,
    random: float = 0.5,
    pool_class: type[ConnectionPool] = ConnectionPool,
    **options: Any,
) -> AsyncIterator[ConnectionPool]:
    """A pool of `FakeConnection`; ``random`` fixes the jitter (0.5: none on backoff)."""
    pool = pool_class(kwargs={"server": server}, connection_class=FakeConnection, **options)
    pool._policy.random = lambda: random
    async with pool:
        yield pool
        await trio.testing.wait_all_tasks_blocked()
        assert_no_leaks(pool)
    assert server.open_connections == []


async def test_request_times_out_at_its_deadline(autojump_clock: trio.testing.MockClock) -> None:
    server = FakeServer()
    async with fake_pool(server, min_size=1, timeout=7.0) as pool:
        async with pool.connection():
            start = trio.current_time()
            with pytest.raises(PoolTimeout, match=r"couldn't get a connection after 2.50 sec"):
                await pool.getconn(timeout=2.5)
            assert trio.current_time() == start + 2.5
            with pytest.raises(PoolTimeout):
                await pool.getconn()  # the pool's timeout
            assert trio.current_time() == start + 2.5 + 7.0
            with trio.move_on_after(1.25):  # the caller's own scope bounds the wait too
                await pool.getconn()
            assert trio.current_time() == start + 2.5 + 7.0 + 1.25
            await trio.testing.wait_all_tasks_blocked()  # the scheduler's turn
            assert pool.status().waiting == 0


async def test_waiter_is_served_when_a_connection_comes_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = FakeServer()
    async with fake_pool(server, min_size=1) as pool:
        await pool.wait()
        conn = await pool.getconn()
        got_at: list[float] = []

        async def client() -> None:
            async with pool.connection():
                got_at.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client)
            await trio.sleep(3)
            await pool.putconn(conn)
        assert got_at == [3.0]
        assert pool.get_stats()["requests_queued"] == 1
        assert pool.get_stats()["requests_wait_ms"] == 3000


async def test_idle_connections_above_min_size_close_after_max_idle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = FakeServer()
    async with fake_pool(server, min_size=1, max_size=3, max_idle=60.0) as pool:
        await pool.wait()
        conns = [await pool.getconn() for _ in range(3)]
        await trio.sleep(10)
        for conn in conns:
            await pool.putconn(conn)
        await trio.sleep(100)
        closed = sorted(c.closed_at for c in server.connections if c.closed_at is not None)
        # LIFO idle stack: the connection used most recently is kept.
        assert closed == [70.0, 70.0]
        assert pool.status().size == 1
        await trio.sleep(1000)
        assert pool.status().size == 1  # never below min_size


async def test_idle_timer_restarts_on_use(autojump_clock: trio.testing.MockClock) -> None:
    server = FakeServer()
    async with fake_pool(server, min_size=0, max_size=1, max_idle=60.0) as pool:
        for _ in range(3):  # used every 50 s: never idle for 60
            async with pool.connection():
                pass
            await trio.sleep(50)
        async with pool.connection():
            pass
        await trio.sleep(100)
        [conn] = server.connections
        assert conn.closed_at == 150.0 + 60.0


async def test_connections_replaced_at_max_lifetime(autojump_clock: trio.testing.MockClock) -> None:
    server = FakeServer()
    # random() = 1.0: each lifetime is reduced by the whole 10 % jitter.
    async with fake_pool(server, min_size=2, max_lifetime=1000.0, random=1.0) as pool:
        await pool.wait()
        await trio.sleep(901)
        assert [c.closed_at for c in server.connections[:2]] == [900.0, 900.0]
        assert len(server.open_connections) == 2  # replaced
        assert [c.opened_at for c in server.open_connections] == [900.0, 900.0]


async def test_lent_connection_past_its_lifetime_is_closed_on_return(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = FakeServer()
    async with fake_pool(server, min_size=1, max_lifetime=100.0, random=0.0) as pool:
        conn = await pool.getconn()
        await trio.sleep(500)
        assert not conn.closed  # never taken from its user
        await pool.putconn(conn)
        await trio.testing.wait_all_tasks_blocked()
        assert server.connections[0] is conn
        assert server.connections[0].closed_at == 500.0
        assert pool.status().size == 1


async def test_reconnect_backoff_doubles_and_reconnect_failed_at_reconnect_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = FakeServer(down=True)
    failed_at: list[float] = []

    async def reconnect_failed(pool: ConnectionPool) -> None:  # noqa: ASYNC124, ASYNC910  # a reconnect_failed callback
        failed_at.append(trio.current_time())

    async with fake_pool(
        server, min_size=1, reconnect_timeout=10.0, reconnect_failed=reconnect_failed
    ) as pool:
        await trio.sleep(12.5)
        # 1 s, doubled each time (no jitter with random() = 0.5), the last
        # delay cut so the attempts stop reconnect_timeout after the first.
        assert server.attempts[:5] == [0.0, 1.0, 3.0, 7.0, 10.0]
        assert failed_at == [10.0]
        # Below min_size the pool keeps trying, backing off afresh from a first
        # delay (no busy loop even if reconnect_timeout is tiny).
        assert server.attempts[5:] == [11.0, 12.0]
        server.down = False
        await pool.wait(timeout=10.0)
        assert trio.current_time() == 14.0
        stats = pool.get_stats()
        assert stats["connections_errors"] == 7
        assert stats["connections_num"] == 8  # attempts, failed ones included


async def test_backoff_jitter_stays_within_ten_percent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    for random, first_delay in ((0.0, 0.9), (1.0, 1.1)):
        server = FakeServer(down=True)
        async with fake_pool(server, min_size=1, random=random):
            await trio.sleep(2)
            start = server.attempts[0]
            assert server.attempts[1] - start == pytest.approx(first_delay)


async def test_timeout_message_carries_last_connection_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = FakeServer(down=True)
    async with fake_pool(server, min_size=1) as pool:
        with pytest.raises(PoolTimeout, match="fake server is down") as caught:
            await pool.getconn(timeout=5)
        assert "1 connections" in str(caught.value)
        assert "connecting" in str(caught.value)
        assert "fake server is down" in str(caught.value.__cause__)


async def test_wait_returns_when_min_size_connected(autojump_clock: trio.testing.MockClock) -> None:
    server = FakeServer(connect_delay=4.0)
    async with fake_pool(server, min_size=3) as pool:
        await pool.wait()
        assert trio.current_time() == 4.0
        assert pool.status().available == 3


async def test_wait_times_out_and_closes_the_pool(autojump_clock: trio.testing.MockClock) -> None:
    server = FakeServer(down=True)
    async with fake_pool(server, min_size=1) as pool:
        with pytest.raises(PoolTimeout, match="incomplete after 5") as caught:
            await pool.wait(timeout=5.0)
        assert trio.current_time() == 5.0
        assert pool.closed
        assert "fake server is down" in str(caught.value.__cause__)


async def test_close_does_not_wait_for_a_hanging_connect(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = FakeServer(connect_delay=3600.0)
    async with fake_pool(server, min_size=2) as pool:
        await trio.sleep(1)
        await pool.close(timeout=30.0)
        assert trio.current_time() == 1.0
    assert pool.status().size == 0


async def test_check_failure_serves_another_within_the_same_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = FakeServer(connect_delay=2.0)
    async with fake_pool(server, min_size=2, check=fake_check) as pool:
        await pool.wait()
        server.kill_all()
        start = trio.current_time()
        async with pool.connection(timeout=10.0) as conn:
            assert not conn.closed
            assert trio.current_time() == start + 2.0  # a new connection, made meanwhile
        with pytest.raises(PoolTimeout):  # no time for the new connection
            server.kill_all()
            await pool.getconn(timeout=1.0)
        assert trio.current_time() == start + 3.0


async def test_failing_checks_back_off(autojump_clock: trio.testing.MockClock) -> None:
    """A check failing on every connection: the client retries at once, then after 1, 2,
    4 s... (no jitter here), up to its deadline; each failure counts as a connection lost,
    not a bad return."""
    server = FakeServer(connect_delay=0.5)
    checked_at: list[float] = []

    async def always_fails(conn: object) -> None:
        checked_at.append(trio.current_time())
        await trio.lowlevel.checkpoint()
        raise psycopg.OperationalError("wrong server (test)")

    async with fake_pool(server, min_size=1, max_size=1, check=always_fails) as pool:
        await pool.wait()
        start = trio.current_time()
        with pytest.raises(PoolTimeout):
            await pool.getconn(timeout=10.0)
        assert trio.current_time() == start + 10.0
        # 0: the idle connection; 0.5: its replacement, just made; then backing off
        # (replacements are ready meanwhile).
        assert [at - start for at in checked_at] == [0.0, 0.5, 1.5, 3.5, 7.5]
        stats = pool.get_stats()
        assert (stats["connections_lost"], stats["returns_bad"]) == (5, 0)


async def test_leak_warning_at_leak_timeout(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="triopool")
    logged_at: dict[str, float] = {}
    server = FakeServer()

    class Clocked(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged_at.setdefault(record.levelname, trio.current_time())

    handler = Clocked()
    logging.getLogger("triopool").addHandler(handler)
    try:
        async with fake_pool(
            server, min_size=1, max_size=2, leak_timeout=30.0, name="leaky"
        ) as pool:
            conn = await pool.getconn()
            await trio.sleep(40)
            async with pool.connection():  # not leaked: its return logs nothing
                pass
            await trio.sleep(5)
            assert logged_at == {"WARNING": 30.0}
            await pool.putconn(conn)
    finally:
        logging.getLogger("triopool").removeHandler(handler)
    assert logged_at["INFO"] == 45.0
    warning = next(r for r in caplog.records if r.levelname == "WARNING")
    assert "leaky" in warning.getMessage()
    assert "test_leak_warning_at_leak_timeout" in warning.getMessage()  # the acquiring stack


async def test_null_pool_closes_each_connection_on_return(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = FakeServer(connect_delay=1.0)
    async with fake_pool(server, pool_class=NullConnectionPool, max_size=1) as pool:
        start = trio.current_time()
        async with pool.connection():
            assert trio.current_time() == start + 1.0
        await trio.testing.wait_all_tasks_blocked()
        assert server.open_connections == []
        assert pool.status().size == 0


@pytest.mark.parametrize("when", [0.5, 1.0, 1.5])
async def test_cancelled_waiter_passes_its_connection_on(
    autojump_clock: trio.testing.MockClock, when: float
) -> None:
    """A connection arriving for a waiter that is cancelled goes to the next one."""
    server = FakeServer()
    async with fake_pool(server, min_size=1) as pool:
        conn = await pool.getconn()
        served: list[str] = []

        async def client(name: str, scope_deadline: float) -> None:
            with trio.move_on_at(scope_deadline):
                async with pool.connection():
                    served.append(name)
                    await trio.sleep(0.1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client, "first", when)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(client, "second", 10.0)
            await trio.sleep(1.0)
            await pool.putconn(conn)  # at t=1: "first" is cancelled at 0.5/1.0 or served
        assert served == (["first", "second"] if when > 1.0 else ["second"])


async def test_wait_on_a_ready_pool_returns_even_with_no_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = FakeServer(connect_delay=1.0)
    async with fake_pool(server, min_size=1) as pool:
        await pool.wait()
        await pool.wait(timeout=0)
        assert not pool.closed


@pytest.mark.parametrize("pool_class", [ConnectionPool, NullConnectionPool])
async def test_wait_refuses_a_pool_not_open_or_closed(
    autojump_clock: trio.testing.MockClock, pool_class: type[ConnectionPool]
) -> None:
    server = FakeServer()
    pool = pool_class(
        kwargs={"server": server}, connection_class=FakeConnection, min_size=0, max_size=1
    )
    with pytest.raises(PoolClosed, match="not open"):
        await pool.wait(timeout=10)
    assert trio.current_time() == 0.0
    async with pool:
        pass
    with pytest.raises(PoolClosed, match="is closed"):
        await pool.wait(timeout=10)
    assert server.attempts == []


async def test_timeout_message_gives_the_requested_timeout_when_checks_fail(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = FakeServer(connect_delay=0.5)
    async with fake_pool(server, min_size=1, check=fake_check) as pool:
        await pool.wait()
        server.kill_all()
        server.down = True
        with pytest.raises(PoolTimeout, match=r"after 2.00 sec"):
            await pool.getconn(timeout=2.0)
        server.down = False


async def test_a_return_while_a_borrower_waits_wakes_it_without_a_scheduler_turn(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The hand-off bypass: the connection goes to the first waiter from the returning
    task (no message), in FIFO order, at the instant of the return."""
    server = FakeServer()
    async with fake_pool(server, min_size=1) as pool:
        conn = await pool.getconn()
        served: list[tuple[str, float]] = []

        async def client(name: str) -> None:
            async with pool.connection():
                served.append((name, trio.current_time()))
                await trio.sleep(1.0)

        async with trio.open_nursery() as nursery:
            for name in ("first", "second"):
                nursery.start_soon(client, name)
                await trio.testing.wait_all_tasks_blocked()  # queued, in this order
            await trio.sleep(2.0)
            await pool.putconn(conn)
            assert pool._scheduler.pending == 0  # no Release message: handed over
        assert served == [("first", 2.0), ("second", 3.0)]
        assert pool.get_stats()["requests_wait_ms"] == 2000 + 3000


async def test_a_return_handed_to_a_waiter_cancelled_just_before_goes_to_the_next(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The first waiter is cancelled (its withdrawal still in the inbox) right before the
    return: the hand-off finds it dead and passes the connection to the second."""
    server = FakeServer()
    async with fake_pool(server, min_size=1) as pool:
        conn = await pool.getconn()
        served: list[str] = []
        cancelled: list[str] = []

        async def client(name: str, scope: trio.CancelScope) -> None:
            with scope:
                async with pool.connection():
                    served.append(name)
            if scope.cancelled_caught:
                cancelled.append(name)

        first_scope = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client, "first", first_scope)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(client, "second", trio.CancelScope())
            await trio.testing.wait_all_tasks_blocked()
            first_scope.cancel()  # its abort posts the dead request...
            assert pool._scheduler.pending == 1
            await pool.putconn(conn)  # ...and the return comes before the scheduler's turn
        assert served == ["second"]
        assert cancelled == ["first"]
        assert pool.status().waiting == 0
