"""How-to, sizing: watch a pool grow under a burst, shed load, and resize it."""

import sys

import trio

import triopool


async def burst(pool: triopool.ConnectionPool, requests: int) -> None:
    """`requests` clients at once, each holding a connection for 50 ms."""

    async def request() -> None:
        async with pool.connection() as conn:
            await conn.execute("SELECT pg_sleep(0.05)")

    async with trio.open_nursery() as nursery:
        for _ in range(requests):
            nursery.start_soon(request)


async def main(dsn: str) -> None:
    async with triopool.open_pool(dsn, min_size=2, max_size=4, wait=True) as pool:
        print(pool.status())
        await burst(pool, 12)
        stats = pool.pop_stats()
        print("requests:", stats["requests_num"], "queued:", stats["requests_queued"])
        print("grew to:", pool.status().size)  # up to max_size while clients waited

        await pool.resize(min_size=1, max_size=2)  # idle connections above max close now
        print("after resize:", pool.min_size, pool.max_size)

    # Load shedding: with max_waiting=1, of three clients arriving together for one
    # connection, one is served, one waits its turn and one fails at once.
    async with triopool.open_pool(dsn, min_size=1, max_waiting=1, wait=True) as pool:
        outcomes: list[str] = []

        async def client() -> None:
            try:
                async with pool.connection() as conn:
                    await conn.execute("SELECT 1")
                outcomes.append("served")
            except triopool.TooManyRequests:
                outcomes.append("refused")

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(client)
        print(sorted(outcomes))


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
