"""Executors: where a compiled query's rows come from, and the one place that picks one.

``PoolExecutor`` (:mod:`.pool`) runs each query on a pooled connection of its own,
concurrently up to the call's limit. ``CallerConnectionExecutor`` (:mod:`.caller`) runs
them one at a time on the caller's own Django connection (inside ``atomic``, where only
that connection sees the transaction's rows). Further strategies (a pipeline on one
connection, read replicas) are chosen in :func:`executor_for` too.
"""

from __future__ import annotations

import anyio
from django.core.exceptions import ImproperlyConfigured
from django.db.backends.base.base import BaseDatabaseWrapper

from .base import BATCH_ROWS, Executor, RowConsumer, Rows, as_django_error
from .caller import CallerConnectionExecutor
from .pool import PoolExecutor

__all__ = [
    "BATCH_ROWS",
    "CallerConnectionExecutor",
    "Executor",
    "PoolExecutor",
    "RowConsumer",
    "Rows",
    "as_django_error",
    "executor_for",
]


def executor_for(
    alias: str,
    connection: BaseDatabaseWrapper | None,
    limiter: anyio.CapacityLimiter,
    *,
    caller_connections: bool,
) -> Executor:
    """The executor for ``alias`` in a call whose caller's connection there is
    ``connection``: that connection itself when ``caller_connections`` (inside
    ``atomic``), else the engine's pool, at most ``limiter`` queries at once.

    Raises ``ImproperlyConfigured`` for a database that is not PostgreSQL.
    """
    if connection is not None and connection.vendor != "postgresql":
        raise ImproperlyConfigured(
            f"async_prefetch cannot run queries on database {alias!r} "
            f"({connection.vendor}); only PostgreSQL is supported."
        )
    if caller_connections:
        assert connection is not None, f"no connection of the caller's for {alias!r}"
        return CallerConnectionExecutor(connection)
    return PoolExecutor(alias, limiter, connection)
