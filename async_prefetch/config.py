"""The ``ASYNC_PREFETCH`` setting, read once per use with defaults filled in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


@dataclass(frozen=True)
class PoolConfig:
    """Arguments for each alias's ``psycopg_pool.AsyncConnectionPool``."""

    min_size: int = 2
    max_size: int = 10
    timeout: float = 30.0
    max_idle: float = 300.0
    max_lifetime: float = 3600.0
    check: bool = False  # a round trip per checkout: off by default


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine reads from settings."""

    pool: PoolConfig
    max_concurrency: int
    install: bool
    chunk_size: int | None = 5000  # parent keys per query; None: one query per level


_POOL_KEYS = {"MIN_SIZE", "MAX_SIZE", "TIMEOUT", "MAX_IDLE", "MAX_LIFETIME", "CHECK"}
_TOP_KEYS = {"POOL", "MAX_CONCURRENCY", "INSTALL", "CHUNK_SIZE"}


def _upper_keys(value: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ImproperlyConfigured(f"{where} must be a dict, not {type(value).__name__}.")
    normalised = {str(key).upper(): item for key, item in value.items()}
    unknown = set(normalised) - allowed
    if unknown:
        raise ImproperlyConfigured(
            f"{where} has unknown keys {sorted(unknown)}; expected some of {sorted(allowed)}."
        )
    return normalised


def load_config() -> EngineConfig:
    """Read ``settings.ASYNC_PREFETCH``; raise ``ImproperlyConfigured`` on bad values.

    Keys are case-insensitive: ``{"POOL": {"min_size": 2, "max_size": 10, "timeout": 30,
    "max_idle": 300, "max_lifetime": 3600, "check": False}, "MAX_CONCURRENCY": 10,
    "INSTALL": False, "CHUNK_SIZE": 5000}``.
    """
    raw = _upper_keys(getattr(settings, "ASYNC_PREFETCH", {}), "ASYNC_PREFETCH", _TOP_KEYS)
    pool_raw = _upper_keys(raw.get("POOL", {}), "ASYNC_PREFETCH['POOL']", _POOL_KEYS)
    defaults = PoolConfig()
    pool = PoolConfig(
        min_size=int(pool_raw.get("MIN_SIZE", defaults.min_size)),
        max_size=int(pool_raw.get("MAX_SIZE", defaults.max_size)),
        timeout=float(pool_raw.get("TIMEOUT", defaults.timeout)),
        max_idle=float(pool_raw.get("MAX_IDLE", defaults.max_idle)),
        max_lifetime=float(pool_raw.get("MAX_LIFETIME", defaults.max_lifetime)),
        check=bool(pool_raw.get("CHECK", defaults.check)),
    )
    if not 0 <= pool.min_size <= pool.max_size or pool.max_size < 1:
        raise ImproperlyConfigured(
            "ASYNC_PREFETCH['POOL'] needs 0 <= MIN_SIZE <= MAX_SIZE and MAX_SIZE >= 1."
        )
    max_concurrency = int(raw.get("MAX_CONCURRENCY", pool.max_size))
    if max_concurrency < 1:
        raise ImproperlyConfigured("ASYNC_PREFETCH['MAX_CONCURRENCY'] must be at least 1.")
    chunk_size = raw.get("CHUNK_SIZE", EngineConfig.chunk_size)
    if chunk_size is not None:
        chunk_size = int(chunk_size)
        if chunk_size < 1:
            raise ImproperlyConfigured("ASYNC_PREFETCH['CHUNK_SIZE'] must be at least 1 or None.")
    return EngineConfig(
        pool=pool,
        max_concurrency=max_concurrency,
        install=bool(raw.get("INSTALL", False)),
        chunk_size=chunk_size,
    )
