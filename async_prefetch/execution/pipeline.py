"""Pipeline executors: the queries of a stage in one round trip on one connection.

The scheduler starts a stage's queries as concurrent fetch tasks. A pipeline executor
collects the queries that arrive together (:class:`Batches`: until the event loop has
gone :data:`QUIET_ROUNDS` scheduling rounds without a new one) and sends them as one
batch in psycopg's pipeline mode: every query of the batch reaches the server in one
write, and their results come back in one read.

``CallerPipelineExecutor`` sends a batch on the caller's own Django connection (inside
``atomic``), on the thread that owns it, through Django's cursors (query log,
``execute_wrappers``, error translation), so the transaction sees its own rows and pays
one round trip per stage. ``PooledPipelineExecutor`` sends every batch of a call on one
pooled connection (``round_trips=1``, and ``consistent=True``: one ``REPEATABLE READ``
transaction, so that every query of the call sees one snapshot).

A batch succeeds or fails whole: when a query fails, its request raises the error (the
server ran none of the queries after it), the other requests of the batch raise a
``DatabaseError`` caused by it, and no request gets rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import psycopg
from django.db import utils as django_db_utils
from django.db.backends.base.base import BaseDatabaseWrapper
from psycopg_pool import AsyncConnectionPool

from ..sql.compiler import CompiledQuery
from .base import BATCH_ROWS, Limiter, RowConsumer, Rows, as_django_error
from .caller_thread import on_caller_thread
from .pool import PoolExecutor, stoppable
from .pools import acquire, get_pool
from .querylog import wants_log
from .transactions import begin_exporting, exported_snapshot, release

#: Scheduling rounds without a new query after which a batch is sent. The linking task
#: starts a sibling's fetch task a round after the previous one, and a fetch task
#: queues its query in its first step: a stage's queries arrive a round apart.
QUIET_ROUNDS = 3


@dataclass(eq=False)
class _Request:
    query: CompiledQuery
    future: asyncio.Future[Rows]
    sent: bool = False
    abandoned: bool = False  # its caller was cancelled while its batch ran


class PipelineAborted(django_db_utils.DatabaseError):
    """The error of a query that was not run because another query of its pipeline
    failed (that query's error is the ``__cause__``). Where the queries belong to
    independent runs (``agather``), the failing query's own error is the one to raise."""


@dataclass(eq=False)
class Batches:
    """Queries that arrive together, sent together by ``send`` (one batch at a time).

    ``send(queries)`` returns each query's rows, in order, or raises; the requests of a
    batch get their rows once the whole batch has succeeded. A request cancelled before
    its batch is sent is dropped from it; one cancelled after waits (shielded) until its
    batch has ended, so that nothing of a call runs in the server once the call is over.
    ``cancellable``: once every request of a running batch is cancelled, ``send`` is
    cancelled too (it must then stop its queries in the server before it returns).
    """

    send: Callable[[list[CompiledQuery]], Awaitable[list[Rows]]]
    cancellable: bool = False
    _pending: list[_Request] = field(default_factory=list)
    _arrivals: int = 0
    _flusher: asyncio.Task[None] | None = None
    _in_flight: list[_Request] = field(default_factory=list)
    _sending: asyncio.Task[list[Rows]] | None = None

    async def run(self, query: CompiledQuery) -> Rows:
        """``query``'s rows, once the batch it joined has run."""
        request = _Request(query, asyncio.get_running_loop().create_future())
        self._pending.append(request)
        self._arrivals += 1
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush())
        try:
            return await asyncio.shield(request.future)
        except BaseException:
            if not request.sent:
                self._pending.remove(request)
            elif not request.future.done():
                request.abandoned = True
                sending = self._sending
                if (
                    self.cancellable
                    and sending is not None
                    and all(other.abandoned for other in self._in_flight)
                ):
                    sending.cancel()
                with anyio.CancelScope(shield=True):
                    await asyncio.wait([request.future])
            if request.future.done() and not request.future.cancelled():
                request.future.exception()  # retrieved: the caller's own exception wins
            raise

    async def fetch(self, query: CompiledQuery, consume: RowConsumer) -> None:
        """:meth:`run` ``query`` and feed its rows to ``consume``, a batch of
        :data:`.base.BATCH_ROWS` at a time (the executors' ``fetch``)."""
        assert query.sql is not None
        rows = await self.run(query)
        for start in range(0, len(rows), BATCH_ROWS):
            await consume(rows[start : start + BATCH_ROWS])

    async def _flush(self) -> None:
        try:
            while self._pending:
                await until_quiet(lambda: self._arrivals)
                batch, self._pending = self._pending, []
                if batch:
                    await self._send_batch(batch)
        finally:
            self._flusher = None

    async def _send_batch(self, batch: list[_Request]) -> None:
        for request in batch:
            request.sent = True
        self._in_flight = batch
        self._sending = sending = asyncio.ensure_future(self.send([r.query for r in batch]))
        try:
            results = await sending
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not sending.cancelled() or (current is not None and current.cancelling()):
                raise
            for request in batch:  # abandoned by all: stopped
                request.future.cancel()
            return
        except Exception as exc:
            failed = min(getattr(exc, "failed_index", 0), len(batch) - 1)
            batch[failed].future.set_exception(exc)
            # The failing query's task raises first and its run cancels its siblings;
            # requests still waiting after that (another run's) get an error of their own.
            for _ in range(QUIET_ROUNDS):
                await asyncio.sleep(0)
            for request in batch:
                if not request.future.done():
                    aborted = PipelineAborted(
                        "async_prefetch: not run: another query of its pipeline failed"
                    )
                    aborted.__cause__ = exc
                    request.future.set_exception(aborted)
            return
        except BaseException:  # the flusher cancelled (its loop closing): its requests too
            for request in batch:
                request.future.cancel()
            raise
        finally:
            self._in_flight, self._sending = [], None
        for request, rows in zip(batch, results, strict=True):
            request.future.set_result(rows)


