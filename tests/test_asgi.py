"""The web how-to's apps (``docs/examples/asgi/``), served as users serve them.

Each app runs under ``hypercorn --worker-class trio`` in a subprocess, on a socket this test
made (``--bind fd://N``: no port race), against the suite's server; the tests talk HTTP to
it and watch its backends on the server by their ``application_name``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest
import trio
from _pool_checks import Server, app_name, settled_backends

APPS_DIR = Path(__file__).resolve().parent.parent / "docs" / "examples" / "asgi"
APPS = ["fastapi_app", "quart_app"]
#: Connections each app's worker holds besides its request pool (FastAPI's jobs pool).
EXTRA_CONNECTIONS = {"fastapi_app": 1, "quart_app": 0}
#: The pool settings the apps read from the environment, small enough to exhaust.
SETTINGS = {"POOL_SIZE": "2", "POOL_TIMEOUT": "1", "POOL_MAX_WAITING": "2"}
START_TIMEOUT = 30.0
#: A query that runs until it is cancelled (or 30 s).
SLOW = "/report?seconds=30"


@dataclass
class Service:
    """An app served by hypercorn in a subprocess, with pools named `name` on the server."""

    app: str
    process: subprocess.Popen[bytes]
    port: int
    name: str
    server: Server
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(base_url=self.url, timeout=START_TIMEOUT)

    def stop(self) -> int:
        """SIGTERM, as a process manager stops it; its exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(START_TIMEOUT)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Kill it if it still runs (a failed test)."""
        self.process.kill()
        self.process.wait()


def serve(app: str, server: Server, log: Path, workers: int = 1) -> Service:
    """Start `app` under hypercorn's trio worker; return once it answers HTTP."""
    name = app_name("asgi")
    env = {
        **os.environ,
        **SETTINGS,
        "PYTHONPATH": str(APPS_DIR),
        "DATABASE_URL": server.conninfo(application_name=name),
        "STATS_INTERVAL": "0.05",
    }
    with socket.socket() as listener, open(log, "wb") as out:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)  # connections wait in the backlog until a worker serves them
        command = [sys.executable, "-m", "hypercorn", "--worker-class", "trio"]
        command += ["--workers", str(workers), "--bind", f"fd://{listener.fileno()}", f"{app}:app"]
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, pass_fds=[listener.fileno()]
        )
        service = Service(app, process, listener.getsockname()[1], name, server, log)
    deadline = time.monotonic() + START_TIMEOUT
    while process.poll() is None and time.monotonic() < deadline:
        try:
            httpx2.get(f"{service.url}/greet/ready", timeout=1).raise_for_status()
            return service
        except httpx2.TimeoutException:
            continue
    with service:
        raise AssertionError(f"{app} did not start:\n{log.read_text()}")


@pytest.fixture(scope="module", params=APPS)
def service(
    request: pytest.FixtureRequest,
    postgres_server: Server,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Service]:
    """One app served for this module's tests; stopped afterwards."""
    log = tmp_path_factory.mktemp("asgi") / "hypercorn.log"
    with serve(request.param, postgres_server, log) as running:
        yield running
        running.stop()


async def active_queries(service: Service) -> list[int]:
    """The pids of `service`'s backends running its slow query now."""
    rows = await trio.to_thread.run_sync(
        service.server.execute,
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND state = 'active'"
        " AND query LIKE 'SELECT pg_sleep%%'",
        (service.name,),
    )
    return sorted(int(str(row[0])) for row in rows)


async def until_active(service: Service, count: int) -> list[int]:
    """Wait (bounded) until `count` slow queries of `service` run on the server."""
    with trio.fail_after(10):
        while len(pids := await active_queries(service)) != count:  # noqa: ASYNC110  # server-side state: no event to wait on
            await trio.sleep(0.02)
    return pids


