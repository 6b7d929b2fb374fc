"""``PoolExecutor``: each query on a pooled connection of its own, its rows handed to the
consumer a batch at a time, so a result is never held both as PostgreSQL's buffer and as
a full list of Python rows; the connection goes back to the pool as soon as the last batch
is consumed. Queries are reported like Django's debug cursor, run inside the caller's
``execute_wrappers``, raise Django's database exceptions, and are stopped in the server
when their caller is cancelled."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import anyio.to_thread
import psycopg
from django.db.backends.base.base import BaseDatabaseWrapper
from psycopg_pool import AsyncConnectionPool

from ..sql.compiler import CompiledQuery
from .base import BATCH_ROWS, Limiter, RowConsumer, as_django_error
from .pools import acquire, connection_kwargs, get_pool
from .querylog import record_query, wants_log

logger = logging.getLogger("async_prefetch")

T = TypeVar("T")

#: Seconds a cancelled query may take to end, cancel requests re-sent meanwhile, before
#: its connection is closed and its server process terminated.
CANCEL_TIMEOUT = 2.0

#: Pauses between cancel requests for one query: the first is short (a cancel that
#: arrives while the server is running the query ends it within a round trip).
_CANCEL_PAUSES = (0.05, 0.1, 0.2)


class PoolExecutor:
    """One query per pooled connection; at most ``limiter`` queries of a run at once.

    ``log_connection`` is the caller's Django connection for the alias: its query log,
    SQL panel (django-debug-toolbar) and ``execute_wrappers`` see every query, as if it
    had run on that connection (see :meth:`fetch`).
    """

    def __init__(
        self,
        alias: str,
        limiter: Limiter,
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
        pool = await self._get_pool()
        connection = self._log_connection
        wrappers = list(connection.execute_wrappers) if connection is not None else []
        log = wants_log(connection)
        async with self._limiter:
            try:
                conn = await self._checkout(pool)
                try:
                    async with conn.cursor() as cursor:
                        sent = [query.sql, query.params]  # what ran, once it has run
                        started = time.perf_counter()
                        duration: float | None = None
                        try:
                            if wrappers:
                                await self._execute_wrapped(cursor, wrappers, sent)
                            else:
                                await self._run_query(cursor, query.sql, query.params)
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
                        await self._checkin(pool, conn)
            except psycopg.Error as exc:
                raise as_django_error(exc) from exc

    async def _get_pool(self) -> AsyncConnectionPool[Any]:
        """The alias's pool, looked up once per executor."""
        if self._pool is None:
            self._pool = await get_pool(self._alias)
        return self._pool

    async def _checkout(self, pool: AsyncConnectionPool[Any]) -> psycopg.AsyncConnection[Any]:
        """The connection a query runs on (a pooled one)."""
        return await acquire(pool)

    async def _checkin(
        self, pool: AsyncConnectionPool[Any], conn: psycopg.AsyncConnection[Any]
    ) -> None:
        """Give back :meth:`_checkout`'s connection once its query's rows are read
        (shielded from cancellation by the caller)."""
        await pool.putconn(conn)

    async def _run_query(self, cursor: Any, sql: str, params: Any) -> None:
        """Run ``sql`` on ``cursor`` (its result left there for ``fetchmany``)."""
        await _execute(cursor, sql, params, self._alias)

    async def _execute_wrapped(
        self, cursor: Any, wrappers: Sequence[Callable[..., Any]], sent: list[Any]
    ) -> None:
        """:func:`_execute` inside ``wrappers`` (outermost first), run on a worker thread.

        ``sent`` holds the SQL and parameters given to ``execute``; they replace its
        contents when the innermost wrapper passes others on.
        """

        async def run(sql: str, params: Any) -> None:
            try:
                await self._run_query(cursor, sql, params)
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
    """``cursor.execute(sql, params)``, stopped in the server when cancelled (:func:`stoppable`)."""
    await stoppable(cursor.connection, lambda: cursor.execute(sql, params), alias)


async def stoppable(
    conn: psycopg.AsyncConnection[Any], operation: Callable[[], Awaitable[T]], alias: str
) -> T:
    """``await operation()`` (one statement on ``conn``); when cancelled, returns (raising)
    only once the statement has ended in the server, or its connection is closed and its
    server process terminated.

    psycopg's own handling of a cancelled ``execute()`` sends one cancel request and
    waits for the query to end. The server ignores a cancel request that arrives before
    it has read the query, and then runs it to the end: psycopg closes the connection
    after its timeout and the query goes on. anyio also cancels every await in a
    cancelled scope, which would interrupt that clean-up. So the statement runs in a
    task of its own, which is not cancelled: a cancelled caller waits, shielded, in
    :func:`_stop_query`, which re-sends cancel requests until the statement has ended (a
    statement whose task never ran was not sent: that task is simply cancelled).
    Pools, and so this, only run on asyncio (:func:`.pools.get_pool`).
    """
    started = False

    async def run() -> T:
        nonlocal started
        started = True
        return await operation()

    task = asyncio.ensure_future(run())
    try:
        return await asyncio.shield(task)
    except BaseException:
        with anyio.CancelScope(shield=True):
            if started:
                await _stop_query(conn, task, alias)
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
