"""Tutorial: a trio cancel scope cancels the query on the server."""

import sys

import trio

import triopool


async def main(dsn: str) -> None:
    async with await triopool.Connection.connect(dsn, autocommit=True) as conn:
        with trio.move_on_after(0.2) as scope:
            await conn.execute("SELECT pg_sleep(10)")  # cancelled on the server after 0.2 s
        print("gave up:", scope.cancelled_caught)
        cur = await conn.execute("SELECT 1")  # the connection is still usable
        print(await cur.fetchone())


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
