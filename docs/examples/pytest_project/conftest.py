# The fixtures: postgres_server, postgres_dsn, private_server, tcp_proxy.
pytest_plugins = ["triopool.testing.pytest_plugin"]
