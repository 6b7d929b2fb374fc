"""Executors: where a compiled query's rows come from.

``PoolExecutor`` runs each query on its own pooled connection and hands the rows to
the caller's consumer a batch at a time, so that a result is never held both as
PostgreSQL's buffer and as a full list of Python rows; the connection goes back to the
pool as soon as the last batch is consumed. ``CallerConnectionExecutor`` runs them, one at a time,
on the caller's own connection (inside ``atomic``, where only that connection sees the
transaction's rows). Both report queries like Django's debug cursor and raise
Django's database exceptions.

Another strategy (psycopg pipeline mode on one connection) fits behind ``Executor``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import anyio
import psycopg
from asgiref.sync import sync_to_async
from django.db import utils as django_db_utils
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models.sql.constants import GET_ITERATOR_CHUNK_SIZE
from psycopg_pool import AsyncConnectionPool

from .compiler import CompiledQuery
from .pools import get_pool
from .querylog import record_query, wants_log

Rows = list[tuple[Any, ...]]
RowConsumer = Callable[[Rows], Awaitable[None]]

#: Rows converted from a result per batch: as many as Django's iterator reads at once.
BATCH_ROWS = GET_ITERATOR_CHUNK_SIZE

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
    """The ``django.db.utils`` exception Django's error wrapper would raise for ``exc``
    (raise it ``from exc``). Django's ``DatabaseErrorWrapper`` is not used because it
    marks its connection as errored: the failing connection here is a pooled one."""
    for django_type in _DJANGO_ERRORS:
        if isinstance(exc, getattr(psycopg, django_type.__name__)):
            return django_type(*exc.args)
    return exc


class Executor(Protocol):
    """Runs one compiled query and awaits ``consume`` on its rows, in order, in one or
    more batches (none for an empty result); returns when every row has been consumed."""

    async def fetch(self, query: CompiledQuery, consume: RowConsumer) -> None: ...


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
        self._pool: AsyncConnectionPool | None = None  # looked up once per run

    async def fetch(self, query: CompiledQuery, consume: RowConsumer) -> None:
        assert query.sql is not None
        if self._pool is None:
            self._pool = await get_pool(self._alias)
        pool = self._pool
        log = wants_log(self._log_connection)
        async with self._limiter:
            try:
                conn = await pool.getconn()
                try:
                    async with conn.cursor() as cursor:
                        started = time.perf_counter()
                        await _execute(cursor, query)
                        duration = time.perf_counter() - started
                        try:
                            # The whole result is in the client already: fetchmany()
                            # converts rows without waiting for the server.
                            while rows := await cursor.fetchmany(BATCH_ROWS):
                                await consume(rows)
                        except BaseException:
                            if log:  # logged as Django logs a failed query; never instead
                                with contextlib.suppress(Exception):
                                    self._record(cursor, query, duration)
                            raise
                        if log:  # after reading: mogrify() drops the cursor's result
                            self._record(cursor, query, duration)
                finally:
                    # Shielded: anyio cancels every await of a cancelled task, and a
                    # putconn() interrupted while it waits for the pool's lock leaves
                    # the connection counted as checked out for good.
                    with anyio.CancelScope(shield=True):
                        await pool.putconn(conn)
            except psycopg.Error as exc:
                raise as_django_error(exc) from exc

    def _record(self, cursor: Any, query: CompiledQuery, duration: float) -> None:
        text = _executed_sql(cursor, query)
        record_query(self._log_connection, self._alias, query.params, duration, text)


async def _execute(cursor: Any, query: CompiledQuery) -> None:
    """``cursor.execute()``, cancellable the way psycopg expects to be cancelled.

    When the task awaiting a query is cancelled, psycopg asks the server to cancel it
    and waits for it to end, which needs two more awaits. anyio cancels every await in
    a cancelled scope, so that clean-up would be interrupted too: psycopg then closes
    the connection (the pool opens another) and the server may go on running the query.
    So the query runs in a task of its own, cancelled once, and a cancelled caller
    waits, shielded, until psycopg has finished (bounded by its own 5 s timeouts).
    Pools, and so this, only run on asyncio (:func:`.pools.get_pool`).
    """
    task = asyncio.ensure_future(cursor.execute(query.sql, query.params))
    try:
        await asyncio.shield(task)
    except BaseException:
        task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # retrieved: the caller's own exception wins
        raise


def _executed_sql(cursor: Any, query: CompiledQuery) -> str:
    mogrify = getattr(cursor, "mogrify", None)
    if mogrify is None:  # server-side binding: Django logs the SQL with placeholders
        return query.sql or ""
    return str(mogrify(query.sql, query.params))


class CallerConnectionExecutor:
    """Runs queries through the caller's own Django connection, on the thread that owns it.

    Used inside ``atomic``, where only that connection sees the transaction's rows.
    ``sync_to_async(thread_sensitive=True)`` reaches the thread holding the transaction
    (the outer thread under ``async_to_sync``), and Django's cursor wrapper does the
    logging, ``execute_wrappers`` and error translation. Queries run one at a time.
    """

    def __init__(self, connection: BaseDatabaseWrapper) -> None:
        self._connection = connection

    def _run(self, query: CompiledQuery) -> Rows:
        assert query.sql is not None
        with self._connection.cursor() as cursor:
            cursor.execute(query.sql, query.params)
            rows: Rows = cursor.fetchall()
        return rows

    async def fetch(self, query: CompiledQuery, consume: RowConsumer) -> None:
        assert query.sql is not None
        rows = await sync_to_async(self._run, thread_sensitive=True)(query)
        if rows:
            await consume(rows)
