"""Developer tooling: the demo, the benchmark, an embedded PostgreSQL and a latency proxy.

The library never imports this package (``tests/test_layout.py`` checks it). It is reached
through ``python -m async_prefetch demo`` and ``python -m async_prefetch bench``, the test
suite and the examples.
"""
