"""The application code under test."""

import triopool


async def database_version(pool: triopool.ConnectionPool) -> int | None:
    """For a health check: the server's major version, or None if the pool is too busy to
    lend a connection within 2 s."""
    try:
        async with pool.connection(timeout=2) as conn:
            cur = await conn.execute("SELECT current_setting('server_version_num')::int / 10000")
            row = await cur.fetchone()
            return row[0] if row else None
    except triopool.PoolTimeout:
        return None
