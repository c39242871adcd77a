"""Tutorial: from one connection to a pool; commit on success, roll back on error."""

import sys

import trio

import triopool


async def main(dsn: str) -> None:
    async with triopool.open_pool(dsn, min_size=2, max_size=10) as pool:
        async with pool.connection() as conn:
            await conn.execute("CREATE TABLE tutorial_events (kind text)")

        async with pool.connection() as conn:  # committed: the block succeeded
            await conn.execute("INSERT INTO tutorial_events (kind) VALUES (%s)", ["started"])

        try:
            async with pool.connection() as conn:  # rolled back: the block raised
                await conn.execute("INSERT INTO tutorial_events (kind) VALUES (%s)", ["lost"])
                raise RuntimeError("something went wrong")
        except RuntimeError:
            pass

        async with pool.connection() as conn:
            cur = await conn.execute("SELECT kind FROM tutorial_events")
            print(await cur.fetchall())
            await conn.execute("DROP TABLE tutorial_events")


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
