"""Hostile tests: every user callback hangs, raises, raises a BaseException, or
returns the wrong thing.

``configure``, ``reset``, ``check``, a callable ``conninfo`` or ``kwargs``,
``reconnect_failed``.  What each must do:

* an ``Exception`` (or a wrong result) fails that one step, counted and
  logged: the connection attempt fails (and is retried with backoff), the
  returned connection is discarded, the checked connection replaced;
* a hang is bounded by the pool's ``timeout`` (connection attempts, resets) or
  the request's deadline (``check``); a hanging ``reconnect_failed`` holds
  nothing up;
* a ``BaseException`` (here a custom one, as KeyboardInterrupt would be) comes
  out of the pool's block alone, or (``check``, run by the client) out of the
  client's call, with the connection given back; nothing is left open.

These run on the fake server under the autojump clock: a hang costs no real time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import trio
import trio.testing
from _fake_server import FakeConnection, FakeServer
from _hostile_helpers import WITHIN, Boom, Stop, fake_pool, real_pool
from _hostile_helpers import name as name
from _pool_checks import Server

from triopool import ConnectionPool, PoolStatus, PoolTimeout

BEHAVIOURS = ["raises", "base-exception", "hangs", "wrong-result"]


def misbehaving(behaviour: str, good: object = None) -> Callable[..., Any]:
    """An async callback that misbehaves as said (`good`: what a sane one returns)."""

    async def callback(*_: object) -> object:
        await trio.lowlevel.checkpoint()
        if behaviour == "raises":
            raise Boom("the callback's own error")
        if behaviour == "base-exception":
            raise Stop
        if behaviour == "hangs":
            await trio.sleep_forever()
        if behaviour == "wrong-result":
            return 42
        return good

    return callback


def options_for(callback: str, behaviour: str, server: FakeServer) -> dict[str, Any]:
    if callback == "kwargs":
        return {"kwargs": misbehaving(behaviour, {"server": server})}
    if callback == "conninfo":
        return {"conninfo": misbehaving(behaviour, ""), "kwargs": {"server": server}}
    return {callback: misbehaving(behaviour), "kwargs": {"server": server}}


# -- callbacks of a connection attempt ---------------------------------------------------------


@pytest.mark.parametrize("behaviour", BEHAVIOURS)
@pytest.mark.parametrize("callback", ["configure", "conninfo", "kwargs"])
async def test_connection_attempt_callbacks(
    autojump_clock: trio.testing.MockClock, callback: str, behaviour: str
) -> None:
    """A connection attempt's callback misbehaving: the attempt fails (a hang after
    the pool's ``timeout``) and is retried, and a client's request times out with
    the error as cause; a BaseException ends the pool's block, alone."""
    server = FakeServer()
    options = options_for(callback, behaviour, server)
    pool = ConnectionPool(
        connection_class=FakeConnection, min_size=1, max_size=1, timeout=5.0, **options
    )
    if behaviour == "base-exception":
        with pytest.raises(Stop):
            async with pool:
                await trio.sleep(1.0)
                pytest.fail("the pool went on")
        assert pool.closed
        assert server.open_connections == []
        return
    if behaviour == "wrong-result" and callback == "configure":
        expected: str | None = None  # its result is not used: the pool serves
    elif behaviour == "wrong-result":
        expected = f"the {callback} callable returned int"
    elif behaviour == "hangs":
        expected = "not complete after 5.0 sec"
    else:
        expected = "the callback's own error"
    async with pool:
        if expected is None:
            async with pool.connection(timeout=2.0):
                pass
        else:
            with pytest.raises(PoolTimeout) as info:
                await pool.getconn(timeout=6.0)
            assert expected in str(info.value.__cause__)
            stats = pool.get_stats()
            assert stats["connections_errors"] >= 1
            assert stats["connections_num"] <= 3  # attempts at 0, ~1 s, ~3 s: backoff
        await trio.testing.wait_all_tasks_blocked()
        assert pool.status().size <= 1
    assert server.open_connections == []


# -- reset and check ---------------------------------------------------------------------------


@pytest.mark.parametrize("behaviour", BEHAVIOURS)
async def test_reset_callback(autojump_clock: trio.testing.MockClock, behaviour: str) -> None:
    """``reset`` misbehaving: an error or a hang (cut after ``timeout``) discards the
    returned connection, and the pool replaces it; a wrong result is ignored; a
    BaseException ends the pool's block, alone."""
    server = FakeServer()
    options = options_for("reset", behaviour, server)
    pool = ConnectionPool(
        connection_class=FakeConnection, min_size=1, max_size=1, timeout=5.0, **options
    )
    if behaviour == "base-exception":
        with pytest.raises(Stop):
            async with pool:
                async with pool.connection():
                    pass
                await trio.sleep(1.0)
                pytest.fail("the pool went on")
        assert server.open_connections == []
        return
    async with pool:
        async with pool.connection() as first:
            pass
        async with pool.connection(timeout=10.0) as second:
            pass
        await trio.testing.wait_all_tasks_blocked()
        discarded = behaviour != "wrong-result"
        assert (second is not first) is discarded
        assert (pool.get_stats()["returns_bad"] >= 1) is discarded
    assert server.open_connections == []


