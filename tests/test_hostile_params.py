"""Hostile tests: every numeric parameter at 0, tiny, huge, infinite and of the wrong type.

Each value is either refused at once (`ValueError` or `TypeError` naming the
parameter) or works: no livelock, no busy loop, no huge allocation.  The
choices made here:

* ``timeout`` (the pool's) must be > 0: it also bounds every connection
  attempt, so 0 made a pool that could never connect.  A request's own
  ``timeout`` may be 0 (only an idle connection serves it).
* ``min_size`` is opened at once, so it is bounded by PostgreSQL's own
  ``MAX_BACKENDS`` (262143): 10**9 used to try to make 10**9 slots and actors
  in one scheduler turn.  ``max_size`` is reached only on demand: any int works.
* Seconds may be ``math.inf``; an int too big for a float (10**400) means
  forever too, instead of an ``OverflowError``.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

import pytest
import trio
import trio.testing
from _fake_server import FakeServer
from _fault_helpers import until
from _hostile_helpers import WITHIN, PoolClass, both_classes, fake_pool, min_for, real_pool
from _hostile_helpers import name as name
from _pool_checks import Server

from triopool import ConnectionPool, NullConnectionPool, PoolStatus, PoolTimeout
from triopool._policy import PoolPolicy

SECONDS = ["timeout", "max_lifetime", "max_idle", "reconnect_timeout", "leak_timeout"]


# -- the constructor --------------------------------------------------------------------


@both_classes
@pytest.mark.parametrize("timeout", [0, 0.0])
def test_pool_timeout_zero_is_refused(pool_class: PoolClass, timeout: float) -> None:
    """The pool's ``timeout`` bounds each connection attempt too: 0 would fail every
    attempt (the pool never connects), so it is refused, naming it."""
    with pytest.raises(ValueError, match="timeout must be > 0"):
        pool_class("", timeout=timeout)


@both_classes
@pytest.mark.parametrize("parameter", SECONDS)
def test_huge_int_seconds_mean_forever(pool_class: PoolClass, parameter: str) -> None:
    """An int too big for a float is longer than any float of seconds: it is
    accepted as ``math.inf`` (it used to raise `OverflowError`); a negative one is
    a `ValueError` naming the parameter."""
    huge: dict[str, Any] = {parameter: 10**400}
    pool = pool_class("", **huge)
    assert getattr(pool, parameter) == math.inf
    huge[parameter] = -(10**400)
    with pytest.raises(ValueError, match=parameter):
        pool_class("", **huge)


@pytest.mark.parametrize("min_size", [2**18, 10**9, 10**400], ids=["2**18", "10**9", "10**400"])
def test_min_size_beyond_any_server_is_refused(min_size: int) -> None:
    """``min_size`` connections are opened at once: one above PostgreSQL's most
    backends (2**18 - 1) is refused, naming it, instead of making that many slots
    and tasks in one scheduler turn (10**9 hung the process, eating memory)."""
    with pytest.raises(ValueError, match="min_size must be <= 262143"):
        ConnectionPool("", min_size=min_size, max_size=min_size)
    with pytest.raises(ValueError, match="min_size"):
        NullConnectionPool("", min_size=min_size)


@both_classes
@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"min_size": 1.0}, TypeError, "min_size"),
        ({"min_size": "1"}, TypeError, "min_size"),
        ({"max_size": True}, TypeError, "max_size"),
        ({"max_size": 2.0}, TypeError, "max_size"),
        ({"max_size": math.inf}, TypeError, "max_size"),
        ({"max_waiting": True}, TypeError, "max_waiting"),
        ({"max_waiting": math.inf}, TypeError, "max_waiting"),
        ({"timeout": None}, TypeError, "timeout"),
        ({"timeout": True}, TypeError, "timeout"),
        ({"timeout": -math.inf}, ValueError, "timeout"),
        ({"max_lifetime": 0}, ValueError, "max_lifetime"),
        ({"max_lifetime": None}, TypeError, "max_lifetime"),
        ({"max_idle": math.nan}, ValueError, "max_idle"),
        ({"max_idle": False}, TypeError, "max_idle"),
        ({"reconnect_timeout": -1e-12}, ValueError, "reconnect_timeout"),
        ({"reconnect_timeout": "300"}, TypeError, "reconnect_timeout"),
        ({"leak_timeout": math.nan}, ValueError, "leak_timeout"),
        ({"leak_timeout": True}, TypeError, "leak_timeout"),
    ],
)
def test_wrong_types_and_values_name_the_parameter(
    pool_class: PoolClass, options: dict[str, Any], error: type[Exception], match: str
) -> None:
    """Beyond the contract suite's list: bools, floats for ints, None, infinities."""
    if pool_class is NullConnectionPool and "max_size" in options:
        options = {**options, "min_size": 0}
    with pytest.raises(error, match=match):
        pool_class("", **options)


