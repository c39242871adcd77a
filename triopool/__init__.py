"""triopool: PostgreSQL connections and a connection pool for trio, on psycopg 3."""

from .connection import Connection as Connection

__all__ = ["Connection"]
