"""How-to, web services: a FastAPI service on hypercorn's trio worker.

Run it with ``DATABASE_URL=postgresql://... hypercorn --worker-class trio fastapi_app:app``.
"""

import math
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import psycopg
import trio
from fastapi import BackgroundTasks, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import triopool

# Settings from the environment.  Each hypercorn worker process has pools of its own: with
# `--workers N`, N x (POOL_SIZE + JOBS_POOL_SIZE) connections must fit the server's budget.
DATABASE_URL = os.environ["DATABASE_URL"]
POOL_SIZE = int(os.environ.get("POOL_SIZE", "10"))
POOL_TIMEOUT = float(os.environ.get("POOL_TIMEOUT", "5"))  # then 503
POOL_MAX_WAITING = int(os.environ.get("POOL_MAX_WAITING", "100"))  # more: 503 at once
JOBS_POOL_SIZE = 1
STATS_INTERVAL = float(os.environ.get("STATS_INTERVAL", "10"))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    """The worker's resources: opened before it serves, closed after its last request."""
    async with (
        triopool.open_pool(
            DATABASE_URL,
            name="requests",
            min_size=POOL_SIZE,
            timeout=POOL_TIMEOUT,
            max_waiting=POOL_MAX_WAITING,
            wait=True,  # fail the start, not the first requests, if the server is unreachable
        ) as pool,
        triopool.open_pool(DATABASE_URL, name="jobs", min_size=JOBS_POOL_SIZE) as jobs_pool,
        trio.open_nursery() as background,
    ):
        stats: dict[str, Any] = {"refreshes": 0, "visits": 0}
        background.start_soon(refresh_stats, jobs_pool, stats)
        # Each request sees these in `request.state`.
        yield {"pool": pool, "jobs_pool": jobs_pool, "stats": stats}
        background.cancel_scope.cancel()


async def connection(request: Request) -> AsyncIterator[triopool.Connection]:
    """Lend the handler a connection: committed if it returns, rolled back if it raises."""
    async with request.state.pool.connection() as conn:
        yield conn


# scope="function": the connection goes back to the pool (committed) before the response
# is sent, not after the client has read it.
Conn = Annotated[triopool.Connection, Depends(connection, scope="function")]


async def refresh_stats(jobs_pool: triopool.ConnectionPool, stats: dict[str, Any]) -> None:
    """A background job beside the requests, on a pool of its own: never queued behind them."""
    while True:
        async with jobs_pool.connection() as conn:
            cur = await conn.execute("SELECT count(*) FROM pg_stat_activity")
            (stats["server_connections"],) = await cur.fetchone() or (0,)
        stats["refreshes"] += 1
        await trio.sleep(STATS_INTERVAL)


class CancelOnDisconnect:
    """Cancel an HTTP request's handler when its client goes away before the answer.

    hypercorn only queues an ``http.disconnect`` message for the app to read; a handler
    that never reads it runs to the end, holding its pool connection.  Here a task reads
    the messages for the handler and cancels it on ``http.disconnect``: triopool then
    cancels the running query on the server and the connection goes back to the pool.
    Once the response is sent the task stops: what runs after it (background tasks) runs
    to the end even if the client then closes its connection.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        messages_in, messages_out = trio.open_memory_channel[Message](math.inf)
        watching = trio.CancelScope()

        async def watch(handler: trio.CancelScope) -> None:
            with watching:
                while (message := await receive())["type"] != "http.disconnect":
                    messages_in.send_nowait(message)
                handler.cancel()

        async def send_watched(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                watching.cancel()  # the answer's end: from now on the client may leave
            await send(message)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, nursery.cancel_scope)
            await self.app(scope, messages_out.receive, send_watched)
            watching.cancel()


app = FastAPI(lifespan=lifespan)
app.add_middleware(CancelOnDisconnect)


@app.exception_handler(triopool.PoolTimeout)
@app.exception_handler(triopool.TooManyRequests)
async def database_busy(request: Request, error: psycopg.OperationalError) -> JSONResponse:
    """No connection to be had in time: 503 with Retry-After (instead of a 500)."""
    return JSONResponse(
        {"detail": "the database is busy, try again shortly"},
        status_code=503,
        headers={"Retry-After": "1"},
    )


@app.get("/greet/{name}")
async def greet(name: str, conn: Conn) -> dict[str, str]:
    cur = await conn.execute("SELECT 'Hello, ' || %s || '!'", [name])
    (greeting,) = await cur.fetchone() or ("",)
    return {"greeting": greeting}


@app.get("/report")
async def report(conn: Conn, seconds: float = 1.0) -> dict[str, str]:
    """A slow query (``pg_sleep`` stands in for a big report)."""
    await conn.execute("SELECT pg_sleep(%s)", [seconds])
    return {"report": "done"}


@app.post("/visits")
async def visit(request: Request, tasks: BackgroundTasks) -> dict[str, str]:
    """Answer at once, and record the visit after the response (a background task)."""
    tasks.add_task(record_visit, request.state.jobs_pool, request.state.stats)
    return {"visit": "welcome"}


async def record_visit(jobs_pool: triopool.ConnectionPool, stats: dict[str, Any]) -> None:
    async with jobs_pool.connection() as conn:
        await conn.execute("SELECT pg_sleep(0.2)")  # stands in for a slow write
    stats["visits"] += 1


@app.get("/stats")
async def server_stats(request: Request) -> dict[str, Any]:
    """What the background job found last (no connection needed)."""
    return dict(request.state.stats)
