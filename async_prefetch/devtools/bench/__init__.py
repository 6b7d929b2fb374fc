"""The benchmark: a Django app (label ``async_prefetch_bench``) with its schema,
:mod:`.workloads`, and :mod:`.runner` for ``python -m async_prefetch bench``."""