@pytest.mark.parametrize("behaviour", BEHAVIOURS)
async def test_check_callback(autojump_clock: trio.testing.MockClock, behaviour: str) -> None:
    """``check`` misbehaving, run by the client: an error discards the connection
    (the client gets another, or times out); a hang is cut at the request's
    deadline; a wrong result is ignored; a BaseException reaches the client,
    which gives the connection back first: the pool goes on."""
    server = FakeServer()
    options = options_for("check", behaviour, server)
    async with fake_pool(
        server, min_size=1, max_size=1, timeout=5.0, check=options["check"]
    ) as pool:
        await pool.wait()
        if behaviour == "base-exception":
            with pytest.raises(Stop):
                await pool.getconn()
        elif behaviour == "wrong-result":
            conn = await pool.getconn()
            await pool.putconn(conn)
        else:
            started = trio.current_time()
            with pytest.raises(PoolTimeout):
                await pool.getconn(timeout=2.0)
            assert trio.current_time() - started == pytest.approx(2.0)
        await trio.testing.wait_all_tasks_blocked()
        assert pool.status().size <= 1
        assert pool.holders() == []


@pytest.mark.parametrize("how", ["close", "finish"])
async def test_check_leaving_the_connection_unusable(
    postgres_server: Server, name: str, how: str
) -> None:
    """A ``check`` that closes (or breaks) the connection without raising: that
    connection is not handed out (it was: the client got a closed connection)
    but discarded as if the check had failed, and the client gets another."""
    checked = 0

    async def check(conn: Any) -> None:
        nonlocal checked
        checked += 1
        if checked == 1:
            if how == "close":
                await conn.close()
            else:
                conn.pgconn.finish()  # a libpq connection gone under psycopg's feet
        await trio.lowlevel.checkpoint()

    async with real_pool(postgres_server, name, min_size=1, max_size=1, check=check) as pool:
        await pool.wait(WITHIN)
        async with pool.connection() as conn:
            assert not conn.closed
            await conn.execute("SELECT 1")
        assert checked == 2
        assert pool.get_stats()["connections_lost"] == 1


# -- reconnect_failed --------------------------------------------------------------------------


@pytest.mark.parametrize("behaviour", ["raises", "hangs", "base-exception"])
async def test_reconnect_failed_callback(
    autojump_clock: trio.testing.MockClock, behaviour: str
) -> None:
    """``reconnect_failed`` raising is logged and the pool keeps trying; one that
    hangs is cut after the pool's ``timeout`` (it used to stay, one more task per
    round of failed attempts for as long as the server was down) and holds
    nothing up; a BaseException ends the pool's block, alone."""
    server = FakeServer(down=True)
    calls = 0

    def sync_callback(pool: ConnectionPool) -> None:
        nonlocal calls
        calls += 1
        if behaviour == "raises":
            raise Boom
        raise Stop

    cut = 0

    async def hanging(pool: ConnectionPool) -> None:
        nonlocal calls, cut
        calls += 1
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cut += 1
            raise

    callback = hanging if behaviour == "hangs" else sync_callback
    pool = ConnectionPool(
        kwargs={"server": server},
        connection_class=FakeConnection,
        min_size=1,
        timeout=5.0,
        reconnect_timeout=2.0,
        reconnect_failed=callback,
    )
    if behaviour == "base-exception":
        with pytest.raises(Stop):
            async with pool:
                await trio.sleep(30.0)
        assert calls == 1
        return
    async with pool:
        await trio.sleep(30.0)
        assert calls >= 5
        if behaviour == "hangs":  # each cut after the pool's timeout: they do not pile up
            assert cut >= calls - 2
        closing = trio.current_time()
    assert trio.current_time() == closing  # nothing to wait for
    server.down = False


async def test_sync_callbacks_where_async_ones_are_expected(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A plain function as ``configure``: each attempt fails with psycopg's
    `TypeError` as the cause the client sees (the pool cannot tell before calling
    it: a callable returning an awaitable is fine)."""
    server = FakeServer()

    def configure(conn: Any) -> None:
        pass

    async with fake_pool(server, min_size=1, max_size=1, configure=configure) as pool:
        with pytest.raises(PoolTimeout) as info:
            await pool.getconn(timeout=2.0)
        assert isinstance(info.value.__cause__, TypeError)
        assert "await" in str(info.value.__cause__)
        assert pool.status() == PoolStatus(1, 1, 0, 0)
    assert not isinstance(info.value.__cause__, psycopg.Error)
