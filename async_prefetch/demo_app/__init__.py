"""The bookstore schema used by ``python -m async_prefetch demo``."""
