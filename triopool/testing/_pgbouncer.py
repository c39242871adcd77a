"""A throwaway PgBouncer in front of a PostgreSQL server.

``with PgBouncer("127.0.0.1", server.port) as bouncer:`` writes an ini file and
a trust ``auth_file`` in a folder of its own, starts ``pgbouncer`` in the
foreground on a free 127.0.0.1 port (as an unprivileged user when run as
root: PgBouncer refuses to run as root), and removes everything at the end.
Clients connect with `PgBouncer.conninfo`; the admin console answers
`PgBouncer.admin`.

Every method is synchronous and blocks; call them through
`trio.to_thread.run_sync` from trio code.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Literal

import psycopg

from ._server import PIDFILE_NAME, ServerUnavailable, _LocalService, _make_owned_dir

__all__ = ["PgBouncer", "find_pgbouncer"]

BINARY_ENV = "TRIOPOOL_PGBOUNCER"
STOP_TIMEOUT = 5.0
_SEARCHED = ("/usr/sbin", "/usr/local/sbin", "/usr/local/bin", "/opt/homebrew/bin")

PoolMode = Literal["session", "transaction", "statement"]


def find_pgbouncer() -> Path:
    """The ``pgbouncer`` executable.

    Searched in order: ``$TRIOPOOL_PGBOUNCER`` (when set, the only place
    looked at), ``pgbouncer`` on ``PATH``, then ``/usr/sbin``,
    ``/usr/local/sbin``, ``/usr/local/bin`` and ``/opt/homebrew/bin``.

    Raises:
        ServerUnavailable: not found (the message says where it looked).
    """
    override = os.environ.get(BINARY_ENV)
    if override:
        if os.access(override, os.X_OK):
            return Path(override)
        raise ServerUnavailable(f"${BINARY_ENV}={override} is not an executable pgbouncer")
    on_path = shutil.which("pgbouncer")
    if on_path:
        return Path(on_path)
    for folder in _SEARCHED:
        candidate = Path(folder) / "pgbouncer"
        if os.access(candidate, os.X_OK):
            return candidate
    raise ServerUnavailable(
        "pgbouncer not found on PATH nor in " + ", ".join(_SEARCHED) + ": install it"
        f" (Debian/Ubuntu: apt-get install pgbouncer) or set {BINARY_ENV} to its path"
    )


def _quote(value: str) -> str:
    """A value for a PgBouncer connection string (single quotes, backslash escapes)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class PgBouncer(_LocalService):
    """PgBouncer on a free 127.0.0.1 port, forwarding to `server_host`:`server_port`.

    Clients log in as `user` with no password (``auth_type = trust``); every
    database name is forwarded to the server (``* =``), which PgBouncer logs
    into as `user` (with `password`, if given).  The admin console
    (database ``pgbouncer``) is open to `user`.

    Args:
        server_host: the PostgreSQL server's address.
        server_port: its port.
        pool_mode: PgBouncer's ``pool_mode``.
        default_pool_size: most server connections per database and user.
        user: the user clients log in as, and PgBouncer logs into the server as.
        password: the server's password for `user` (None: the server trusts it).
        dbname: the database `conninfo` names by default.
        settings: more ``[pgbouncer]`` settings (strings, as in the ini file).
        binary: the ``pgbouncer`` executable (default: `find_pgbouncer`).
    """

    _name = "PgBouncer"
    _logname = "pgbouncer.log"

    def __init__(
        self,
        server_host: str,
        server_port: int,
        *,
        pool_mode: PoolMode = "transaction",
        default_pool_size: int = 20,
        user: str = "postgres",
        password: str | None = None,
        dbname: str = "postgres",
        settings: Mapping[str, str] | None = None,
        binary: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        self.server_host = server_host
        self.server_port = server_port
        self.user = user
        self.dbname = dbname
        self._password = password
        self._binary = Path(binary) if binary is not None else None
        self._settings = {
            "pool_mode": pool_mode,
            "default_pool_size": str(default_pool_size),
            "max_client_conn": "500",
            # Fail fast after the server comes back (default: 15 s of refusals).
            "server_login_retry": "0.1",
            **(settings or {}),
        }

    # -- places ---------------------------------------------------------------

    @property
    def binary(self) -> Path:
        if self._binary is None:
            self._binary = find_pgbouncer()
        return self._binary

    @property
    def dsn(self) -> str:
        """``postgresql://USER@127.0.0.1:PORT/DBNAME``."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.dbname}"

    def conninfo(self, **overrides: object) -> str:
        """A key=value conninfo through PgBouncer, with `overrides` applied."""
        return self._conninfo(self.user, self.dbname, overrides)

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        """Start PgBouncer; return once its admin console answers.

        The first start picks a free port (retrying if another process takes
        it first); later starts reuse it.

        Raises:
            ServerUnavailable: no ``pgbouncer`` executable.
            RuntimeError: it did not start (with its log's end).
        """
        super().start()

    def stop(self) -> None:
        """Stop PgBouncer at once (SIGTERM: every client and server connection is closed).

        Falls back to SIGKILL if it has not exited within a few seconds.
        (SIGINT's "safe shutdown" waits for clients' transactions, without limit.)
        """
        process = self._process
        self._process = None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def restart(self) -> None:
        """Stop, then start again on the same port."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stop PgBouncer and delete its files.  Idempotent."""
        self.stop()
        self._remove_basedir()

    # -- the admin console --------------------------------------------------------

    def admin(self, command: str) -> list[dict[str, object]]:
        """Run an admin console command (``SHOW POOLS``, ``RECONNECT``...); return its rows."""
        # A bounded connect: while starting, the port may belong to another process
        # that accepts and never answers (PgBouncer is then exiting: port taken).
        conninfo = self.conninfo(dbname="pgbouncer", connect_timeout=2)
        with psycopg.connect(conninfo, autocommit=True) as conn:
            cur = conn.execute(command)  # no parameters: the simple query protocol
            if cur.description is None:
                return []
            names = [column.name for column in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def server_connections(self) -> int:
        """Server connections PgBouncer has open now (``SHOW SERVERS``)."""
        return len(self.admin("SHOW SERVERS"))

    # -- internals ------------------------------------------------------------------

    def _prepare(self) -> None:
        """Create the folder and the log file, once ``pgbouncer`` is found."""
        self._binary = self.binary  # ServerUnavailable now, before anything is created
        self._base = _make_owned_dir(self._user)
        self.logfile.touch()

    def _command(self) -> list[str]:
        self._write_config()
        return [str(self.binary), str(self.basedir / "pgbouncer.ini")]

    def _write_config(self) -> None:
        target = f"host={self.server_host} port={self.server_port} user={self.user}"
        if self._password is not None:
            target += f" password={_quote(self._password)}"
        lines = ["[databases]", f"* = {target}", "", "[pgbouncer]"]
        settings = {
            "listen_addr": self.host,
            "listen_port": str(self.port),
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": str(self.basedir / "userlist.txt"),
            "admin_users": self.user,
            **self._settings,
        }
        lines += [f"{key} = {value}" for key, value in settings.items()]
        (self.basedir / "pgbouncer.ini").write_text("\n".join(lines) + "\n")
        (self.basedir / "userlist.txt").write_text(f'"{self.user}" ""\n')
        for name in ("pgbouncer.ini", "userlist.txt", "pgbouncer.log"):
            os.chmod(self.basedir / name, 0o644)
            if self._user is not None:
                os.chown(self.basedir / name, self._user.pw_uid, self._user.pw_gid)

    def _spawn(self, args: list[str], log: IO[bytes]) -> subprocess.Popen[bytes]:
        """Also write the pid to ``process.pid``, for `reap_orphans`."""
        process = super()._spawn(args, log)
        (self.basedir / PIDFILE_NAME).write_text(str(process.pid))
        return process

    def _ready(self) -> bool:
        try:
            self.admin("SHOW VERSION")
        except psycopg.OperationalError:
            return False
        return True

    def _abort(self) -> None:
        self.stop()
