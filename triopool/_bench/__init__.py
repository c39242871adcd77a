"""Load generation and reporting behind ``triopool bench`` and ``benchmarks/``.

Private: the command line (`triopool._cli`) and the benchmark scripts are the
interfaces.  Each *stack* (triopool, psycopg_pool on asyncio, ...) runs a
*workload* with the same settings in its own process and reports a `Result`.
"""
