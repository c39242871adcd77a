"""The benchmark workloads on asyncio stacks, for ``triopool bench --compare``.

The same requests as `triopool._bench._workload`, through psycopg_pool's
`AsyncConnectionPool` (on asyncio, or uvloop when installed) and asyncpg's pool
(when installed, with ``reset=None`` so a request is one round trip, as on the
other stacks).  Each runs in its own process (see `triopool._bench._compare`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from typing import Any

from .._bench._results import Request, Result, Settings, Tally
from .._bench._workload import (
    CREATE_TEMP_TABLE,
    INSERT_ROW,
    SELECT_ONE,
    SELECT_ROW,
    choose_txn,
    psycopg_request,
)


async def _drive(settings: Settings, request: Request) -> Result:
    tally = Tally(settings)
    await asyncio.gather(*(tally.client(request) for _ in range(settings.clients)))
    return tally.result()


async def _psycopg_pool(settings: Settings) -> Result:
    import psycopg
    from psycopg_pool import AsyncConnectionPool

    rng = random.Random(1)

    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute(CREATE_TEMP_TABLE)

    async with AsyncConnectionPool(
        settings.dsn,
        min_size=settings.pool_min,
        max_size=settings.pool_max,
        kwargs={"autocommit": True, "application_name": "triopool-bench"},
        configure=configure if settings.workload != "select1" else None,
        open=False,
    ) as pool:
        await pool.wait()
        request = psycopg_request(pool, settings.workload, rng)
        if settings.warmup:
            await _drive(_warmup(settings), request)
        pool.pop_stats()
        result = await _drive(settings, request)
        result.pool_stats = {k: int(v) for k, v in pool.get_stats().items()}
        return result


async def _asyncpg(settings: Settings) -> Result:
    import asyncpg  # type: ignore[import-untyped, import-not-found, unused-ignore]

    rng = random.Random(1)

    async def init(conn: Any) -> None:  # noqa: ASYNC910  # asyncio code
        if settings.workload != "select1":
            await conn.execute(CREATE_TEMP_TABLE)

    pool = await asyncpg.create_pool(
        settings.dsn,
        min_size=settings.pool_min,
        max_size=settings.pool_max,
        init=init,
        reset=None,  # one round trip per request, like the other stacks
        server_settings={"application_name": "triopool-bench"},
    )
    insert = INSERT_ROW
    select_row = SELECT_ROW.replace("%s", "$1")
    try:

        async def request() -> tuple[float, float]:
            t0 = time.perf_counter()
            async with pool.acquire() as conn:
                t1 = time.perf_counter()
                if choose_txn(settings.workload, rng):
                    async with conn.transaction():
                        row_id = await conn.fetchval(insert)
                        await conn.fetchval(select_row, row_id)
                else:
                    await conn.fetchval(SELECT_ONE)
                t2 = time.perf_counter()
            return t1 - t0, t2 - t1

        if settings.warmup:
            await _drive(_warmup(settings), request)
        return await _drive(settings, request)
    finally:
        await pool.close()


def _warmup(settings: Settings) -> Settings:
    return dataclasses.replace(settings, duration=settings.warmup, queries=None)


def run(stack: str, settings: Settings) -> Result:
    """Run `stack` ("psycopg_pool", "psycopg_pool+uvloop" or "asyncpg+uvloop"...)."""
    library, _, loop = stack.partition("+")
    main = {"psycopg_pool": _psycopg_pool, "asyncpg": _asyncpg}[library]
    if loop == "uvloop":
        import uvloop  # type: ignore[import-untyped, import-not-found, unused-ignore]

        result: Result = uvloop.run(main(settings))
    else:
        result = asyncio.run(main(settings))
    result.stack = stack
    return result
