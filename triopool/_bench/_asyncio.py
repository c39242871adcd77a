"""The benchmark's requests on asyncio stacks, for ``triopool bench --compare``.

The same requests as `triopool._bench._workload`, through psycopg_pool's
`AsyncConnectionPool` and asyncpg's pool, on asyncio or uvloop.  asyncpg runs
twice: with its default reset, which sends a reset query (``RESET ALL``,
``UNLISTEN *``...) when a connection comes back, so a ``select1`` request costs
two round trips; and with a no-op reset, one round trip, as on the psycopg
stacks (whose pools only roll back a connection that comes back in a
transaction).  Each stack runs in its own process (`triopool._bench._compare`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
import urllib.parse
from collections.abc import Callable, Coroutine
from typing import Any

import psycopg

from ._results import Result, Settings, Tally
from ._workload import (
    CREATE_TEMP_TABLE,
    INSERT_ROW,
    SELECT_ONE,
    SELECT_ROW,
    choose_txn,
    psycopg_request,
    uses_table,
)

APPLICATION_NAME = "triopool-bench"
#: Suffixes of the two asyncpg stacks' names.
DEFAULT_RESET = "default reset"
NO_RESET = "no-op reset"
#: libpq parameters that asyncpg reads from the query of a URL (asyncpg's connect_utils).
ASYNCPG_URL_KEYS = frozenset(
    {
        "host",
        "port",
        "user",
        "password",
        "dbname",
        "passfile",
        "sslmode",
        "sslcert",
        "sslkey",
        "sslrootcert",
        "sslcrl",
        "sslpassword",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
        "target_session_attrs",
        "krbsrvname",
        "gsslib",
    }
)


def asyncpg_arguments(dsn: str) -> dict[str, Any]:
    """asyncpg's ``connect``/``create_pool`` arguments for a libpq connection string.

    psycopg accepts URLs and ``key=value`` strings; asyncpg parses URLs only, and
    takes some libpq parameters under other names.  The string is parsed by
    psycopg (`~psycopg.conninfo.conninfo_to_dict`) and rebuilt as a URL holding
    every parameter in its query; ``connect_timeout`` becomes ``timeout``, and
    ``hostaddr`` the host.  ``application_name`` is dropped: the benchmark names
    its connections.

    Raises:
        psycopg.ProgrammingError: `dsn` is no connection string.
        ValueError: it has a parameter asyncpg has no equivalent for.
    """
    params = {key: str(value) for key, value in psycopg.conninfo.conninfo_to_dict(dsn).items()}
    params.pop("application_name", None)
    arguments: dict[str, Any] = {}
    if "connect_timeout" in params:
        arguments["timeout"] = float(params.pop("connect_timeout"))
    if "hostaddr" in params:
        params["host"] = params.pop("hostaddr")
    if unknown := sorted(set(params) - ASYNCPG_URL_KEYS):
        raise ValueError(f"asyncpg has no equivalent of libpq's {', '.join(unknown)}")
    arguments["dsn"] = "postgresql://?" + urllib.parse.urlencode(params)
    return arguments


async def _drive(settings: Settings, request: Callable[[], Any]) -> Result:
    tally = Tally(settings)
    await asyncio.gather(*(tally.client(request) for _ in range(settings.clients)))
    return tally.result()


def _warmup(settings: Settings) -> Settings:
    return dataclasses.replace(settings, duration=settings.warmup, queries=None)


async def _psycopg_pool(settings: Settings) -> Result:
    from psycopg_pool import AsyncConnectionPool

    rng = random.Random(1)

    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute(CREATE_TEMP_TABLE)

    async with AsyncConnectionPool(
        settings.dsn,
        min_size=settings.pool_min,
        max_size=settings.pool_max,
        kwargs={"autocommit": True, "application_name": APPLICATION_NAME},
        configure=configure if uses_table(settings.workload) else None,
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


async def _no_reset(conn: Any) -> None:
    """asyncpg's pool calls this instead of its reset query (it still rolls back an open
    transaction first)."""


async def _asyncpg(settings: Settings, *, default_reset: bool) -> Result:
    import asyncpg  # type: ignore[import-untyped, import-not-found, unused-ignore]

    rng = random.Random(1)

    async def init(conn: Any) -> None:  # noqa: ASYNC910  # asyncio code
        if uses_table(settings.workload):
            await conn.execute(CREATE_TEMP_TABLE)

    pool = await asyncpg.create_pool(
        **asyncpg_arguments(settings.dsn),
        min_size=settings.pool_min,
        max_size=settings.pool_max,
        init=init,
        reset=None if default_reset else _no_reset,  # None: asyncpg's reset query
        server_settings={"application_name": APPLICATION_NAME},
    )
    select_row = SELECT_ROW.replace("%s", "$1")
    try:

        async def request() -> tuple[float, float]:
            t0 = time.perf_counter()
            async with pool.acquire() as conn:
                t1 = time.perf_counter()
                if choose_txn(settings.workload, rng):
                    async with conn.transaction():
                        row_id = await conn.fetchval(INSERT_ROW)
                        await conn.fetchval(select_row, row_id)
                else:
                    await conn.fetchval(SELECT_ONE)
                t2 = time.perf_counter()
            return t1 - t0, t2 - t1

        async def one_shot() -> tuple[float, float]:
            t0 = time.perf_counter()
            await pool.fetchval(SELECT_ONE)  # asyncpg's one-shot call: acquire, query, release
            return 0.0, time.perf_counter() - t0

        if settings.workload == "fetchval":
            request = one_shot
        if settings.warmup:
            await _drive(_warmup(settings), request)
        return await _drive(settings, request)
    finally:
        await pool.close()


def stack_name(library: str, uvloop: bool, reset: str = "") -> str:
    """A stack's name: ``psycopg_pool``, ``asyncpg+uvloop, no-op reset``..."""
    name = library + ("+uvloop" if uvloop else "")
    return f"{name}, {reset}" if reset else name


def run(stack: str, settings: Settings) -> Result:
    """Run `stack` (a `stack_name`) in this process; return its result."""
    name, _, reset = stack.partition(", ")
    library, _, loop = name.partition("+")
    main: Coroutine[Any, Any, Result]
    if library == "psycopg_pool":
        main = _psycopg_pool(settings)
    elif library == "asyncpg" and reset in (DEFAULT_RESET, NO_RESET):
        main = _asyncpg(settings, default_reset=reset == DEFAULT_RESET)
    else:
        raise ValueError(f"unknown stack {stack!r}")
    if loop == "uvloop":
        import uvloop  # type: ignore[import-untyped, import-not-found, unused-ignore]

        result: Result = uvloop.run(main)
    else:
        result = asyncio.run(main)
    result.stack = stack
    return result