async def test_tiny_pool_timeout_fails_attempts_without_a_busy_loop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The pool's ``timeout`` tiny but > 0 (1e-9): every connection attempt times
    out, the client gets `PoolTimeout` saying so, and the attempts back off (1 s,
    2 s, 4 s...): a handful in 10 s, not a busy loop."""
    server = FakeServer(connect_delay=0.001)
    async with fake_pool(server, min_size=1, max_size=1, timeout=1e-9) as pool:
        with pytest.raises(PoolTimeout) as info:
            await pool.getconn(timeout=10.0)
        assert "not complete after 1e-09 sec" in str(info.value.__cause__)
    assert 2 <= len(server.attempts) <= 5


# -- infinite and huge values work ---------------------------------------------------------


@pytest.mark.parametrize("forever", [math.inf, 1e308, 10**400], ids=["inf", "1e308", "10**400"])
async def test_infinite_seconds_everywhere_work(
    postgres_server: Server, name: str, forever: float
) -> None:
    """Every seconds parameter, and every call's ``timeout``, infinite or huge: the
    pool serves, waits and closes at once (no overflow in a deadline, no sleep
    that never ends where nothing is to be waited for)."""
    with trio.fail_after(WITHIN):
        async with real_pool(
            postgres_server,
            name,
            min_size=1,
            max_size=2,
            timeout=forever,
            max_lifetime=forever,
            max_idle=forever,
            reconnect_timeout=forever,
            leak_timeout=forever,
        ) as pool:
            await pool.wait(forever)
            async with pool.connection(timeout=forever) as conn:
                await conn.execute("SELECT 1")
            conn = await pool.getconn(timeout=forever)
            await pool.putconn(conn)
            assert await pool.fetchval("SELECT 7", timeout=forever) == 7
            assert await pool.executemany("SELECT %s", [(1,)], timeout=forever) == 1
            await pool.close(forever)


async def test_huge_max_size_grows_on_demand_only(postgres_server: Server, name: str) -> None:
    """``max_size`` (and ``max_waiting``) 10**18: nothing is made for it up
    front; the pool grows by the clients that wait, as with any max_size, and
    ``resize`` to it works too."""
    async with real_pool(
        postgres_server, name, min_size=0, max_size=10**18, max_waiting=10**18
    ) as pool:
        release = trio.Event()

        async def client() -> None:
            async with pool.connection():
                await release.wait()

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(client)
            await until(lambda: pool.status() == PoolStatus(10**18, 3, 0, 0), WITHIN, "grown")
            assert pool.status().size == 3
            release.set()
        await pool.resize(1, 10**18)
        assert pool.status().max_size == 10**18


def test_a_burst_of_requests_costs_linear_time() -> None:
    """A null pool with no limit (or ``max_size`` 10**18) opens a connection per
    waiting request, and each request counted the connections coming for waiters
    by walking every slot (``PoolPolicy._incoming``): a burst of n requests cost
    O(n**2) in the scheduler, which blocks the event loop (4000 requests: ~2 s
    in the policy alone, ~8 s through the pool with fake connections).  8 times
    as many requests must cost about 8 times as much, not 64.  (Fixed: a running
    count.)  Cost is counted, not timed: the Python lines the policy executes
    (`sys.settrace`), the same on any machine however busy."""

    def burst(requests: int) -> int:
        policy: PoolPolicy[int] = PoolPolicy(min_size=0, max_size=None, keep_idle=False)
        policy.open()
        lines = 0

        def trace(frame: FrameType, event: str, arg: object) -> Any:
            nonlocal lines
            if event == "line":
                lines += 1
            return trace

        sys.settrace(trace)
        try:
            for waiter in range(requests):
                policy.request(waiter, 0.0)
        finally:
            sys.settrace(None)
        return lines

    small, big = burst(250), burst(2000)
    assert big < 10 * small, f"{big / small:.1f} times the work for 8 times the requests"


async def test_min_size_beyond_any_server_refused_by_resize(
    postgres_server: Server, name: str
) -> None:
    """``resize`` refuses it too, before and after opening, and changes nothing."""
    pool = ConnectionPool(postgres_server.dsn, min_size=1, max_size=2)
    with pytest.raises(ValueError, match="min_size"):
        await pool.resize(10**9, 10**9)
    async with real_pool(postgres_server, name, min_size=1, max_size=2) as pool:
        with pytest.raises(ValueError, match="min_size"):
            await pool.resize(2**18, 2**18)
        assert (pool.min_size, pool.max_size) == (1, 2)


# -- zero and tiny values work ---------------------------------------------------------------


@pytest.mark.parametrize("max_idle", [0, 1e-12])
async def test_zero_max_idle_closes_surplus_at_once_and_serves(
    postgres_server: Server, name: str, max_idle: float
) -> None:
    """``max_idle=0``: a connection above ``min_size`` is closed as soon as it is
    idle, yet every client is served and the scheduler does not spin (the pool
    settles at ``min_size``, with no more attempts than requests that grew it)."""
    async with real_pool(postgres_server, name, min_size=1, max_size=3, max_idle=max_idle) as pool:
        await pool.wait(WITHIN)
        for _ in range(3):
            async with trio.open_nursery() as nursery:
                for _ in range(3):

                    async def client() -> None:
                        async with pool.connection() as conn:
                            await conn.execute("SELECT pg_sleep(0.01)")

                    nursery.start_soon(client)
        await until(lambda: pool.status() == PoolStatus(3, 1, 1, 0), WITHIN, "back to min_size")
        assert pool.get_stats()["connections_num"] <= 1 + 3 * 2


@pytest.mark.parametrize("leak_timeout", [0, 1e-12])
async def test_zero_leak_timeout_warns_once_per_loan(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture, leak_timeout: float
) -> None:
    """``leak_timeout=0``: every loan is reported, once, and the watch does not
    spin (it would keep the mock clock from moving: the test would hang)."""
    caplog.set_level(logging.WARNING, logger="triopool")
    async with fake_pool(FakeServer(), min_size=2, leak_timeout=leak_timeout) as pool:
        for _ in range(3):
            async with pool.connection(), pool.connection():
                await trio.sleep(1.0)
        await trio.sleep(5.0)
    warnings = [r for r in caplog.records if "connection held by task" in r.getMessage()]
    assert len(warnings) == 6


@both_classes
@pytest.mark.parametrize("close_timeout", [0, 1e-12])
async def test_close_with_no_time_leaves_nothing(
    postgres_server: Server, name: str, pool_class: PoolClass, close_timeout: float
) -> None:
    """``close(0)`` with a connection lent and one idle: it returns at once; the
    lent one is closed when it comes back; no task and no backend is left."""
    async with real_pool(
        postgres_server, name, pool_class, min_size=min_for(pool_class, 1), max_size=2
    ) as pool:
        async with pool.connection() as held:
            with trio.fail_after(1.0):
                await pool.close(close_timeout)
            await held.execute("SELECT 1")  # still usable by its holder
        assert held.closed


async def test_null_pool_wait_with_no_time(postgres_server: Server, name: str) -> None:
    """``NullConnectionPool.wait(0)`` opens a test connection in no time: it could
    only fail, and it used to close the pool for it.  A `ValueError` now (as for
    its ``getconn(timeout=0)``), the pool left open and serving."""
    async with real_pool(postgres_server, name, NullConnectionPool, max_size=1) as pool:
        with pytest.raises(ValueError, match="timeout must be > 0"):
            await pool.wait(0)
        assert not pool.closed
        await pool.wait(WITHIN)
        assert await pool.fetchval("SELECT 1") == 1


async def test_tiny_request_timeout_behaves_as_zero(postgres_server: Server, name: str) -> None:
    """A request ``timeout`` of 1e-12 (below the clock's resolution): served by an
    idle connection, else `PoolTimeout` at once, and the pool still grows for it
    (as for 0), so the next such request is served."""
    async with real_pool(postgres_server, name, min_size=0, max_size=1) as pool:
        with pytest.raises(PoolTimeout):
            await pool.getconn(timeout=1e-12)
        await until(lambda: pool.status().available == 1, WITHIN, "grown for it")
        conn = await pool.getconn(timeout=1e-12)
        await pool.putconn(conn)


# -- every call's timeout: wrong types named, huge ints forever ------------------------------


def _calls(pool: ConnectionPool) -> dict[str, Callable[[Any], Awaitable[object]]]:
    async def connection(seconds: Any) -> None:
        async with pool.connection(seconds) as conn:
            await conn.execute("SELECT 1")

    async def getconn(seconds: Any) -> None:
        await pool.putconn(await pool.getconn(seconds))

    return {
        "connection": connection,
        "getconn": getconn,
        "fetch": lambda seconds: pool.fetch("SELECT 1", timeout=seconds),
        "fetchrow": lambda seconds: pool.fetchrow("SELECT 1", timeout=seconds),
        "fetchval": lambda seconds: pool.fetchval("SELECT 1", timeout=seconds),
        "execute": lambda seconds: pool.execute("SELECT 1", timeout=seconds),
        "executemany": lambda seconds: pool.executemany("SELECT %s", [(1,)], timeout=seconds),
        "wait": lambda seconds: pool.wait(seconds),
    }


@pytest.mark.parametrize(
    ("seconds", "error"),
    [
        ("1", TypeError),
        (True, TypeError),
        ([], TypeError),
        (-1, ValueError),
        (-1e-12, ValueError),
        (math.nan, ValueError),
        (-math.inf, ValueError),
        (-(10**400), ValueError),
    ],
    ids=["str", "bool", "list", "-1", "-1e-12", "nan", "-inf", "-10**400"],
)
async def test_every_calls_timeout_validated(
    postgres_server: Server, name: str, seconds: Any, error: type[Exception]
) -> None:
    """A bad ``timeout`` for any call is a clear error naming it, raised before
    anything happens: the pool keeps serving, nothing is lent or queued."""
    async with real_pool(postgres_server, name, min_size=1, max_size=1) as pool:
        await pool.wait(WITHIN)
        for call_name, call in _calls(pool).items():
            with pytest.raises(error, match="timeout"):
                await call(seconds)
            assert pool.status() == PoolStatus(1, 1, 1, 0), call_name
        with pytest.raises(error, match="timeout"):
            await pool.close(seconds)
        assert not pool.closed


# -- listener(buffer_size=) --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("buffer_size", "error"),
    [(True, TypeError), (1.0, TypeError), ("10", TypeError), (0, ValueError), (-5, ValueError)],
)
async def test_listener_buffer_size_validated(
    postgres_server: Server, name: str, buffer_size: Any, error: type[Exception]
) -> None:
    """``buffer_size`` must be an int >= 1 (``True`` was taken as 1)."""
    async with real_pool(postgres_server, name, min_size=0, max_size=1) as pool:
        with pytest.raises(error, match="buffer_size"):
            async with pool.listener("tp_hostile", buffer_size=buffer_size):
                pytest.fail("entered")


async def test_listener_huge_buffer_allocates_nothing_up_front(
    postgres_server: Server, name: str
) -> None:
    """``buffer_size=10**18`` is a bound, not an allocation: the listener works."""
    async with real_pool(postgres_server, name, min_size=0, max_size=1) as pool:
        async with pool.listener("tp_hostile_huge", buffer_size=10**18) as notifications:
            await pool.execute("NOTIFY tp_hostile_huge, 'x'")
            with trio.fail_after(WITHIN):
                item = await notifications.__anext__()
            assert getattr(item, "payload", None) == "x"
