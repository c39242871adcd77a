"""Tutorial: explicit transaction blocks and savepoints, with autocommit."""

import sys

import trio

import triopool


async def main(dsn: str) -> None:
    async with await triopool.Connection.connect(dsn, autocommit=True) as conn:
        await conn.execute("CREATE TEMP TABLE t (x int)")
        async with conn.transaction():
            await conn.execute("INSERT INTO t VALUES (1), (2)")
            try:
                async with conn.transaction():  # a savepoint
                    await conn.execute("INSERT INTO t VALUES (3)")
                    raise ValueError("changed my mind")
            except ValueError:
                pass  # only the savepoint was rolled back
        cur = await conn.execute("SELECT array_agg(x ORDER BY x) FROM t")
        print(await cur.fetchone())


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
