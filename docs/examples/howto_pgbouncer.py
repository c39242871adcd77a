"""How-to, PgBouncer in transaction mode: no automatic prepared statements."""

import sys

import trio

import triopool


async def client(pool: triopool.ConnectionPool, n: int, results: dict[int, int]) -> None:
    """The same query ten times: more often than psycopg's prepare threshold (5)."""
    results[n] = 0
    for i in range(10):
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT %s::int * %s::int", [n, i])
            (product,) = await cur.fetchone() or (0,)
            results[n] += product


async def main(dsn: str) -> None:
    # `dsn` points at PgBouncer (pool_mode = transaction), not at the server.
    async with triopool.open_pool(
        dsn,
        min_size=2,
        kwargs={"prepare_threshold": None},  # never PREPARE: PgBouncer can't keep them
    ) as pool:
        results: dict[int, int] = {}
        async with trio.open_nursery() as nursery:
            for n in range(1, 4):
                nursery.start_soon(client, pool, n, results)
        print(dict(sorted(results.items())))


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
