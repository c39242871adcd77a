"""How-to, migrating from psycopg_pool: the same calls, opened the trio way."""

import sys

import psycopg
import trio

import triopool


async def configure(conn: triopool.Connection) -> None:
    """Run once on each new connection, as with psycopg_pool."""
    await conn.execute("SET statement_timeout TO '5s'")
    await conn.commit()


async def main(dsn: str) -> None:
    # psycopg_pool: pool = AsyncConnectionPool(dsn, min_size=2, open=False, configure=...)
    #               await pool.open(wait=True)
    async with triopool.open_pool(dsn, min_size=2, configure=configure, wait=True) as pool:
        # getconn/putconn and connection() as before.
        conn = await pool.getconn()
        try:
            cur = await conn.execute("SELECT current_setting('statement_timeout')")
            print(await cur.fetchone())
        finally:
            await pool.putconn(conn)  # never waits: safe in cleanup code

        # The exceptions are psycopg's OperationalError, as before.
        async with pool.connection(), pool.connection():  # both connections taken
            try:
                await pool.getconn(timeout=0.1)
            except psycopg.OperationalError as exc:
                print(type(exc).__name__)

        # The same stats keys.
        stats = pool.get_stats()
        print(stats["pool_min"], stats["pool_max"], stats["requests_num"])


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
