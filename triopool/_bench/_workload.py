"""The workloads, driven by many trio tasks through a triopool pool.

A *request* is one acquire + one unit of work + release.  Every stack runs the
same requests with the same settings; only the pool and the event loop differ.
With ``autocommit=True`` a ``select1`` request is one round trip to the server
on every stack.  The ``fetchval`` workload is the pools' one-shot call
instead, ``pool.fetchval("SELECT 1")`` (psycopg_pool has none: it runs
``select1``); a one-shot call does not show the wait for a connection apart,
so its whole time counts as query latency.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import trio
from psycopg import AsyncConnection

from ..connection import Connection
from ..pool import ConnectionPool, open_pool
from ._results import Request, Result, Settings, Tally

#: SQL shared by every stack.  ``txn`` works on a temporary table only, so the
#: benchmark never modifies a database it is pointed at.
CREATE_TEMP_TABLE = (
    "CREATE TEMP TABLE IF NOT EXISTS triopool_bench (id serial PRIMARY KEY, note text)"
)
SELECT_ONE = "SELECT 1"
INSERT_ROW = "INSERT INTO triopool_bench (note) VALUES ('bench') RETURNING id"
SELECT_ROW = "SELECT note FROM triopool_bench WHERE id = %s"
MIXED_TXN_SHARE = 0.2


class PsycopgPool(Protocol):
    """What `psycopg_request` uses of a pool: psycopg_pool's ``connection()``."""

    def connection(self) -> AbstractAsyncContextManager[AsyncConnection[Any]]: ...


def choose_txn(workload: str, rng: random.Random) -> bool:
    """Whether the next request of `workload` is a transaction."""
    if workload in ("select1", "fetchval"):
        return False
    if workload == "txn":
        return True
    return rng.random() < MIXED_TXN_SHARE


def psycopg_request(pool: PsycopgPool, workload: str, rng: random.Random) -> Request:
    """A request through a pool of psycopg connections (triopool's or psycopg_pool's)."""

    async def request() -> tuple[float, float]:
        t0 = time.perf_counter()
        async with pool.connection() as conn:
            t1 = time.perf_counter()
            if choose_txn(workload, rng):
                async with conn.transaction():
                    cur = await conn.execute(INSERT_ROW)
                    row = await cur.fetchone()
                    assert row is not None
                    await conn.execute(SELECT_ROW, row)
            else:
                await conn.execute(SELECT_ONE)
            t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    return request


def uses_table(workload: str) -> bool:
    """Whether `workload` needs the temporary table (made by each connection's configure)."""
    return workload in ("txn", "mixed")


def one_shot_request(pool: ConnectionPool) -> Request:
    """A ``fetchval`` request: the pool's one-shot call (no acquire of one's own)."""

    async def request() -> tuple[float, float]:
        t0 = time.perf_counter()
        await pool.fetchval(SELECT_ONE)
        return 0.0, time.perf_counter() - t0

    return request


async def drive(
    settings: Settings,
    request: Request,
    progress: Callable[[int], None] | None = None,
) -> Result:
    """Run `settings.clients` tasks issuing `request` until the run is over."""
    tally = Tally(settings)

    async def report_progress() -> None:
        assert progress is not None
        while True:
            progress(len(tally.latency_ms))
            await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        if progress is not None:
            nursery.start_soon(report_progress)
        async with trio.open_nursery() as clients:
            for _ in range(settings.clients):
                clients.start_soon(tally.client, request)
        nursery.cancel_scope.cancel()
    result = tally.result()
    if progress is not None:
        progress(result.queries)
    return result


async def _configure(conn: Connection[Any]) -> None:
    await conn.execute(CREATE_TEMP_TABLE)


async def run_triopool(settings: Settings, progress: Callable[[int], None] | None = None) -> Result:
    """The workload through a `ConnectionPool` (autocommit connections)."""
    rng = random.Random(1)
    async with open_pool(
        settings.dsn,
        min_size=settings.pool_min,
        max_size=settings.pool_max,
        kwargs={"autocommit": True, "application_name": "triopool-bench"},
        configure=_configure if uses_table(settings.workload) else None,
        wait=True,
    ) as pool:
        if settings.workload == "fetchval":
            request = one_shot_request(pool)
        else:
            request = psycopg_request(pool, settings.workload, rng)
        if settings.warmup:
            await drive(
                dataclasses.replace(settings, duration=settings.warmup, queries=None), request
            )
        pool.pop_stats()
        result = await drive(settings, request, progress)
        result.stack = "triopool"
        result.pool_stats = pool.get_stats()
    return result


async def acquire_release_us(pool: ConnectionPool, tasks: int, cycles: int) -> float:
    """Mean µs per acquire + checkpoint + release (no query), with `tasks` tasks competing.

    The checkpoint: a client holds its connection across a scheduling point, as
    any client doing I/O does (and as the design guide measures).
    """
    per_task = cycles // tasks

    async def cycle() -> None:  # noqa: ASYNC910  # nursery
        for _ in range(per_task):
            conn = await pool.getconn()
            await trio.lowlevel.checkpoint()
            await pool.putconn(conn)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(cycle)
    return (time.perf_counter() - started) / (per_task * tasks) * 1e6


async def semaphore_deque_us(size: int, tasks: int, cycles: int) -> float:
    """The same measure for the simplest trio pool: a Semaphore and a deque."""
    from collections import deque

    semaphore = trio.Semaphore(size)
    items: deque[object] = deque(object() for _ in range(size))
    per_task = cycles // tasks

    async def cycle() -> None:  # noqa: ASYNC910  # nursery
        for _ in range(per_task):
            await semaphore.acquire()
            item = items.popleft()
            await trio.lowlevel.checkpoint()
            items.append(item)
            semaphore.release()

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(cycle)
    return (time.perf_counter() - started) / (per_task * tasks) * 1e6


async def sequential_select1_qps(dsn: str, seconds: float) -> float:
    """Sequential autocommit ``SELECT 1`` on one `triopool.Connection`."""
    async with await Connection.connect(dsn, autocommit=True) as conn:
        for _ in range(200):
            await conn.execute(SELECT_ONE)
        count = 0
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            for _ in range(100):
                await conn.execute(SELECT_ONE)
            count += 100
        return count / (time.perf_counter() - started)