async def until_quiet(arrivals: Callable[[], int]) -> None:
    """Return once the event loop has gone :data:`QUIET_ROUNDS` scheduling rounds
    without ``arrivals()`` (a count of arrivals) changing."""
    seen, quiet = -1, 0
    while quiet < QUIET_ROUNDS:
        if arrivals() != seen:
            seen, quiet = arrivals(), 0
        else:
            quiet += 1
        await asyncio.sleep(0)


def pipeline_supported() -> bool:
    """Whether psycopg here can pipeline (psycopg 3 with libpq 14 or later)."""
    return psycopg.Pipeline.is_supported()


class CallerPipelineExecutor:
    """Sends each batch on the caller's own Django connection, on the thread that owns it.

    Used inside ``atomic``: each batch runs on the thread holding the transaction
    (``on_caller_thread``); each query goes
    through a Django cursor, so the query log, ``execute_wrappers`` and Django's error
    translation apply (the log's time of a pipelined query is the time to queue it).
    A failing query marks the connection as Django's cursor does
    (``errors_occurred``), and leaves the transaction aborted, as a failed query does.
    """

    def __init__(self, connection: BaseDatabaseWrapper) -> None:
        self._connection = connection
        self._batches = Batches(self._send)

    async def _send(self, queries: list[CompiledQuery]) -> list[Rows]:
        return await on_caller_thread(_run_on_caller, self._connection, queries)

    async def fetch(self, query: CompiledQuery, consume: RowConsumer) -> None:
        await self._batches.fetch(query, consume)


def _run_on_caller(connection: BaseDatabaseWrapper, queries: list[CompiledQuery]) -> list[Rows]:
    """Run ``queries`` in one pipeline on ``connection`` (a Django connection, on its own
    thread) and return their rows.

    When the queries are the first of the connection's transaction (Django's ``atomic``
    has turned autocommit off, and nothing has run since), the transaction's ``BEGIN``
    goes in the same pipeline, ahead of them: psycopg would send it on its own and wait
    for it (a round trip) before queueing the first query.
    """
    cursors: list[Any] = []
    with contextlib.ExitStack() as stack:
        try:
            with connection.wrap_database_errors:
                connection.ensure_connection()
                raw = connection.connection
                begin = _begin_pending(raw)
                try:
                    with raw.pipeline():
                        if begin is not None:
                            raw.execute(begin)
                        for query in queries:
                            cursor = stack.enter_context(connection.cursor())
                            cursors.append(cursor)
                            cursor.execute(query.sql or "", query.params)
                finally:
                    if begin is not None:
                        raw._autocommit = False  # the transaction is open (or failed) now
        except django_db_utils.Error as exc:
            exc.failed_index = _failed_index(cursors)  # type: ignore[attr-defined]
            raise
        return [cursor.fetchall() for cursor in cursors]


def _begin_pending(raw: Any) -> bytes | None:
    """The ``BEGIN`` that psycopg connection ``raw`` would send (and wait for) before its
    next statement, with ``raw`` switched to autocommit so that it does not: ``None``
    when ``raw`` is in autocommit or a transaction already. Switch ``raw._autocommit``
    back to ``False`` once the ``BEGIN`` has been sent."""
    # psycopg's private _get_tx_start_command() (the BEGIN it would send) and _autocommit
    # flag (set back once our BEGIN is sent: the public setter refuses inside a
    # transaction), in psycopg 3.2 and 3.3; without them psycopg sends its own BEGIN.
    if (
        not (hasattr(raw, "_get_tx_start_command") and hasattr(raw, "_autocommit"))
        or raw.autocommit
        or raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
    ):
        return None
    begin: bytes = raw._get_tx_start_command()
    raw.autocommit = True  # idle and outside a pipeline: no round trip
    return begin


