"""Tutorial: one connection, one query."""

import sys

import trio

import triopool


async def main(dsn: str) -> None:
    async with await triopool.Connection.connect(dsn) as conn:
        cur = await conn.execute("SELECT %s::int + 1", [41])
        print(await cur.fetchone())


if __name__ == "__main__":
    trio.run(main, sys.argv[1])  # e.g. postgresql://postgres@127.0.0.1:5432/postgres
