"""The pool's exceptions.

All are subclasses of `psycopg.OperationalError`, so code written for psycopg
(``except psycopg.OperationalError``) keeps working.
"""

from __future__ import annotations

import psycopg

__all__ = ["PoolClosed", "PoolTimeout", "TooManyRequests"]


class PoolTimeout(psycopg.OperationalError):
    """No connection could be obtained in time.

    Raised by `ConnectionPool.getconn`/`ConnectionPool.connection` when the
    request's timeout expires, and by `ConnectionPool.wait` when ``min_size``
    connections are not ready in time.  When connection attempts were failing,
    the last connection error is the ``__cause__``.
    """

    __module__ = "triopool"


class PoolClosed(psycopg.OperationalError):
    """The pool is closed (or was closed while the request waited)."""

    __module__ = "triopool"


class TooManyRequests(psycopg.OperationalError):
    """``max_waiting`` clients are already waiting for a connection."""

    __module__ = "triopool"
