"""The demo: a bookstore Django app (label ``async_prefetch_demo``), :mod:`.bookstore` to
seed and fetch it, and :mod:`.cli` for ``python -m async_prefetch demo``."""
