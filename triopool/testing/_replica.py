"""A throwaway streaming replica of a throwaway primary, for failover tests.

``with throwaway_standby(primary) as standby:`` copies a running
`PostgresServer` with ``pg_basebackup -R`` and starts the copy as a hot
standby on a port of its own, streaming from the primary.  `promote` turns it
into a primary.  `multi_host_conninfo` names both in one conninfo, as libpq's
``target_session_attrs`` and ``load_balance_hosts`` expect.

Every method is synchronous and blocks; call them through
`trio.to_thread.run_sync` from trio code.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping

import psycopg

from ._server import PostgresServer

__all__ = ["StandbyServer", "multi_host_conninfo", "throwaway_standby"]

STREAMING_TIMEOUT = 30.0


class StandbyServer(PostgresServer):
    """A hot standby of `primary` (which must be running), with trust auth.

    ``start()`` takes a base backup of the primary the first time (the
    primary's cluster allows replication connections: ``wal_level=replica``,
    ``max_wal_senders``, and ``initdb``'s trust lines for replication in
    ``pg_hba.conf``), then starts the copy.  Everything else is
    `PostgresServer`'s: faults, ``execute``, ``cleanup``.

    Args:
        primary: the running server to replicate.
        settings: extra ``postgres -c`` settings for the standby.
    """

    def __init__(self, primary: PostgresServer, *, settings: Mapping[str, str] | None = None):
        super().__init__(bindir=primary.bindir, settings=settings)
        self.primary = primary

    def _prepare(self) -> None:
        """Create the folder and fill it with a base backup of the primary."""
        self._make_basedir()
        primary = self.primary
        backup = [str(self.bindir / "pg_basebackup"), "-h", str(primary.sockdir)]
        backup += ["-p", str(primary.port), "-U", "postgres", "-D", str(self.datadir)]
        backup += ["-R", "-X", "stream", "-c", "fast", "--no-sync"]
        with open(self.logfile, "ab") as log:
            process = self._spawn(backup, log)
        if process.wait() != 0:
            raise RuntimeError(f"pg_basebackup failed:\n{self._log_tail(0)}")

    def in_recovery(self) -> bool:
        """Is the server still a standby (``pg_is_in_recovery()``)?"""
        return bool(self.execute("SELECT pg_is_in_recovery()")[0][0])

    def wait_streaming(self, timeout: float = STREAMING_TIMEOUT) -> None:
        """Return once the standby streams WAL from the primary.

        Raises:
            RuntimeError: not streaming after `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        status: object = None
        while time.monotonic() < deadline:
            rows = self.execute("SELECT status FROM pg_stat_wal_receiver")
            status = rows[0][0] if rows else None
            if status == "streaming":
                return
            time.sleep(0.02)
        raise RuntimeError(
            f"the standby is not streaming after {timeout} s (status {status!r}):\n"
            f"{self._log_tail(0)}"
        )

    def wait_replayed(self, timeout: float = STREAMING_TIMEOUT) -> None:
        """Return once the standby has replayed everything the primary has written so far."""
        target = str(self.primary.execute("SELECT pg_current_wal_lsn()")[0][0])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,))
            if rows[0][0]:
                return
            time.sleep(0.02)
        raise RuntimeError(f"the standby has not replayed up to {target} after {timeout} s")

    def promote(self, timeout: int = 60) -> None:
        """Make the standby a primary; return once it accepts writes.

        Raises:
            RuntimeError: not promoted within `timeout` seconds.
        """
        if not self.execute("SELECT pg_promote(true, %s)", (timeout,))[0][0]:
            raise RuntimeError(f"the standby was not promoted within {timeout} s")


def multi_host_conninfo(*servers: PostgresServer, **params: object) -> str:
    """One conninfo naming every server in order: ``host=H1,H2 port=P1,P2 ...``.

    `params` are added (e.g. ``target_session_attrs="read-write"``).
    """
    if not servers:
        raise ValueError("multi_host_conninfo() needs at least one server")
    return psycopg.conninfo.make_conninfo(
        "",
        host=",".join(server.host for server in servers),
        port=",".join(str(server.port) for server in servers),
        user="postgres",
        dbname="postgres",
        **params,  # type: ignore[arg-type]
    )


@contextlib.contextmanager
def throwaway_standby(
    primary: PostgresServer, *, settings: Mapping[str, str] | None = None
) -> Iterator[StandbyServer]:
    """``with throwaway_standby(primary) as standby:`` -- a streaming standby, removed after."""
    standby = StandbyServer(primary, settings=settings)
    try:
        standby.start()
        standby.wait_streaming()
        yield standby
    finally:
        standby.cleanup()
