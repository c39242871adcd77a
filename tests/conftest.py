"""The suite runs against a throwaway PostgreSQL server (see triopool.testing)."""

pytest_plugins = ["triopool.testing.pytest_plugin"]
