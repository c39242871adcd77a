"""How-to, web services: a Quart-Trio service on hypercorn's trio worker.

Run it with ``DATABASE_URL=postgresql://... hypercorn --worker-class trio quart_app:app``.
"""

import os

from quart import Response, jsonify, request
from quart_trio import QuartTrio

import triopool

DATABASE_URL = os.environ["DATABASE_URL"]
POOL_SIZE = int(os.environ.get("POOL_SIZE", "10"))
POOL_TIMEOUT = float(os.environ.get("POOL_TIMEOUT", "5"))
POOL_MAX_WAITING = int(os.environ.get("POOL_MAX_WAITING", "100"))

app = QuartTrio(__name__)
pool = triopool.ConnectionPool(
    DATABASE_URL,
    min_size=POOL_SIZE,
    timeout=POOL_TIMEOUT,
    max_waiting=POOL_MAX_WAITING,
)


@app.before_serving
async def open_pool() -> None:
    """The pool lives in the app's nursery, which lasts as long as the worker serves."""
    await app.nursery.start(pool.run)
    await pool.wait()


@app.after_serving
async def close_pool() -> None:
    await pool.close()


@app.errorhandler(triopool.PoolTimeout)
@app.errorhandler(triopool.TooManyRequests)
async def database_busy(error: Exception) -> Response:
    """No connection to be had in time: 503 with Retry-After (instead of a 500)."""
    response = jsonify(detail="the database is busy, try again shortly")
    response.status_code = 503
    response.headers["Retry-After"] = "1"
    return response


@app.get("/greet/<name>")
async def greet(name: str) -> dict[str, str]:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT 'Hello, ' || %s || '!'", [name])
        (greeting,) = await cur.fetchone() or ("",)
    return {"greeting": greeting}


@app.get("/report")
async def report() -> dict[str, str]:
    """A slow query (``pg_sleep`` stands in for a big report)."""
    seconds = request.args.get("seconds", 1.0, type=float)
    async with pool.connection() as conn:
        await conn.execute("SELECT pg_sleep(%s)", [seconds])
    return {"report": "done"}
