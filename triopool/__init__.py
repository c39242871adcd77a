"""triopool: PostgreSQL for trio -- psycopg 3 connections and a connection pool.

`Connection` is psycopg's `~psycopg.AsyncConnection` running natively under
`trio.run`; `ConnectionPool` (opened with `open_pool`) lends such connections
to trio tasks; `NullConnectionPool` opens one per request.
"""

from .connection import Connection as Connection
from .errors import PoolClosed as PoolClosed
from .errors import PoolTimeout as PoolTimeout
from .errors import TooManyRequests as TooManyRequests
from .listener import ListenerGap as ListenerGap
from .listener import Notifications as Notifications
from .pool import ConnectionPool as ConnectionPool
from .pool import NullConnectionPool as NullConnectionPool
from .pool import open_pool as open_pool
from .stats import Holder as Holder
from .stats import PoolStatus as PoolStatus

__all__ = [
    "Connection",
    "ConnectionPool",
    "Holder",
    "ListenerGap",
    "Notifications",
    "NullConnectionPool",
    "PoolClosed",
    "PoolStatus",
    "PoolTimeout",
    "TooManyRequests",
    "open_pool",
]
