"""Executors: where a compiled query's rows come from.

``PoolExecutor`` runs each query on its own pooled connection, returned to the pool
as soon as its rows are read; ``CallerConnectionExecutor`` runs them, one at a time,
on the caller's own connection (inside ``atomic``, where only that connection sees the
transaction's rows). Both report queries like Django's debug cursor and raise
Django's database exceptions.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import anyio
import psycopg
from django.db import utils as django_db_utils
from django.db.backends.base.base import BaseDatabaseWrapper

from .compiler import CompiledQuery
from .pools import get_pool
from .querylog import record_query, wants_log

Rows = list[tuple[Any, ...]]

_DJANGO_ERRORS = (
    django_db_utils.DataError,
    django_db_utils.OperationalError,
    django_db_utils.IntegrityError,
    django_db_utils.InternalError,
    django_db_utils.ProgrammingError,
    django_db_utils.NotSupportedError,
    django_db_utils.DatabaseError,
    django_db_utils.InterfaceError,
    django_db_utils.Error,
)


def as_django_error(exc: psycopg.Error) -> Exception:
    """The ``django.db.utils`` exception Django's error wrapper would raise for ``exc``."""
    for django_type in _DJANGO_ERRORS:
        if isinstance(exc, getattr(psycopg, django_type.__name__)):
            error = django_type(*exc.args)
            error.__cause__ = exc
            return error
    return exc


class Executor(Protocol):
    """Fetches all rows of one compiled query."""

    async def fetch(self, query: CompiledQuery) -> Rows: ...


class PoolExecutor:
    """One query per pooled connection; at most ``limiter`` queries of a run at once."""

    def __init__(
        self,
        alias: str,
        limiter: anyio.CapacityLimiter,
        log_connection: BaseDatabaseWrapper | None,
    ) -> None:
        self._alias = alias
        self._limiter = limiter
        self._log_connection = log_connection

    async def fetch(self, query: CompiledQuery) -> Rows:
        assert query.sql is not None
        pool = await get_pool(self._alias)
        log = wants_log(self._log_connection)
        async with self._limiter:
            try:
                async with pool.connection() as conn, conn.cursor() as cursor:
                    started = time.perf_counter()
                    await cursor.execute(query.sql, query.params)
                    rows: Rows = await cursor.fetchall()
                    duration = time.perf_counter() - started
                    if log:
                        text = _executed_sql(cursor, query)
            except psycopg.Error as exc:
                raise as_django_error(exc) from exc
        if log:
            record_query(
                self._log_connection, self._alias, query.sql, query.params, duration, lambda: text
            )
        return rows


def _executed_sql(cursor: Any, query: CompiledQuery) -> str:
    mogrify = getattr(cursor, "mogrify", None)
    if mogrify is None:  # server-side binding: Django logs the SQL with placeholders
        return query.sql or ""
    return str(mogrify(query.sql, query.params))


class CallerConnectionExecutor:
    """Runs queries on the caller's open Django connection, serially, off the event loop.

    The caller is suspended in the engine while this runs, so the connection is not
    in use elsewhere; psycopg connections may be used from another thread.
    """

    def __init__(self, connection: BaseDatabaseWrapper) -> None:
        self._connection = connection
        self._serial = anyio.CapacityLimiter(1)

    def _run(self, query: CompiledQuery) -> tuple[Rows, float, str]:
        raw = self._connection.connection
        assert raw is not None, "a connection inside atomic is open"
        with raw.cursor() as cursor:
            started = time.perf_counter()
            cursor.execute(query.sql, query.params)
            rows: Rows = cursor.fetchall()
            duration = time.perf_counter() - started
            text = _executed_sql(cursor, query) if wants_log(self._connection) else ""
        return rows, duration, text

    async def fetch(self, query: CompiledQuery) -> Rows:
        assert query.sql is not None
        try:
            rows, duration, text = await anyio.to_thread.run_sync(
                self._run, query, limiter=self._serial
            )
        except psycopg.Error as exc:
            raise as_django_error(exc) from exc
        if wants_log(self._connection):
            record_query(
                self._connection, self._connection.alias, query.sql, query.params, duration,
                lambda: text,
            )
        return rows
