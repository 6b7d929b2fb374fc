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
import copy
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import anyio
from django.core.exceptions import SynchronousOnlyOperation
from django.db import DEFAULT_DB_ALIAS
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Model
from psycopg import sql as pg_sql

from .. import _compat
from ..access.modes import PrefetchMode
from ..config import EngineConfig, load_config
from ..execution import Executor, Rows, executor_for, new_limiter
from ..execution.caller_thread import on_caller_thread
from ..execution.querylog import instrumented_like
from ..hydration.rows import RowLink, row_builder
from ..sql.compiler import CompiledQuery
from .journal import Journal
from .memo import Memo, MemoSpec, memos_by_model
from .trace import RunTrace, current_trace

T = TypeVar("T")


class CallScope:
    """What a call holds until it ends (a pipeline's pooled connection, its transaction),
    released by :meth:`aclose`, newest first, also when the call fails or is cancelled."""

    def __init__(self) -> None:
        self._closers: list[Callable[[], Awaitable[None]]] = []

    def on_close(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Await ``closer()`` when the call ends."""
        self._closers.append(closer)

    async def aclose(self) -> None:
        """Release everything, shielded from cancellation."""
        with anyio.CancelScope(shield=True):
            while self._closers:
                await self._closers.pop()()


@dataclass(frozen=True)
class CallerContext:
    """What the engine needs from the caller's side, captured there before any hop:
    its Django connections (transactions, query logs) and its ``tracing()`` block."""

    connections: dict[str, BaseDatabaseWrapper]
    trace: RunTrace | None = None
    #: Run every query on the caller's own connections instead of the pool (inside
    #: ``atomic``; the run then executes on the caller's side).
    caller_connections: bool = False
    #: ``consistent=True``: every query of the call sees one snapshot; ``None``: the
    #: setting's ``CONSISTENT``.
    consistent: bool | None = None
    #: ``round_trips=1``: each stage's queries in one pipeline on one pooled connection.
    round_trips: int | None = None
    #: Where the call's executors leave what they hold until the call ends
    #: (:func:`in_call_scope`); ``None``: nothing may be held.
    scope: CallScope | None = field(default=None, compare=False)

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

    def with_options(
        self, *, consistent: bool | None = None, round_trips: int | None = None
    ) -> CallerContext:
        """This context, with a call's ``consistent`` and ``round_trips`` options
        (``ValueError`` for a ``round_trips`` other than ``None`` or 1)."""
        _check_round_trips(round_trips)
        return replace(self, consistent=consistent, round_trips=round_trips)


def in_call_scope(
    func: Callable[..., Coroutine[Any, Any, T]],
    *,
    consistent: bool | None = None,
    round_trips: int | None = None,
) -> Callable[..., Coroutine[Any, Any, T]]:
    """``func(*args, caller)`` with the call's ``consistent`` and ``round_trips``
    options and a fresh :class:`CallScope` on ``caller``, released when ``func`` returns
    or raises: the form of the runners that :func:`..dispatch.run_async` and
    :func:`..dispatch.run_sync` call. ``ValueError`` (now) for a ``round_trips`` other
    than ``None`` or 1."""
    _check_round_trips(round_trips)

    async def run(*args: Any) -> T:
        *rest, caller = args
        scope = CallScope()
        try:
            options = caller.with_options(consistent=consistent, round_trips=round_trips)
            return await func(*rest, replace(options, scope=scope))
        finally:
            await scope.aclose()

    return run


class Session:
    """State of one call, shared by its runs (see the module docstring)."""

    def __init__(
        self, caller: CallerContext, memo: MemoSpec = None, mode: PrefetchMode | None = None
    ) -> None:
        self.caller = caller
        #: The fetch mode of the call's roots (see :mod:`..access.modes`): the modes of
        #: the instances its levels build derive from their parents' (or this one).
        self.root_mode = mode
        #: The memos the session's runs consult, by model (see :mod:`.memo`).
        self.memos: dict[type[Model], Memo] = memos_by_model(memo)
        self.trace = caller.trace
        self.config: EngineConfig = load_config()
        self.limiter = new_limiter(self.config.max_concurrency)
        self.journal = Journal()
        #: Snapshot ids (``pg_export_snapshot()``) by alias that a ``consistent`` call's
        #: queries import, each exported by a transaction that stays open while the call
        #: runs (a stream's root cursor); set before the call's first query there.
        self.snapshots: dict[str, str] = {}
        self._executors: dict[str, Executor] = {}

    def fork(self) -> Session:
        """A session for a run concurrent with this one's: the same caller, config,
        limit, executors, memos and trace; a journal of its own."""
        other = copy.copy(self)
        other.journal = Journal()
        return other

    @property
    def consistent(self) -> bool:
        """Whether every query of the call sees one snapshot (the call's option, else the
        ``CONSISTENT`` setting)."""
        consistent = self.caller.consistent
        return self.config.consistent if consistent is None else consistent

    def executor(self, alias: str) -> Executor:
        """The executor of this call for ``alias`` (made on first use)."""
        executor = self._executors.get(alias)
        if executor is None:
            caller = self.caller
            executor = self._executors[alias] = executor_for(
                alias,
                caller.connections.get(alias),
                self.limiter,
                caller_connections=caller.caller_connections,
                config=self.config,
                consistent=self.consistent,
                round_trips=caller.round_trips,
                scope=caller.scope,
                snapshot=self.snapshots.get(alias),
            )
        return executor

    async def fetch_instances(
        self, compiled: CompiledQuery, link: RowLink | None = None
    ) -> list[Model]:
        """Run ``compiled`` and build its instances from each batch of rows as it is
        read: the rows of a batch are garbage before the next batch is converted.
        ``link``: see :func:`~async_prefetch.hydration.rows.row_builder`."""
        if compiled.sql is None:
            return []
        build = row_builder(compiled, link=link)
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
        convert = _compat.rows_converter(compiled.compiler)
        rows: list[tuple[Any, ...]] = []

        async def consume(batch: Rows) -> None:
            rows.extend(map(tuple, convert(batch)))

        await self.executor(compiled.alias).fetch(compiled, consume)
        return rows

    async def call_django(self, func: Callable[..., T], *args: Any) -> T:
        """Run synchronous Django code that may query, without blocking the event loop.

        On the caller's connections (inside ``atomic``) it runs on the caller's thread
        (whose connection holds the transaction and logs the queries itself); otherwise
        on a worker thread whose queries are reported to the caller's connections. In a
        ``consistent`` call, the worker's connections to the databases the call has
        queried, or whose instances are among ``args``, run ``func`` in a transaction that
        imports the call's snapshot there.
        """
        if self.caller.caller_connections:
            return await on_caller_thread(func, *args)
        callers = self.caller.connections
        result, queries = await anyio.to_thread.run_sync(
            _logging_queries,
            callers,
            await self._snapshots(args),
            func,
            *args,
            abandon_on_cancel=False,
        )
        for alias, entries in queries.items():
            connection = callers.get(alias)
            if connection is not None and connection.queries_logged:
                connection.queries_log.extend(entries)
        return result

    async def _snapshots(self, args: Sequence[Any]) -> dict[str, str]:
        """The snapshot id of each database a ``consistent`` call has queried, or whose
        instances are among ``args`` (exported now if none is yet)."""
        snapshots: dict[str, str] = {}
        if self.consistent:
            aliases = [*self._executors, *_aliases_in(args)]
            for alias in dict.fromkeys(aliases):
                snapshot_id = getattr(self.executor(alias), "snapshot_id", None)
                if snapshot_id is not None:
                    snapshots[alias] = await snapshot_id()
        return snapshots

    async def sync_or_thread(self, func: Callable[..., T], *args: Any) -> T:
        """Call ``func`` here; if it needs the database (a property), via :meth:`call_django`.

        The calling task waits meanwhile, so the instances it owns are touched by one
        thread at a time (fetch tasks may build new instances on the loop meanwhile).
        """
        try:
            return func(*args)
        except SynchronousOnlyOperation:
            return await self.call_django(func, *args)


def _check_round_trips(round_trips: int | None) -> None:
    if round_trips is not None and (isinstance(round_trips, bool) or round_trips != 1):
        raise ValueError(f"round_trips must be 1 or None, not {round_trips!r}.")


def alias_of(instances: Sequence[Any]) -> str:
    """The database the instances came from (Django routes their prefetches there)."""
    state = getattr(instances[0], "_state", None) if instances else None
    return getattr(state, "db", None) or DEFAULT_DB_ALIAS


def _aliases_in(args: Sequence[Any]) -> list[str]:
    """The databases of the model instances among ``args`` (or first in a list of them)."""
    aliases = []
    for arg in args:
        first = arg[0] if isinstance(arg, list | tuple) and arg else arg
        if isinstance(first, Model):
            aliases.append(alias_of([first]))
    return aliases


def _build_all(build: Callable[[Rows], list[Model]], batches: list[Rows]) -> list[Model]:
    return [obj for rows in batches for obj in build(rows)]


def _logging_queries(
    callers: dict[str, BaseDatabaseWrapper],
    snapshots: dict[str, str],
    func: Callable[..., T],
    *args: Any,
) -> tuple[T, dict[str, list[dict[str, str]]]]:
    """Call ``func`` on this worker thread and return the queries its connections ran.

    On each alias of ``snapshots`` the thread's connection runs ``func`` in an ``atomic``
    block whose ``REPEATABLE READ`` transaction imports that snapshot (not logged).

    The queries run inside the caller's ``execute_wrappers`` and are shown to a
    debug-toolbar panel tracking the caller's connection (:func:`.querylog.instrumented_like`).
    The thread's connections are closed afterwards unless still usable and young
    (``close_old_connections``), as at the end of a Django request.
    """
    from django.db import close_old_connections, connections, transaction

    handlers = [connections[alias] for alias in connections]
    marks = [(conn, conn.force_debug_cursor, len(conn.queries_log)) for conn in handlers]
    for conn in handlers:
        conn.force_debug_cursor = True
    try:
        with contextlib.ExitStack() as stack:
            for conn in handlers:
                stack.enter_context(instrumented_like(callers.get(conn.alias), conn))
            for alias, snapshot in snapshots.items():
                stack.enter_context(transaction.atomic(using=alias))
                _import_snapshot(connections[alias], snapshot)
            result = func(*args)
        queries = {conn.alias: list(conn.queries_log)[start:] for conn, _, start in marks}
        for alias in snapshots:  # the snapshot's transaction is the engine's, not func's
            entries = queries[alias]
            if entries and entries[0]["sql"] == "BEGIN":
                del entries[0]
            if entries and entries[-1]["sql"] in ("COMMIT", "ROLLBACK"):
                del entries[-1]
    finally:
        for conn, forced, _ in marks:
            conn.force_debug_cursor = forced
        close_old_connections()
    return result, queries


def _import_snapshot(connection: BaseDatabaseWrapper, snapshot: str) -> None:
    """Make the transaction ``connection`` has just opened (``atomic``, no query yet)
    ``REPEATABLE READ`` on ``snapshot``, on the driver's connection (Django logs nothing)."""
    connection.ensure_connection()
    raw = connection.connection
    raw.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    raw.execute(pg_sql.SQL("SET TRANSACTION SNAPSHOT {}").format(snapshot))
