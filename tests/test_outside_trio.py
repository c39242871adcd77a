"""Outside a trio run, every entry point says that triopool needs trio (issue 14 #2).

Started from asyncio (uvicorn, hypercorn's default worker) or with a coroutine driven
by hand, trio itself would fail deep inside with an ``AttributeError`` that does not
say what is wrong.  Each entry point raises `RuntimeError` naming trio and what to
do instead, before touching anything.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
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


async def connect() -> None:
    await triopool.Connection.connect("")


async def one_shot() -> None:
    await triopool.ConnectionPool("", min_size=0, max_size=1).fetchval("SELECT 1")


ENTRIES: dict[str, Entry] = {
    "open_pool": enter_open_pool,
    "async with pool": enter_pool,
    "pool.run": run_pool,
    "getconn": getconn,
    "pool.connection": enter_connection,
    "wait": wait,
    "Connection.connect": connect,
    "pool.fetchval": one_shot,
}

MESSAGE = r"needs trio.*hypercorn --worker-class trio.*triopool\.aio"


# Under asyncio in a process of its own, as an app under uvicorn would be: this one has
# trio-asyncio imported by other tests, which patches asyncio for the whole process.
UNDER_ASYNCIO = """
import asyncio, json, sys
sys.path.insert(0, sys.argv[1])
import test_outside_trio as t
out = {}
for name, entry in t.ENTRIES.items():
    try:
        asyncio.run(entry())
    except BaseException as ex:
        out[name] = f"{type(ex).__name__}: {ex}"
    else:
        out[name] = "no error"
print(json.dumps(out))
"""


def test_under_asyncio() -> None:
    completed = subprocess.run(
        [sys.executable, "-c", UNDER_ASYNCIO, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    errors = json.loads(completed.stdout.splitlines()[-1])
    assert set(errors) == set(ENTRIES)
    for entry, error in errors.items():
        assert re.match(r"RuntimeError: .*" + MESSAGE, error), (entry, error)


@pytest.mark.parametrize("entry", ENTRIES)
def test_driven_by_hand(entry: str) -> None:
    coro = ENTRIES[entry]()
    try:
        with pytest.raises(RuntimeError, match=MESSAGE):
            coro.send(None)
    finally:
        coro.close()
