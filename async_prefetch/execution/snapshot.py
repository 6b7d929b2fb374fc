"""``SnapshotExecutor``: a call's queries on pooled connections, concurrently, all seeing
one database snapshot (``consistent=True``).

The call's first query runs on a connection that opens ``BEGIN ISOLATION LEVEL
REPEATABLE READ READ ONLY`` and exports its snapshot (``pg_export_snapshot()``), in the
same round trip as the query; that connection stays in its transaction, checked out,
until the call ends (an exported snapshot can be imported only while its transaction is
open). Every other query runs on a pooled connection of its own, as on the pool, in a
``REPEATABLE READ READ ONLY`` transaction that imports the snapshot (``SET TRANSACTION
SNAPSHOT``) and is rolled back right after the query, all in the query's one round trip.
Queries that arrive while the snapshot is being exported wait for it.
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import anyio
import psycopg
from django.db import utils as django_db_utils
from django.db.backends.base.base import BaseDatabaseWrapper
from psycopg import sql as pg_sql
from psycopg_pool import AsyncConnectionPool

from ..sql.compiler import CompiledQuery
from .base import Limiter, RowConsumer, as_django_error
from .pool import PoolExecutor, stoppable
from .pools import acquire, get_pool
from .transactions import (
    BEGIN_CONSISTENT,
    begin_exporting,
    export_snapshot,
    exported_snapshot,
    release,
)

#: Set in the task running the call's first query: its connection exports the snapshot.
_exporting: contextvars.ContextVar[bool] = contextvars.ContextVar("_exporting", default=False)


class SnapshotExecutor(PoolExecutor):
    """One pooled connection per query (see :class:`PoolExecutor`), every query seeing
    the snapshot of the call's first one, or ``snapshot`` when given (an id exported by
    a transaction that stays open while the call runs). :meth:`aclose` (awaited when the
    call ends) ends the exporting transaction and returns its connection."""

    def __init__(
        self,
        alias: str,
        limiter: Limiter,
        log_connection: BaseDatabaseWrapper | None,
        *,
        snapshot: str | None = None,
    ) -> None:
        super().__init__(alias, limiter, log_connection)
        self._snapshot = snapshot
        self._claimed = snapshot is not None
        self._exported = asyncio.Event()
        if snapshot is not None:
            self._exported.set()
        self._exporter: psycopg.AsyncConnection[Any] | None = None
        self._exporter_pool: AsyncConnectionPool[Any] | None = None
        self._closed = False

    @property
    def snapshot(self) -> str | None:
        """The id of the snapshot the call's queries see, once known."""
        return self._snapshot

    async def fetch(self, query: CompiledQuery, consume: RowConsumer) -> None:
        if not self._claimed:  # the call's first query: it takes the snapshot
            self._claimed = True
            token = _exporting.set(True)
            try:
                await super().fetch(query, consume)
            finally:
                _exporting.reset(token)
                self._exported.set()  # waiters see whether a snapshot was taken
            return
        await self._exported.wait()
        if self._snapshot is None:
            raise django_db_utils.DatabaseError(
                "async_prefetch: not run: the call's snapshot could not be taken"
            )
        await super().fetch(query, consume)

    async def snapshot_id(self) -> str:
        """The id of the call's snapshot, exported now (a round trip of its own) when no
        query has taken it yet; ``DatabaseError`` when it could not be taken."""
        if not self._claimed:
            self._claimed = True
            try:
                await self._export()
            finally:
                self._exported.set()
        await self._exported.wait()
        if self._snapshot is None:
            raise django_db_utils.DatabaseError(
                "async_prefetch: the call's snapshot could not be taken"
            )
        return self._snapshot

    async def _export(self) -> None:
        pool = await get_pool(self._alias)
        async with self._limiter:
            conn = await self._checkout_exporter(pool)
            try:
                self._snapshot = await stoppable(conn, lambda: export_snapshot(conn), self._alias)
            except BaseException as exc:
                with anyio.CancelScope(shield=True):
                    await self._checkin(pool, conn)
                if isinstance(exc, psycopg.Error):
                    raise as_django_error(exc) from exc
                raise

    async def _checkout_exporter(
        self, pool: AsyncConnectionPool[Any]
    ) -> psycopg.AsyncConnection[Any]:
        token = _exporting.set(True)
        try:
            return await self._checkout(pool)
        finally:
            _exporting.reset(token)

    async def _checkout(self, pool: AsyncConnectionPool[Any]) -> psycopg.AsyncConnection[Any]:
        if self._closed:
            raise RuntimeError("async_prefetch: the call's snapshot is released")
        conn = await acquire(pool)
        if _exporting.get():
            self._exporter, self._exporter_pool = conn, pool
        return conn

    async def _checkin(
        self, pool: AsyncConnectionPool[Any], conn: psycopg.AsyncConnection[Any]
    ) -> None:
        if conn is self._exporter and self._snapshot is not None:
            return  # held, in its transaction, until the call ends
        if conn is self._exporter:
            self._exporter = self._exporter_pool = None
        await release(conn, pool)

    async def _run_query(self, cursor: Any, sql: str, params: Any) -> None:
        conn = cursor.connection
        exporting = conn is self._exporter and self._snapshot is None
        snapshot = self._snapshot

        async def run() -> None:
            async with conn.pipeline():
                if exporting:
                    exported = await begin_exporting(conn)
                else:
                    await conn.execute(BEGIN_CONSISTENT)
                    await conn.execute(pg_sql.SQL("SET TRANSACTION SNAPSHOT {}").format(snapshot))
                await cursor.execute(sql, params)
                if not exporting:
                    await conn.execute("ROLLBACK")
            if exporting:
                self._snapshot = await exported_snapshot(exported)

        await stoppable(conn, run, self._alias)

    async def aclose(self) -> None:
        """End the exporting transaction and return its connection to the pool."""
        self._closed = True
        conn, pool = self._exporter, self._exporter_pool
        self._exporter = self._exporter_pool = None
        await release(conn, pool)
