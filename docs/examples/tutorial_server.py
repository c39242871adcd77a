"""Tutorial: a throwaway server to play with (it ignores any DSN given)."""

import trio

import triopool
from triopool.testing import PostgresServer


async def whoami(dsn: str) -> None:
    async with await triopool.Connection.connect(dsn) as conn:
        cur = await conn.execute("SELECT current_user, current_database()")
        print(await cur.fetchone())


def main() -> None:
    with PostgresServer() as server:  # initdb, start; removed when the block ends
        trio.run(whoami, server.dsn)


if __name__ == "__main__":
    main()
