"""Shared checks for pool tests: the leak check every pool test ends with.

`assert_no_leaks` is the book-keeping half (no I/O); `assert_settled` adds the
server's view: the pool's backends, counted by ``application_name``, match the
connections the pool holds.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
import trio.testing

from triopool import Connection, ConnectionPool
from triopool._policy import SlotState
from triopool.testing import ExternalServer, PostgresServer

Server = PostgresServer | ExternalServer


def app_name(prefix: str = "tp") -> str:
    """A unique ``application_name`` to find one test's backends on the server."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def eventually(condition: Callable[[], bool], within: float = 5.0) -> bool:
    """Whether `condition()` holds now or within `within` seconds (checked every 10 ms).

    For synchronous code outside trio (sync tests, the thread hypothesis
    drives state machines from), waiting on state that offers no event: a
    process exiting, the server's backend count.  Trio code polls with
    ``trio.sleep`` instead.
    """
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def process_state(pid: int) -> str | None:
    """The process's state letter (``R``, ``S``, ``T`` stopped, ``Z`` zombie), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def dead(pid: int) -> bool:
    return process_state(pid) in (None, "Z")


async def backends(server: Server, name: str) -> int:
    """How many backends the server has for `name` now."""
    return await trio.to_thread.run_sync(server.count_backends, name)


async def settled_backends(server: Server, name: str, expected: int, within: float = 3.0) -> int:
    """The server's count once it equals `expected`, or whatever it is after `within` s.

    Backends exit asynchronously after a client closes its socket, so the
    count is polled (the server offers no event to wait on).
    """
    with trio.move_on_after(within):
        while (count := await backends(server, name)) != expected:  # noqa: ASYNC110  # server-side state: no event to wait on
            await trio.sleep(0.02)
        return count
    return await backends(server, name)


def pool_connections(pool: ConnectionPool) -> dict[int, Connection[Any]]:
    """The connections the pool holds (idle, lent or busy), by slot."""
    return {
        slot: actor.conn for slot, actor in pool._scheduler.actors.items() if actor.conn is not None
    }


def assert_no_leaks(pool: ConnectionPool) -> None:
    """Nothing lent, the policy's books balance, and the size is within bounds."""
    policy = pool._policy
    assert pool.holders() == [], pool.holders()
    assert policy.count(SlotState.LENT) == 0
    assert policy.size <= pool.max_size or pool.max_size == 0
    assert policy.size == sum(policy.count(state) for state in SlotState)
    with_conn = sum(
        1
        for slot in policy.slots.values()
        if slot.state in (SlotState.IDLE, SlotState.RESETTING, SlotState.LENT)
    )
    assert len(pool_connections(pool)) >= with_conn


async def assert_settled(
    pool: ConnectionPool, server: Server | None = None, name: str = ""
) -> None:
    """Let the pool's actors finish, then check the books (and the server's count).

    For an open pool, the server must have exactly one backend per connection
    the pool holds; for a closed pool, none, and no background task left.
    """
    await trio.testing.wait_all_tasks_blocked()
    assert_no_leaks(pool)
    if pool.closed:
        assert pool._nursery is None, "pool tasks still running after close"
        assert all(conn.closed for conn in pool_connections(pool).values())
        expected = 0
    else:
        expected = len(pool_connections(pool))
    if server is not None and name:
        assert await settled_backends(server, name, expected) == expected
