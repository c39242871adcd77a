"""Tutorial: a pool in a web service's nursery (a tiny HTTP server on trio)."""

import sys
from functools import partial

import trio

import triopool


async def handle(pool: triopool.ConnectionPool, stream: trio.SocketStream) -> None:
    """Answer one HTTP request: ``GET /NAME`` gets ``Hello, NAME!`` from the database."""
    request = b""
    while b"\r\n\r\n" not in request and len(request) < 8192:
        if not (data := await stream.receive_some()):
            return
        request += data
    path = request.split(b" ", 2)[1].decode()
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT 'Hello, ' || %s || '!'", [path.lstrip("/")])
        (greeting,) = await cur.fetchone() or ("",)
    body = greeting.encode()
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    await stream.send_all(head.encode() + body)


async def serve(
    dsn: str,
    port: int,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the service: the pool and the listeners live in one nursery."""
    pool = triopool.ConnectionPool(dsn, min_size=2, max_size=10)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)  # the pool is open once this returns
        listeners = await nursery.start(
            partial(trio.serve_tcp, partial(handle, pool), port, host="127.0.0.1")
        )
        task_status.started(listeners)


async def get(port: int, path: str) -> bytes:
    """A minimal HTTP client: the response body."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        response = b""
        while data := await stream.receive_some():
            response += data
    return response.split(b"\r\n\r\n", 1)[1]


async def main(dsn: str) -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve, dsn, 0)  # port 0: any free port
        port = listeners[0].socket.getsockname()[1]
        bodies: dict[str, bytes] = {}

        async def fetch(name: str) -> None:
            bodies[name] = await get(port, "/" + name)

        async with trio.open_nursery() as clients:  # three requests at once
            for name in ["trio", "psycopg", "postgres"]:
                clients.start_soon(fetch, name)
        for name in sorted(bodies):
            print(bodies[name].decode())
        nursery.cancel_scope.cancel()  # stop the service: the pool closes with it


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
