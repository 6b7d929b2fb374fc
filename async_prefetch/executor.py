"""Executors: where a compiled query's rows come from.

``PoolExecutor`` runs each query on its own pooled connection and hands the rows to
the caller's consumer a batch at a time, so that a result is never held both as
PostgreSQL's buffer and as a full list of Python rows; the connection goes back to the
pool as soon as the last batch is consumed. ``CallerConnectionExecutor`` runs them, one at a time,
on the caller's own connection (inside ``atomic``, where only that connection sees the
transaction's rows). Both report queries like Django's debug cursor, run them inside
the caller's connection's ``execute_wrappers`` and raise Django's database exceptions.

Another strategy (psycopg pipeline mode on one connection) fits behind ``Executor``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import anyio
import anyio.from_thread
import anyio.to_thread
import psycopg
from asgiref.sync import sync_to_async
from django.db import utils as django_db_utils
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models.sql.constants import GET_ITERATOR_CHUNK_SIZE
from psycopg_pool import AsyncConnectionPool

from .compiler import CompiledQuery
from .pools import acquire, connection_kwargs, get_pool
from .querylog import record_query, wants_log

Rows = list[tuple[Any, ...]]
RowConsumer = Callable[[Rows], Awaitable[None]]

#: Rows converted from a result per batch: as many as Django's iterator reads at once.
BATCH_ROWS = GET_ITERATOR_CHUNK_SIZE

#: Seconds a cancelled query may take to end, cancel requests re-sent meanwhile, before
#: its connection is closed and its server process terminated.
CANCEL_TIMEOUT = 2.0
#: Pauses between cancel requests for one query: the first is short (a cancel that
#: arrives while the server is running the query ends it within a round trip).
_CANCEL_PAUSES = (0.05, 0.1, 0.2)

logger = logging.getLogger("async_prefetch")

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
    """One query per pooled connection; at most ``limiter`` queries of a run at once.

    ``log_connection`` is the caller's Django connection for the alias: its query log,
    SQL panel (django-debug-toolbar) and ``execute_wrappers`` see every query, as if it
    had run on that connection (see :meth:`fetch`).
    """

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
        """Run ``query`` on a pooled connection and feed its rows to ``consume``.

        The caller's ``execute_wrappers`` (read when the query starts) are called as
        Django's cursor calls them, ``wrapper(execute, sql, params, many, context)``,
        on a worker thread; the innermost ``execute`` runs the SQL and parameters it is
        given, and raises Django's exceptions. ``context`` holds ``connection``, the
        caller's connection, and ``cursor``, ``None``: no Django cursor runs the query.
        A query is logged once it has ended, also when it failed, as Django logs it.
        """
        assert query.sql is not None
        if self._pool is None:
            self._pool = await get_pool(self._alias)
        pool = self._pool
        connection = self._log_connection
        wrappers = list(connection.execute_wrappers) if connection is not None else []
        log = wants_log(connection)
        async with self._limiter:
            try:
                conn = await acquire(pool)
                try:
                    async with conn.cursor() as cursor:
                        sent = [query.sql, query.params]  # what ran, once it has run
                        started = time.perf_counter()
                        duration: float | None = None
                        try:
                            if wrappers:
                                await self._execute_wrapped(cursor, wrappers, sent)
                            else:
                                await _execute(cursor, query.sql, query.params, self._alias)
                            duration = time.perf_counter() - started
                            # The whole result is in the client already: fetchmany()
                            # converts rows without waiting for the server.
                            while rows := await cursor.fetchmany(BATCH_ROWS):
                                await consume(rows)
                        except BaseException:
                            if log:  # logged as Django logs a failed query; never instead
                                if duration is None:
                                    duration = time.perf_counter() - started
                                with contextlib.suppress(Exception):
                                    self._record(cursor, sent, duration)
                            raise
                        if log:  # after reading: mogrify() drops the cursor's result
                            self._record(cursor, sent, duration)
                finally:
                    # Shielded: anyio cancels every await of a cancelled task, and a
                    # putconn() interrupted while it waits for the pool's lock leaves
                    # the connection counted as checked out for good.
                    with anyio.CancelScope(shield=True):
                        await pool.putconn(conn)
            except psycopg.Error as exc:
                raise as_django_error(exc) from exc

    async def _execute_wrapped(
        self, cursor: Any, wrappers: Sequence[Callable[..., Any]], sent: list[Any]
    ) -> None:
        """:func:`_execute` inside ``wrappers`` (outermost first), run on a worker thread.

        ``sent`` holds the SQL and parameters given to ``execute``; they replace its
        contents when the innermost wrapper passes others on.
        """
        alias = self._alias

        async def run(sql: str, params: Any) -> None:
            try:
                await _execute(cursor, sql, params, alias)
            except psycopg.Error as exc:
                raise as_django_error(exc) from exc

        def execute(sql: str, params: Any, many: bool, context: dict[str, Any]) -> None:
            sent[:] = [sql, params]
            anyio.from_thread.run(run, sql, params)

        def call_chain() -> None:
            chain: Callable[..., Any] = execute
            for wrapper in reversed(wrappers):
                chain = functools.partial(wrapper, chain)
            context = {"connection": self._log_connection, "cursor": None}
            chain(sent[0], sent[1], False, context)

        await anyio.to_thread.run_sync(call_chain)

    def _record(self, cursor: Any, sent: list[Any], duration: float) -> None:
        sql, params = sent
        text = _executed_sql(cursor, sql, params)
        conn = cursor.connection
        record_query(
            self._log_connection,
            self._alias,
            sql,
            params,
            duration,
            text,
            transaction_status=conn.info.transaction_status,
            isolation_level=conn.isolation_level,
        )


async def _execute(cursor: Any, sql: str, params: Any, alias: str) -> None:
    """``cursor.execute(sql, params)``; when cancelled, returns (raising) only once the
    query has ended in the server, or its connection is closed and its server process
    terminated.

    psycopg's own handling of a cancelled ``execute()`` sends one cancel request and
    waits for the query to end. The server ignores a cancel request that arrives before
    it has read the query, and then runs it to the end: psycopg closes the connection
    after its timeout and the query goes on. anyio also cancels every await in a
    cancelled scope, which would interrupt that clean-up. So the query runs in a task of
    its own, which is not cancelled: a cancelled caller waits, shielded, in
    :func:`_stop_query`, which re-sends cancel requests until the query has ended (a
    query whose task never ran was not sent: that task is simply cancelled).
    Pools, and so this, only run on asyncio (:func:`.pools.get_pool`).
    """
    started = False

    async def execute() -> None:
        nonlocal started
        started = True
        await cursor.execute(sql, params)

    task = asyncio.ensure_future(execute())
    try:
        await asyncio.shield(task)
    except BaseException:
        with anyio.CancelScope(shield=True):
            if started:
                await _stop_query(cursor.connection, task, alias)
            else:  # cancelled before it ran: nothing was sent
                task.cancel()
                await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # retrieved: the caller's own exception wins
        raise


async def _stop_query(
    conn: psycopg.AsyncConnection[Any], task: asyncio.Future[Any], alias: str
) -> None:
    """Return once ``task``, running a query on ``conn``, has ended.

    Cancel requests are sent until the query ends; each is awaited until the server
    has signalled its process, so none can reach a later query on the connection once
    this returns. After :data:`CANCEL_TIMEOUT` seconds the connection is closed (the
    pool discards it) and the server process is terminated from a connection of its own.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CANCEL_TIMEOUT
    pauses = iter(_CANCEL_PAUSES)
    pause = 0.0
    while not task.done():
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        try:
            await conn.cancel_safe(timeout=remaining)
        except psycopg.Error as exc:  # the server unreachable: retried until the deadline
            logger.debug("cancel request failed: %s", exc)
        pause = next(pauses, pause)
        await asyncio.wait([task], timeout=max(0.0, min(pause, deadline - loop.time())))
    if task.done():
        return
    pid = conn.info.backend_pid
    logger.warning(
        "query not ended %.1f s after cancelling it: closing its connection and "
        "terminating server process %d",
        CANCEL_TIMEOUT,
        pid,
    )
    # The first cancellation makes psycopg send a cancel request and wait for the
    # query again; the next interrupts that wait, and psycopg closes the connection
    # from the task, where nothing waits on its socket any more.
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=0.05)
    await _terminate_backend(alias, pid)


async def _terminate_backend(alias: str, pid: int) -> None:
    """``pg_terminate_backend(pid)`` on a new connection (not one of the pool's, which
    may all be taken), giving up after :data:`CANCEL_TIMEOUT` seconds."""
    with anyio.move_on_after(CANCEL_TIMEOUT) as scope:
        try:
            kwargs = connection_kwargs(alias)
            async with await psycopg.AsyncConnection.connect(**kwargs) as conn:
                await conn.execute("SELECT pg_terminate_backend(%s)", [pid])
        except psycopg.Error as exc:
            logger.warning("could not terminate server process %d: %s", pid, exc)
    if scope.cancelled_caught:
        logger.warning("could not terminate server process %d: timed out", pid)


def _executed_sql(cursor: Any, sql: str, params: Any) -> str:
    mogrify = getattr(cursor, "mogrify", None)
    if mogrify is None:  # server-side binding: Django logs the SQL with placeholders
        return sql
    return str(mogrify(sql, params))


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
