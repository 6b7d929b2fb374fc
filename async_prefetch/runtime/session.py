"""The per-call session: what one prefetch call shares across all its runs.

A call (``aprefetch``, ``prefetch_related_objects``, ...) has one session: the caller's
context, the configuration, one concurrency limit, the executors by alias, the journal of
its writes, its trace and the memos its runs consult (a stream's chunks share one). A
queryset's own ``prefetch_related()`` lookups run as a nested run of the same session,
under the same limit. The session is also the scheduler's one door to I/O: running a
compiled query into instances or rows, and calling synchronous Django code that may query.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import anyio
from asgiref.sync import sync_to_async
from django.core.exceptions import SynchronousOnlyOperation
from django.db import DEFAULT_DB_ALIAS
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Model

from ..config import EngineConfig, load_config
from ..execution import Executor, Rows, executor_for
from ..execution.querylog import instrumented_like
from ..hydration.rows import row_builder
from ..sql.compiler import CompiledQuery
from .journal import Journal
from .memo import Memo, MemoSpec, memos_by_model
from .trace import RunTrace, current_trace

T = TypeVar("T")


@dataclass(frozen=True)
class CallerContext:
    """What the engine needs from the caller's side, captured there before any hop:
    its Django connections (transactions, query logs) and its ``tracing()`` block."""

    connections: dict[str, BaseDatabaseWrapper]
    trace: RunTrace | None = None
    #: Run every query on the caller's own connections, one at a time, instead of the
    #: pool (inside ``atomic``; the run then executes on the caller's side).
    caller_connections: bool = False

    @classmethod
    def capture(cls, trace: RunTrace | None = None) -> CallerContext:
        """Snapshot ``django.db.connections`` as seen from the calling thread or task."""
        from django.db import connections

        return cls({alias: connections[alias] for alias in connections}, trace or current_trace())

    def in_atomic(self) -> bool:
        """True when the caller holds an open transaction on any database."""
        return any(connection.in_atomic_block for connection in self.connections.values())

    def on_caller_connections(self) -> CallerContext:
        """This context, for a run whose queries go through the caller's connections."""
        return replace(self, caller_connections=True)


class Session:
    """State of one call, shared by its runs (see the module docstring)."""

    def __init__(self, caller: CallerContext, memo: MemoSpec = None) -> None:
        self.caller = caller
        #: The memos the session's runs consult, by model (see :mod:`.memo`).
        self.memos: dict[type[Model], Memo] = memos_by_model(memo)
        self.trace = caller.trace
        self.config: EngineConfig = load_config()
        self.limiter = anyio.CapacityLimiter(self.config.max_concurrency)
        self.journal = Journal()
        self._executors: dict[str, Executor] = {}

    def executor(self, alias: str) -> Executor:
        """The executor of this call for ``alias`` (made on first use)."""
        executor = self._executors.get(alias)
        if executor is None:
            executor = self._executors[alias] = executor_for(
                alias,
                self.caller.connections.get(alias),
                self.limiter,
                caller_connections=self.caller.caller_connections,
            )
        return executor

    async def fetch_instances(self, compiled: CompiledQuery) -> list[Model]:
        """Run ``compiled`` and build its instances from each batch of rows as it is
        read: the rows of a batch are garbage before the next batch is converted."""
        if compiled.sql is None:
            return []
        build = row_builder(compiled)
        instances: list[Model] = []
        # Once building needs the database (a model hook that queries), the remaining
        # rows are only kept: they are built on a worker thread after the connection is
        # back in the pool, not while it and the limiter's slot are held.
        for_thread: list[Rows] = []

        async def consume(rows: Rows) -> None:
            if not for_thread:
                try:
                    instances.extend(build(rows))
                    return
                except SynchronousOnlyOperation:
                    pass
            for_thread.append(rows)

        await self.executor(compiled.alias).fetch(compiled, consume)
        if for_thread:
            instances += await self.call_django(_build_all, build, for_thread)
        return instances

    async def fetch_rows(self, compiled: CompiledQuery) -> list[tuple[Any, ...]]:
        """Run ``compiled`` (a ``values_list()`` query) into its rows, converted by
        Django's converters as ``ValuesListIterable`` converts them."""
        if compiled.sql is None:
            return []
        compiler = compiled.compiler
        rows: list[tuple[Any, ...]] = []

        async def consume(batch: Rows) -> None:
            results: Any = (batch,)  # results_iter() takes any iterable of row batches
            rows.extend(map(tuple, compiler.results_iter(results=results)))

        await self.executor(compiled.alias).fetch(compiled, consume)
        return rows

    async def call_django(self, func: Callable[..., T], *args: Any) -> T:
        """Run synchronous Django code that may query, without blocking the event loop.

        On the caller's connections (inside ``atomic``) it runs on the caller's thread
        (whose connection holds the transaction and logs the queries itself); otherwise
        on a worker thread whose queries are reported to the caller's connections.
        """
        if self.caller.caller_connections:
            return await sync_to_async(func, thread_sensitive=True)(*args)
        callers = self.caller.connections
        result, queries = await anyio.to_thread.run_sync(
            _logging_queries, callers, func, *args, abandon_on_cancel=False
        )
        for alias, entries in queries.items():
            connection = callers.get(alias)
            if connection is not None and connection.queries_logged:
                connection.queries_log.extend(entries)
        return result

    async def sync_or_thread(self, func: Callable[..., T], *args: Any) -> T:
        """Call ``func`` here; if it needs the database (a property), via :meth:`call_django`.

        The calling task waits meanwhile, so the instances it owns are touched by one
        thread at a time (fetch tasks may build new instances on the loop meanwhile).
        """
        try:
            return func(*args)
        except SynchronousOnlyOperation:
            return await self.call_django(func, *args)


def alias_of(instances: Sequence[Any]) -> str:
    """The database the instances came from (Django routes their prefetches there)."""
    state = getattr(instances[0], "_state", None) if instances else None
    return getattr(state, "db", None) or DEFAULT_DB_ALIAS


def _build_all(build: Callable[[Rows], list[Model]], batches: list[Rows]) -> list[Model]:
    return [obj for rows in batches for obj in build(rows)]


def _logging_queries(
    callers: dict[str, BaseDatabaseWrapper], func: Callable[..., T], *args: Any
) -> tuple[T, dict[str, list[dict[str, str]]]]:
    """Call ``func`` on this worker thread and return the queries its connections ran.

    The queries run inside the caller's ``execute_wrappers`` and are shown to a
    debug-toolbar panel tracking the caller's connection (:func:`.querylog.instrumented_like`).
    The thread's connections are closed afterwards unless still usable and young
    (``close_old_connections``), as at the end of a Django request.
    """
    from django.db import close_old_connections, connections

    handlers = [connections[alias] for alias in connections]
    marks = [(conn, conn.force_debug_cursor, len(conn.queries_log)) for conn in handlers]
    for conn in handlers:
        conn.force_debug_cursor = True
    try:
        with contextlib.ExitStack() as stack:
            for conn in handlers:
                stack.enter_context(instrumented_like(callers.get(conn.alias), conn))
            result = func(*args)
        queries = {conn.alias: list(conn.queries_log)[start:] for conn, _, start in marks}
    finally:
        for conn, forced, _ in marks:
            conn.force_debug_cursor = forced
        close_old_connections()
    return result, queries