@asynccontextmanager
async def slow_request(service: Service) -> AsyncIterator[None]:
    """A slow request in flight; its client goes away (closes the connection) at the end."""
    async with await trio.open_tcp_stream("127.0.0.1", service.port) as stream:
        await stream.send_all(f"GET {SLOW} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        yield


def test_every_web_example_is_served_here() -> None:
    """The how-to shows only apps these tests serve."""
    assert sorted(path.stem for path in APPS_DIR.glob("*.py")) == APPS


async def test_concurrent_requests(service: Service) -> None:
    """Requests at once, more than the pool's connections: each gets its own answer."""
    names = [f"client{i}" for i in range(4)]  # 2 served at once, 2 waiting (max_waiting)
    answers: dict[str, httpx2.Response] = {}
    async with service.client() as client:

        async def greet(name: str) -> None:
            answers[name] = await client.get(f"/greet/{name}")

        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(greet, name)
    assert {name: (r.status_code, r.json()) for name, r in answers.items()} == {
        name: (200, {"greeting": f"Hello, {name}!"}) for name in names
    }


async def test_busy_pool_answers_503(service: Service) -> None:
    """Every connection held: requests that time out in the queue (PoolTimeout) and those
    beyond ``max_waiting`` (TooManyRequests) get 503 with Retry-After, in JSON."""
    async with slow_request(service), slow_request(service):
        await until_active(service, 2)
        answers: list[httpx2.Response] = []
        async with service.client() as client:

            async def greet() -> None:
                answers.append(await client.get("/greet/late"))

            started = trio.current_time()
            async with trio.open_nursery() as nursery:
                for _ in range(3):  # 2 wait and time out, 1 is refused at once
                    nursery.start_soon(greet)
            assert trio.current_time() - started >= float(SETTINGS["POOL_TIMEOUT"])
    for answer in answers:
        assert answer.status_code == 503
        assert answer.headers["Retry-After"] == "1"
        assert answer.json() == {"detail": "the database is busy, try again shortly"}
    await until_active(service, 0)


async def test_client_disconnect_cancels_the_query(service: Service) -> None:
    """A client that goes away mid-query: its query is cancelled on the server (the backend
    stays, idle: the connection went back to the pool) and the pool serves again."""
    async with slow_request(service):
        (pid,) = await until_active(service, 1)
    await until_active(service, 0)
    backends = await trio.to_thread.run_sync(
        service.server.execute,
        "SELECT state FROM pg_stat_activity WHERE pid = %s",
        (pid,),
    )
    assert backends == [("idle",)]
    async with service.client() as client:
        assert (await client.get("/greet/again")).json() == {"greeting": "Hello, again!"}


@pytest.mark.parametrize("service", ["fastapi_app"], indirect=True)
async def test_background_job_beside_requests(service: Service) -> None:
    """FastAPI's background job has a pool of its own: it goes on refreshing while every
    request connection is held."""
    async with slow_request(service), slow_request(service), service.client() as client:
        await until_active(service, 2)
        before = (await client.get("/stats")).json()
        with trio.fail_after(10):
            while (now := (await client.get("/stats")).json())["refreshes"] <= before["refreshes"]:  # noqa: ASYNC110  # another process's state
                await trio.sleep(0.02)
    assert now["server_connections"] > 0
    await until_active(service, 0)


@pytest.mark.parametrize("service", ["fastapi_app"], indirect=True)
async def test_work_after_the_response_outlives_the_client(service: Service) -> None:
    """A FastAPI background task (run after the response) goes on when the client closes its
    connection once answered: only a client that leaves before its answer cancels."""
    async with service.client() as client:
        before = (await client.get("/stats")).json()["visits"]
    async with await trio.open_tcp_stream("127.0.0.1", service.port) as stream:
        await stream.send_all(b"POST /visits HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n")
        answer = b""
        while not answer.endswith(b'{"visit":"welcome"}'):
            answer += await stream.receive_some()
    async with service.client() as client:
        with trio.fail_after(10):
            while (await client.get("/stats")).json()["visits"] == before:  # noqa: ASYNC110  # another process's state
                await trio.sleep(0.02)


@pytest.mark.parametrize("app", APPS)
async def test_workers_then_sigterm(app: str, postgres_server: Server, tmp_path: Path) -> None:
    """``--workers 2``: two processes, each with its pools (the server sees both); SIGTERM
    stops the service cleanly, and no backend is left."""
    service = await trio.to_thread.run_sync(serve, app, postgres_server, tmp_path / "log", 2)
    per_worker = int(SETTINGS["POOL_SIZE"]) + EXTRA_CONNECTIONS[app]
    with service:
        connections = await settled_backends(postgres_server, service.name, 2 * per_worker, 10)
        assert connections == 2 * per_worker
        assert await trio.to_thread.run_sync(service.stop) == 0, service.log.read_text()
    assert await settled_backends(postgres_server, service.name, 0) == 0
