"""Benchmark tooling for async_prefetch (latency injection, measurement helpers)."""
