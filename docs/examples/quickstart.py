"""The front page's example: a pool, a connection, a query."""

import sys

import trio

import triopool


async def main(dsn: str) -> None:
    async with triopool.open_pool(dsn, max_size=10) as pool, pool.connection() as conn:
        cur = await conn.execute("SELECT %s::int * 2", [21])
        print(await cur.fetchone())


if __name__ == "__main__":
    trio.run(main, sys.argv[1])  # e.g. postgresql://user@localhost/app
