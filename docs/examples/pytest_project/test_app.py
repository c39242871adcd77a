"""Tests of the app's pool behaviour: against a real server, and in mock time."""

import math
from collections.abc import Iterator
from contextlib import contextmanager

import trio
import trio.testing
from app import database_version

import triopool


async def test_database_version(postgres_dsn: str) -> None:
    async with triopool.open_pool(postgres_dsn, min_size=1) as pool:
        version = await database_version(pool)
        assert version is not None
        assert version >= 13


@contextmanager
def autojump(clock: trio.testing.MockClock) -> Iterator[None]:
    """Jump to the next deadline whenever every task waits: only while no I/O is in flight."""
    clock.autojump_threshold = 0
    try:
        yield
    finally:
        clock.autojump_threshold = math.inf


async def test_gives_up_after_two_seconds(
    postgres_dsn: str, mock_clock: trio.testing.MockClock
) -> None:
    # mock_clock stands still until told otherwise: connecting (real I/O) can't time out.
    async with (
        triopool.open_pool(postgres_dsn, min_size=1, wait=True) as pool,
        pool.connection(),  # the pool's only connection is busy
    ):
        with autojump(mock_clock):  # waiting for a connection involves no I/O
            start = trio.current_time()
            assert await database_version(pool) is None
            assert trio.current_time() - start == 2


async def test_idle_connections_close_after_max_idle(
    postgres_dsn: str, mock_clock: trio.testing.MockClock
) -> None:
    async with triopool.open_pool(
        postgres_dsn, min_size=1, max_size=2, max_idle=600, wait=True
    ) as pool:
        async with pool.connection(), pool.connection():  # the pool grows to 2
            pass
        mock_clock.jump(599)
        await trio.testing.wait_all_tasks_blocked()
        assert pool.status().size == 2
        mock_clock.jump(1)  # ten minutes idle: back to min_size, in no time
        await trio.testing.wait_all_tasks_blocked()
        assert pool.status().size == 1
