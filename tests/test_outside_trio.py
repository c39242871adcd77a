"""Outside a trio run, every entry point says that triopool needs trio (issue 14 #2).

Started from asyncio (uvicorn, hypercorn's default worker) or with a coroutine driven
by hand, trio itself would fail deep inside with an ``AttributeError`` that does not
say what is wrong.  Each entry point raises `RuntimeError` naming trio and what to
do instead, before touching anything.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

import triopool

Entry = Callable[[], Coroutine[Any, Any, object]]


async def enter_open_pool() -> None:
    async with triopool.open_pool("", min_size=0, max_size=1):
        pass


async def enter_pool() -> None:
    async with triopool.ConnectionPool("", min_size=0, max_size=1):
        pass


async def run_pool() -> None:
    await triopool.ConnectionPool("", min_size=0, max_size=1).run()


async def getconn() -> None:
    await triopool.ConnectionPool("", min_size=0, max_size=1).getconn()


async def enter_connection() -> None:
    async with triopool.ConnectionPool("", min_size=0, max_size=1).connection():
        pass


async def wait() -> None:
    await triopool.NullConnectionPool("").wait()


ENTRIES: dict[str, Entry] = {
    "open_pool": enter_open_pool,
    "async with pool": enter_pool,
    "pool.run": run_pool,
    "getconn": getconn,
    "pool.connection": enter_connection,
    "wait": wait,
}

MESSAGE = r"needs trio.*hypercorn --worker-class trio.*triopool\.aio"


@pytest.mark.parametrize("entry", ENTRIES)
def test_under_asyncio(entry: str) -> None:
    with pytest.raises(RuntimeError, match=MESSAGE):
        asyncio.run(ENTRIES[entry]())


@pytest.mark.parametrize("entry", ENTRIES)
def test_driven_by_hand(entry: str) -> None:
    coro = ENTRIES[entry]()
    try:
        with pytest.raises(RuntimeError, match=MESSAGE):
            coro.send(None)
    finally:
        coro.close()
