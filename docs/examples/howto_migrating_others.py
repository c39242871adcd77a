"""How-to, migrating from psqlpy, asyncpg or triopg: the same calls, psycopg's placeholders."""

import sys

import trio
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

import triopool


async def clean(conn: triopool.Connection) -> None:
    """Session clean-up when a connection comes back (asyncpg's default reset, psqlpy's
    ``ConnRecyclingMethod.Clean``)."""
    await conn.execute("CLOSE ALL")
    await conn.execute("RESET ALL")
    await conn.execute("UNLISTEN *")
    await conn.execute("SELECT pg_advisory_unlock_all()")
    await conn.commit()


async def main(dsn: str) -> None:
    server = conninfo_to_dict(dsn)
    # psqlpy: ConnectionPool(username=..., db_name=..., hosts=[...], ports=[...],
    #     connect_timeout_sec=10, tcp_user_timeout_sec=30, keepalives_idle_sec=60,
    #     ssl_mode=SslMode.Prefer, max_db_pool_size=10,
    #     conn_recycling_method=ConnRecyclingMethod.Verified)
    kwargs = {
        "user": server["user"],  # username
        "dbname": server["dbname"],  # db_name
        "host": server["host"],  # hosts=[a, b]: "a,b"
        "port": server["port"],  # ports=[5432, 5433]: "5432,5433"
        "connect_timeout": 10,  # connect_timeout_sec
        "tcp_user_timeout": 30_000,  # tcp_user_timeout_sec, in milliseconds here
        "keepalives": 1,
        "keepalives_idle": 60,  # keepalives_idle_sec
        "sslmode": "prefer",  # ssl_mode; ca_file: "sslrootcert"
        "application_name": server.get("application_name", "app"),
        "row_factory": dict_row,  # psqlpy's result() and asyncpg's Record: by name
    }
    async with triopool.open_pool(
        min_size=0,  # psqlpy opens connections on demand
        max_size=10,  # max_db_pool_size
        kwargs=kwargs,
        check=triopool.ConnectionPool.check_connection,  # ConnRecyclingMethod.Verified
        reset=clean,  # asyncpg's default reset=, ConnRecyclingMethod.Clean
    ) as pool:
        # asyncpg / triopg: await pool.fetch("SELECT $1::int AS n", 7): psycopg takes %s
        # placeholders and the parameters as one sequence.
        print(await pool.fetch("SELECT %s::int AS n, %s::text AS s", [7, "seven"]))
        print(await pool.fetchrow("SELECT %(n)s::int AS n", {"n": 8}))  # or by name
        print(await pool.fetchval("SELECT 9"))  # psqlpy: fetch_val
        # asyncpg's execute returns a status string ("SELECT 1"); here, the rowcount.
        print(await pool.execute("SELECT generate_series(1, 3)"))
        # asyncpg: async with pool.acquire() as conn: ...  (triopool: connection() too)
        async with pool.acquire() as conn:
            cur = await conn.execute("SELECT 'borrowed' AS how")
            print(await cur.fetchone())


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
