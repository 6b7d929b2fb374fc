"""Streams: a queryset read in chunks, each chunk's lookups prefetched, ahead of the consumer.

A :class:`Stream` lives on the engine's event loop. Its producer task reads the root rows
through a server-side cursor on a pooled connection (``cursor.stream()`` in chunks where
``DISABLE_SERVER_SIDE_CURSORS`` is set, as behind PgBouncer's transaction pooling), builds
each chunk's instances, prefetches the chunk's lookups like one ``aprefetch`` call (all
chunks share one session: one concurrency limit, one trace, one memo) and hands the
finished chunk over a memory stream: while the consumer works on chunk *k*, chunks up to
*k + read_ahead* are read and prefetched, and the producer waits before reading one more. A
chunk is handed over only when every lookup is in.

:meth:`Stream.aclose` cancels the producer (its in-flight prefetch queries are stopped in
the server), closes the cursor and returns the connection.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from django.db.models import Model, QuerySet
from psycopg import AsyncClientCursor, AsyncConnection, AsyncServerCursor
from psycopg.client_cursor import ClientCursorMixin

from ..execution.pool import stoppable
from ..execution.pools import acquire, get_pool
from ..execution.querylog import record_query, wants_log
from ..execution.transactions import export_snapshot, release
from ..hydration.rows import row_builder
from ..sql.compiler import CompiledQuery, compile_queryset
from .scheduler import run_in_session
from .session import CallerContext, Session

_cursor_names = itertools.count(1)


class _ClientBindingServerCursor(ClientCursorMixin[Any, Any], AsyncServerCursor[Any]):
    """A named cursor that binds parameters on the client, as Django's ``ServerSideCursor``
    does unless ``server_side_binding`` is set (Django's SQL is written for it)."""


class Stream:
    """One queryset's chunks, produced on the engine loop (see the module docstring)."""

    def __init__(
        self,
        queryset: QuerySet[Any],
        lookups: Sequence[Any],
        caller: CallerContext,
        *,
        chunk_size: int,
        read_ahead: int,
        memo: Any = None,
    ) -> None:
        self._queryset = queryset
        self._lookups = list(lookups)
        self._caller = caller
        self._chunk_size = chunk_size
        self._read_ahead = read_ahead
        self._memo = memo
        self._snapshot: str | None = None
        self._error: BaseException | None = None
        self._send: MemoryObjectSendStream[list[Model]]
        self._receive: MemoryObjectReceiveStream[list[Model]]
        self._scope: anyio.CancelScope
        self._finished: anyio.Event
        self._credits: anyio.Semaphore

    async def open(self) -> None:
        """Make the stream's loop objects (call on the engine loop, before :meth:`produce`)."""
        self._send, self._receive = anyio.create_memory_object_stream[list[Model]](self._read_ahead)
        self._scope = anyio.CancelScope()
        self._finished = anyio.Event()
        # One credit per chunk the producer may start: read_ahead beyond those asked for.
        self._credits = anyio.Semaphore(self._read_ahead)

    async def produce(self) -> None:
        """The producer task: read, prefetch and hand over chunks until the end, a failure
        (raised to the consumer after the chunks before it) or :meth:`aclose`."""
        try:
            with self._scope:
                await self._read_chunks()
        except Exception as exc:
            self._error = exc
        finally:
            self._send.close()
            self._finished.set()

    async def next_chunk(self) -> list[Model] | None:
        """The next finished chunk; ``None`` at the end. Raises the producer's error."""
        self._credits.release()  # this one, if the producer has not started it yet
        try:
            return await self._receive.receive()
        except anyio.EndOfStream:
            if self._error is not None:
                raise self._error from None
            return None

    async def aclose(self) -> None:
        """Stop producing and release everything; chunks not yet taken are dropped."""
        self._scope.cancel()
        with anyio.CancelScope(shield=True):
            await self._finished.wait()
        self._receive.close()

    async def _read_chunks(self) -> None:
        session = Session(self._caller, memo=self._memo)
        compiled = compile_queryset(self._queryset)
        if compiled.sql is None:
            return
        build = row_builder(compiled, peers_per_batch=True)  # a chunk's peers: its books
        # consistent: the root rows are read in a REPEATABLE READ transaction whose
        # snapshot (exported) every chunk's prefetches import.
        chunks_of = self._row_chunks(compiled, consistent=session.consistent)
        async with contextlib.aclosing(chunks_of) as chunks:
            while True:
                await self._credits.acquire()
                rows = await anext(chunks, None)
                if rows is None:
                    return
                if self._snapshot is not None:
                    session.snapshots[compiled.alias] = self._snapshot
                instances = build(rows)
                del rows
                if self._lookups:
                    await run_in_session(session, instances, self._lookups, built=True)
                await self._send.send(instances)
                del instances  # the consumer's now: not kept while the next one is read

    async def _row_chunks(
        self, compiled: CompiledQuery, *, consistent: bool
    ) -> AsyncGenerator[list[tuple[Any, ...]]]:
        """The root rows, ``chunk_size`` at a time, on a pooled connection of their own.

        A server-side cursor needs a transaction: it is ended (closing the cursor) and the
        connection returned even when the consumer stops early or the task is cancelled.
        """
        sql, params = compiled.sql, compiled.params
        assert sql is not None
        alias = compiled.alias
        pool = await get_pool(alias)
        conn = await acquire(pool)
        try:
            if consistent:
                self._snapshot = await stoppable(conn, lambda: export_snapshot(conn), alias)
            if self._caller.connections[alias].settings_dict.get("DISABLE_SERVER_SIDE_CURSORS"):
                async for chunk in self._streamed(conn, compiled):
                    yield chunk
                return
            cursor = _ClientBindingServerCursor(conn, f"_async_prefetch_{next(_cursor_names)}")
            if not consistent:  # else in the snapshot's transaction already
                await stoppable(conn, lambda: conn.execute("BEGIN"), alias)
            started = time.perf_counter()
            await stoppable(conn, lambda: cursor.execute(sql, params), alias)
            self._log(conn, sql, params, time.perf_counter() - started)
            size = self._chunk_size
            while rows := await stoppable(conn, lambda: cursor.fetchmany(size), alias):
                yield rows
        finally:
            await release(conn, pool)  # ends the transaction (closing the cursor), shielded

    def _log(self, conn: AsyncConnection[Any], sql: str, params: Any, duration: float) -> None:
        """Report the root query where Django tooling looks (as Django's ``iterator()``
        reports its cursor's one ``execute()``), with its parameters inlined."""
        connection = self._caller.connections.get(self._queryset.db)
        if wants_log(connection):
            # The pool's cursors bind on the client unless ``server_side_binding``: Django
            # logs the SQL with its parameters inlined then, with placeholders otherwise.
            # (Not the server cursor's own mogrify(): it crashes psycopg 3.3 after execute.)
            client = conn.cursor_factory is AsyncClientCursor
            text = AsyncClientCursor(conn).mogrify(sql, params) if client else sql
            record_query(connection, self._queryset.db, sql, params, duration, text)

    async def _streamed(
        self, conn: AsyncConnection[Any], compiled: CompiledQuery
    ) -> AsyncGenerator[list[tuple[Any, ...]]]:
        """Without server-side cursors: the result in chunks as the server sends it."""
        sql, params = compiled.sql, compiled.params
        assert sql is not None
        async with conn.cursor() as cursor:
            started: float | None = time.perf_counter()
            chunk: list[tuple[Any, ...]] = []
            async for row in cursor.stream(sql, params, size=self._chunk_size):
                if started is not None:  # logged with the time to its first rows
                    self._log(conn, sql, params, time.perf_counter() - started)
                    started = None
                chunk.append(row)
                if len(chunk) == self._chunk_size:
                    yield chunk
                    chunk = []
            if started is not None:
                self._log(conn, sql, params, time.perf_counter() - started)
            if chunk:
                yield chunk
