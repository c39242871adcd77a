"""How-to, one-shot statements: fetch, fetchrow, fetchval, execute and executemany on the pool."""

import sys

import psycopg
import trio
from psycopg.rows import dict_row

import triopool


async def main(dsn: str) -> None:
    async with triopool.open_pool(dsn, min_size=2, wait=True) as pool:
        # Each call is one statement and its own transaction, committed if it succeeds.
        await pool.execute("DROP TABLE IF EXISTS howto_items")
        await pool.execute("CREATE TABLE howto_items (id int PRIMARY KEY, name text)")
        inserted = await pool.executemany(
            "INSERT INTO howto_items VALUES (%s, %s)", [(1, "pen"), (2, "ink"), (3, "nib")]
        )
        print("inserted", inserted)
        print(await pool.fetch("SELECT id, name FROM howto_items ORDER BY id"))
        print(await pool.fetchrow("SELECT name FROM howto_items WHERE id = %s", [2]))
        print(await pool.fetchval("SELECT count(*) FROM howto_items"))
        print(await pool.execute("UPDATE howto_items SET name = upper(name) WHERE id < %s", [3]))

        # Many tasks at once: their statements share the connections, many per round
        # trip; a failing one raises in its own task only.
        results: dict[int, object] = {}

        async def lookup(item_id: int) -> None:
            try:
                results[item_id] = await pool.fetchval(
                    "SELECT 10 / (id - 2) FROM howto_items WHERE id = %s", [item_id]
                )
            except psycopg.errors.DivisionByZero as exc:
                results[item_id] = type(exc).__name__

        async with trio.open_nursery() as nursery:
            for item_id in (1, 2, 3):
                nursery.start_soon(lookup, item_id)
        print(sorted(results.items()))

        # executemany is all or nothing: a duplicate key inserts none of the rows.
        try:
            await pool.executemany("INSERT INTO howto_items VALUES (%s, 'x')", [[4], [1]])
        except psycopg.errors.UniqueViolation:
            print("rolled back:", await pool.fetchval("SELECT count(*) FROM howto_items"))
        await pool.execute("DROP TABLE howto_items")

    # Rows come from the connections' row factory; fetchval ignores it.
    async with triopool.open_pool(dsn, min_size=1, kwargs={"row_factory": dict_row}) as pool:
        print(await pool.fetchrow("SELECT 1 AS one, 2 AS two"))
        print(await pool.fetchval("SELECT 1 AS one, 2 AS two"))


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
