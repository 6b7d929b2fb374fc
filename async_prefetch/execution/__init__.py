"""Executors: where a compiled query's rows come from, and the one place that picks one.

``PoolExecutor`` (:mod:`.pool`) runs each query on a pooled connection of its own,
concurrently up to the call's limit. ``CallerConnectionExecutor`` (:mod:`.caller`) runs
them one at a time on the caller's own Django connection (inside ``atomic``, where only
that connection sees the transaction's rows, with ``PIPELINE: False``).
``ReplicaExecutor`` (:mod:`.replicas`) spreads an alias's queries over its read replicas'
pools (``ASYNC_PREFETCH["REPLICAS"]``).
The pipeline executors (:mod:`.pipeline`) send each stage's queries in one round trip on
one connection: ``CallerPipelineExecutor`` on the caller's own (inside ``atomic``),
``PooledPipelineExecutor`` on one pooled connection held for the call (``round_trips=1``).
``UnderLoadExecutor`` (:mod:`.under_load`) runs queries as ``PoolExecutor`` while the
pool has a connection to give each, and the rest of a stage in pipelines.
``SnapshotExecutor`` (:mod:`.snapshot`) runs a ``consistent=True`` call's queries on the
pool, every one importing the snapshot the call's first query exported.
"""

from __future__ import annotations

import psycopg
from django.core.exceptions import ImproperlyConfigured
from django.db import NotSupportedError, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.transaction import TransactionManagementError
from psycopg import IsolationLevel

from ..config import EngineConfig, load_config
from .base import (
    BATCH_ROWS,
    Executor,
    Limiter,
    RowConsumer,
    Rows,
    Scope,
    as_django_error,
    new_limiter,
)
from .caller import CallerConnectionExecutor
from .pipeline import CallerPipelineExecutor, PooledPipelineExecutor, pipeline_supported
from .pool import PoolExecutor
from .replicas import ReplicaExecutor
from .snapshot import SnapshotExecutor
from .under_load import UnderLoadExecutor

__all__ = [
    "BATCH_ROWS",
    "CallerConnectionExecutor",
    "CallerPipelineExecutor",
    "Executor",
    "Limiter",
    "PoolExecutor",
    "PooledPipelineExecutor",
    "ReplicaExecutor",
    "RowConsumer",
    "Rows",
    "Scope",
    "SnapshotExecutor",
    "UnderLoadExecutor",
    "as_django_error",
    "executor_for",
    "new_limiter",
]


def executor_for(
    alias: str,
    connection: BaseDatabaseWrapper | None,
    limiter: Limiter,
    *,
    caller_connections: bool,
    config: EngineConfig | None = None,
    consistent: bool = False,
    round_trips: int | None = None,
    scope: Scope | None = None,
    snapshot: str | None = None,
) -> Executor:
    """The executor for ``alias`` in a call whose caller's connection there is
    ``connection``; at most ``limiter`` queries at once.

    - ``caller_connections`` (inside ``atomic``): that connection itself (the primary,
      which alone sees the transaction's writes), each stage's queries in one pipeline
      unless ``config`` (default: the settings') says ``PIPELINE: False``;
    - ``consistent`` with a ``snapshot`` (exported by a transaction that stays open until
      the call ends): ``alias``'s pool, one connection per query, each importing it;
    - ``round_trips=1`` or ``PIPELINE: True``: one pooled connection of ``alias``, each
      stage in one pipeline; held for the call (until ``scope`` closes) when there is a
      ``scope``, the whole call in one ``REPEATABLE READ`` transaction when ``consistent``;
    - else ``consistent``: ``alias``'s pool, one connection per query, every query
      importing the snapshot the call's first query exports;
    - else the pools of ``alias``'s read replicas when ``config`` lists any;
    - else ``alias``'s pool, one connection per query while it has one to give each,
      the surplus of a stage in pipelines (``UnderLoadExecutor``), unless ``config``
      says ``PIPELINE: False`` or psycopg cannot pipeline (then one connection per
      query, queueing for them).

    Raises ``ImproperlyConfigured`` for a database, or a replica, that is not
    PostgreSQL; ``NotSupportedError`` for ``consistent`` without ``scope`` nor
    ``snapshot`` (a stream's prefetches on another database); and
    ``TransactionManagementError`` for ``consistent`` inside an ``atomic`` block whose
    isolation level is below ``REPEATABLE READ`` (its queries cannot share a snapshot).
    """
    _require_postgresql(alias, connection)
    if config is None:
        config = load_config()
    if caller_connections:
        assert connection is not None, f"no connection of the caller's for {alias!r}"
        if consistent:
            _require_snapshot_isolation(alias, connection)
        if config.pipeline == "never" or not _caller_can_pipeline(connection):
            return CallerConnectionExecutor(connection)
        return CallerPipelineExecutor(connection)
    if consistent and snapshot is not None:
        return SnapshotExecutor(alias, limiter, connection, snapshot=snapshot)
    if round_trips == 1 or config.pipeline == "always":
        if consistent and scope is None:
            raise _no_snapshot(alias)
        pipelined = PooledPipelineExecutor(
            alias, limiter, connection, consistent=consistent, hold=scope is not None
        )
        if scope is not None:
            scope.on_close(pipelined.aclose)
        return pipelined
    if consistent:
        if scope is None:
            raise _no_snapshot(alias)
        exporting = SnapshotExecutor(alias, limiter, connection)
        scope.on_close(exporting.aclose)
        return exporting
    replicas = config.replicas_of(alias)
    if replicas:
        for replica in replicas:
            _require_postgresql(replica, connections[replica])
        return ReplicaExecutor(alias, replicas, limiter, connection, max_lag=config.replica_max_lag)
    if config.pipeline != "never" and pipeline_supported():
        return UnderLoadExecutor(alias, limiter, connection)
    return PoolExecutor(alias, limiter, connection)


def _no_snapshot(alias: str) -> NotSupportedError:
    """A consistent call that cannot hold a snapshot of ``alias`` (no scope: a stream,
    whose snapshot is its root query's, on another database)."""
    return NotSupportedError(
        f"async_prefetch: consistent=True cannot take a snapshot of database {alias!r} here: "
        "a consistent stream's prefetches must query the stream's own database."
    )


def _caller_can_pipeline(connection: BaseDatabaseWrapper) -> bool:
    """Whether ``connection`` (Django's) runs on psycopg 3 with pipeline support (not
    psycopg2, which Django's backend may use too)."""
    return getattr(connection, "Database", None) is psycopg and pipeline_supported()


def _require_snapshot_isolation(alias: str, connection: BaseDatabaseWrapper) -> None:
    level = getattr(connection, "isolation_level", None)
    if level not in (IsolationLevel.REPEATABLE_READ, IsolationLevel.SERIALIZABLE):
        name = level.name if isinstance(level, IsolationLevel) else "READ COMMITTED"
        raise TransactionManagementError(
            f"consistent=True inside atomic() needs the transaction on database {alias!r} "
            f"to be REPEATABLE READ or SERIALIZABLE, not {name.replace('_', ' ')}: its "
            "queries cannot share one snapshot (set OPTIONS['isolation_level'], or run "
            "the call outside atomic())."
        )


def _require_postgresql(alias: str, connection: BaseDatabaseWrapper | None) -> None:
    if connection is not None and connection.vendor != "postgresql":
        raise ImproperlyConfigured(
            f"async_prefetch cannot run queries on database {alias!r} "
            f"({connection.vendor}); only PostgreSQL is supported."
        )
