"""``UnderLoadExecutor``: a query per pooled connection while the pool has one to give,
the rest of a stage in pipelines instead of queueing for connections one by one.

A query queued for a busy pool waits for a connection another query returns, then pays
a round trip of its own: a stage of ``n`` queries on ``c`` connections takes ``n / c``
waves of one round trip each. Sent as ``c`` pipelines, the same queries take one round
trip per connection; the server runs each pipeline's queries one after the other, so its
time is what the waves would have taken.
"""

from __future__ import annotations

import asyncio
import contextvars
from dataclasses import dataclass
from typing import Any

import psycopg
from django.db.backends.base.base import BaseDatabaseWrapper
from psycopg_pool import AsyncConnectionPool

from ..sql.compiler import CompiledQuery
from .base import Limiter, RowConsumer
from .pipeline import PooledPipelineExecutor, until_quiet
from .pool import PoolExecutor
from .pools import Promise, acquire, spare_connections

#: The promise of the direct query running in the current task (see ``_checkout``).
_promise: contextvars.ContextVar[Promise | None] = contextvars.ContextVar(
    "async_prefetch_promise", default=None
)


@dataclass(eq=False)
class _Surplus:
    query: CompiledQuery
    #: Set by the router: the pipeline the query joins, or ``None``: alone, as the pool's.
    route: asyncio.Future[PooledPipelineExecutor | None]


class UnderLoadExecutor(PoolExecutor):
    """One query per pooled connection while the pool can give one at once; the
    surplus of a stage in pipelines.

    A query that arrives while ``alias``'s pool has a spare connection (idle, or room
    to grow, and not promised to a query that has yet to check it out:
    :func:`.pools.spare_connections`) runs at once, as :class:`PoolExecutor` runs it.
    The others are the surplus: collected until the event loop goes quiet (a stage's
    queries arrive a scheduling round apart), then split, in arrival order, into as
    many pipelines as the pool has spare connections plus connections this executor's
    own queries hold (those come back first), at least one, and never more than there
    are queries; sizes differ by one at most. A pipeline of one query runs as the
    pool's; each other pipeline is sent in one round trip on one pooled connection,
    which goes back to the pool after it (:class:`.pipeline.PooledPipelineExecutor`):
    it takes one of the call's ``limiter`` slots, succeeds or fails whole, and is
    stopped in the server once every query of it is cancelled.
    """

    def __init__(
        self,
        alias: str,
        limiter: Limiter,
        log_connection: BaseDatabaseWrapper | None,
    ) -> None:
        super().__init__(alias, limiter, log_connection)
        self._surplus: list[_Surplus] = []
        self._arrivals = 0
        self._router: asyncio.Task[None] | None = None
        self._direct = 0  # queries of this executor on (or promised) a connection of their own

    async def fetch(self, query: CompiledQuery, consume: RowConsumer) -> None:
        """Run ``query`` and feed its rows to ``consume`` (see the class docstring)."""
        assert query.sql is not None
        pool = await self._get_pool()
        if not self._surplus and spare_connections(pool) > 0:
            await self._fetch_alone(pool, query, consume)
            return
        pipeline = await self._route(query)
        if pipeline is None:
            await self._fetch_alone(pool, query, consume)
        else:
            await pipeline.fetch(query, consume)

    async def _fetch_alone(
        self, pool: AsyncConnectionPool[Any], query: CompiledQuery, consume: RowConsumer
    ) -> None:
        promise = Promise(pool)
        token = _promise.set(promise)
        self._direct += 1
        try:
            await super().fetch(query, consume)
        finally:
            self._direct -= 1
            promise.kept()
            _promise.reset(token)

    async def _checkout(self, pool: AsyncConnectionPool[Any]) -> psycopg.AsyncConnection[Any]:
        # The promise ends when the pool counts the request: idle connections taken, or
        # a client waiting. Ended later, a connection the pool has handed over but the
        # query has not received yet would count twice.
        promise = _promise.get()
        try:
            return await acquire(pool, promise.kept if promise is not None else None)
        finally:
            if promise is not None:
                promise.kept()

    async def _route(self, query: CompiledQuery) -> PooledPipelineExecutor | None:
        surplus = _Surplus(query, asyncio.get_running_loop().create_future())
        self._surplus.append(surplus)
        self._arrivals += 1
        if self._router is None:
            self._router = asyncio.ensure_future(self._split())
        try:
            return await surplus.route
        except BaseException:
            if surplus in self._surplus:
                self._surplus.remove(surplus)
            raise

    async def _split(self) -> None:
        """Route the surplus collected until the loop goes quiet."""
        try:
            await until_quiet(lambda: self._arrivals)
        except BaseException:  # the loop closing: nothing was sent
            for waiting in self._surplus:
                waiting.route.cancel()
            self._surplus = []
            raise
        finally:
            self._router = None
        surplus, self._surplus = self._surplus, []
        if not surplus:  # every query of it cancelled meanwhile
            return
        assert self._pool is not None
        spare = max(0, spare_connections(self._pool))
        ways = max(1, min(len(surplus), spare + self._direct))
        size, extra = divmod(len(surplus), ways)
        start = 0
        for way in range(ways):
            part = surplus[start : start + size + (way < extra)]
            start += len(part)
            pipeline = None if len(part) == 1 else self._pipeline()
            for routed in part:
                if not routed.route.done():
                    routed.route.set_result(pipeline)

    def _pipeline(self) -> PooledPipelineExecutor:
        """A pipeline sent on a pooled connection of its own, returned after it."""
        return PooledPipelineExecutor(
            self._alias, self._limiter, self._log_connection, consistent=False, hold=False
        )
