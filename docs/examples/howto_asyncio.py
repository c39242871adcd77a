"""How-to, asyncio interop: an asyncio-only library borrows the trio pool's connections."""

import sys

import psycopg
import trio
import trio_asyncio

import triopool
import triopool.aio


async def asyncio_library(apool: triopool.aio.AsyncioPool) -> None:
    """Plain asyncio code: it gets stock `psycopg.AsyncConnection` objects."""
    async with apool.connection() as conn:
        print("a psycopg AsyncConnection:", isinstance(conn, psycopg.AsyncConnection))
        cur = await conn.execute("SELECT %s::int * 3", [14])
        print(await cur.fetchone())


async def main(dsn: str) -> None:
    async with (
        trio_asyncio.open_loop(),
        triopool.open_pool(dsn, max_size=10) as pool,
    ):
        apool = triopool.aio.AsyncioPool(pool)
        await trio_asyncio.aio_as_trio(asyncio_library)(apool)
        print("served by the trio pool:", pool.get_stats()["requests_num"])


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