def _failed_index(cursors: list[Any]) -> int:
    """The position of the query whose error ended a pipeline: the first without a result."""
    for index, cursor in enumerate(cursors):
        raw = getattr(cursor, "cursor", cursor)  # Django's wrapper, or psycopg's cursor
        if getattr(raw, "pgresult", None) is None:
            return index
    return max(len(cursors) - 1, 0)


class PooledPipelineExecutor(PoolExecutor):
    """Sends each batch of a call on one pooled connection.

    ``hold``: the same connection for every batch, until :meth:`aclose` (which the
    call's scope awaits) releases it; otherwise it goes back to the pool after each
    batch. ``consistent`` (needs ``hold``): the connection runs the call's queries in
    one ``REPEATABLE READ READ ONLY`` transaction, opened in the first batch's round
    trip, so all of them see one snapshot; :meth:`aclose` rolls it back. A batch takes
    one of the call's ``limiter`` slots. Queries are reported like the pool's
    (:class:`PoolExecutor`).
    """

    def __init__(
        self,
        alias: str,
        limiter: Limiter,
        log_connection: BaseDatabaseWrapper | None,
        *,
        consistent: bool,
        hold: bool = True,
    ) -> None:
        super().__init__(alias, limiter, log_connection)
        assert hold or not consistent, "a consistent call's transaction spans its batches"
        self._consistent = consistent
        self._hold = hold
        self._batches = Batches(self.send, cancellable=True)
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._held_from: AsyncConnectionPool[Any] | None = None
        self._begun = False
        self._snapshot: str | None = None
        self._lock = asyncio.Lock()  # one pipeline at a time on the connection
        self._closed = False

    async def fetch(self, query: CompiledQuery, consume: RowConsumer) -> None:
        await self._batches.fetch(query, consume)

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._closed:
            raise RuntimeError("async_prefetch: the call's pipeline connection is released")
        if self._conn is None:
            pool = await get_pool(self._alias)
            self._conn = await acquire(pool)
            self._held_from = pool
        return self._conn

    async def snapshot_id(self) -> str:
        """The id of the call's snapshot (``consistent`` only), its transaction opened now
        when no batch has opened it yet."""
        assert self._consistent, "no snapshot without consistent=True"
        if not self._begun:
            await self.send([])
        assert self._snapshot is not None
        return self._snapshot

    async def send(self, queries: list[CompiledQuery]) -> list[Rows]:
        """``queries`` in one pipeline on the executor's connection; their rows."""
        async with self._lock:
            return await self._send_now(queries)

    async def _send_now(self, queries: list[CompiledQuery]) -> list[Rows]:
        connection = self._log_connection
        wrappers = list(connection.execute_wrappers) if connection is not None else []
        log = wants_log(connection)
        async with self._limiter:
            conn = await self._connection()
            sent: list[list[Any]] = [[query.sql, query.params] for query in queries]
            cursors: list[Any] = []

            async def run() -> list[Rows]:
                exported = None
                async with conn.pipeline():
                    if self._consistent and not self._begun:
                        exported = await begin_exporting(conn)
                    for index, query in enumerate(queries):
                        cursor = conn.cursor()
                        cursors.append(cursor)
                        if wrappers:
                            await self._execute_wrapped(cursor, wrappers, sent[index])
                        else:
                            await cursor.execute(query.sql or "", query.params)
                if exported is not None:
                    self._snapshot, self._begun = await exported_snapshot(exported), True
                return [await cursor.fetchall() for cursor in cursors]

            started = time.perf_counter()
            try:
                try:
                    results = await stoppable(conn, run, self._alias)
                finally:
                    duration = time.perf_counter() - started
                    if log:  # as Django logs them, failed ones too
                        for cursor, what in zip(cursors, sent, strict=False):
                            with contextlib.suppress(Exception):
                                self._record(cursor, what, duration)
                    if not self._hold:
                        await self._release()
            except psycopg.Error as exc:
                error = as_django_error(exc)
                error.failed_index = _failed_index(cursors)  # type: ignore[attr-defined]
                raise error from exc
            except django_db_utils.Error as exc:  # raised inside execute_wrappers
                exc.failed_index = _failed_index(cursors)  # type: ignore[attr-defined]
                raise
            return results

    async def aclose(self) -> None:
        """End the call's transaction, if any, and return the connection to the pool."""
        self._closed = True
        await self._release()

    async def _release(self) -> None:
        conn, pool = self._conn, self._held_from
        self._conn = self._held_from = None
        await release(conn, pool)
