"""The engine: runs a plan with one linking task and concurrent fetch tasks.

The task that calls :func:`run_prefetch` is the only one that touches instances anyone
else can see: it decides each level (Django's ``get_prefetcher`` and ``is_fetched``),
builds and compiles its query, fills caches and starts the children. Each fetch task
runs one query and builds new instances from its rows as they are read, batch by batch,
without awaiting within a batch; it only reads existing instances (known related
objects), and hands the new ones over when done. A failure anywhere cancels the
remaining fetches and restores every pre-existing instance from the journal.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectSendStream
from asgiref.sync import sync_to_async
from django.core import exceptions
from django.core.exceptions import SynchronousOnlyOperation
from django.db import DEFAULT_DB_ALIAS
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Model, QuerySet
from django.db.models.query import get_prefetcher

from . import _compat
from .builders import (
    RelationQuery,
    build_relation_query,
    key_values,
    take_additional_lookups,
)
from .cached_querysets import queryset_maker
from .compiler import CompiledQuery, compile_queryset
from .config import load_config
from .executor import CallerConnectionExecutor, Executor, PoolExecutor, Rows
from .hydrator import row_builder
from .journal import Journal
from .planner import (
    Level,
    Plan,
    already_seen,
    cannot_find,
    normalize,
    not_prefetchable,
    to_attr_conflict,
)
from .querylog import instrumented_like
from .trace import ROOT_KEY, RunTrace, StepTrace, current_trace

__all__ = ["CallerContext", "run_prefetch"]

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


@dataclass(eq=False)
class _Part:
    """One query of a level: all of its parents, or one chunk of a long key list."""

    relation: RelationQuery
    compiled: CompiledQuery
    related: list[Model] | None = None  # its instances, once handed to the linking task
    step: StepTrace | None = None


@dataclass(eq=False)
class _Fetch:
    """A level's queries in flight: the objects they fetch for and how to match results.

    No parts: the level is delegated to Django's own builder on a worker thread.
    """

    level: Level
    instances: list[Model]
    parts: list[_Part]
    prefetcher: Any = None
    step: StepTrace | None = None  # delegated levels' trace step (parts have their own)


async def run_prefetch(
    instances: list[Model],
    lookups: Sequence[Any],
    caller: CallerContext,
    *,
    root_queryset: QuerySet[Any] | None = None,
) -> list[Model]:
    """Prefetch ``lookups`` onto ``instances`` (or the rows of ``root_queryset``).

    Returns the instances. On any failure or cancellation the instances are left as
    they were and no pooled connection stays checked out.
    """
    run = _Run(caller)
    return await run.execute(instances, lookups, root_queryset)


class _Run:
    def __init__(self, caller: CallerContext, outer: _Run | None = None) -> None:
        self._caller = caller
        self._config = load_config()
        # A nested run (a queryset's own lookups) shares its caller's limit and executors.
        self._limiter: anyio.CapacityLimiter = (
            outer._limiter if outer else anyio.CapacityLimiter(self._config.max_concurrency)
        )
        self._executors: dict[str, Executor] = outer._executors if outer else {}
        self._journal = Journal()
        self._plan: Plan
        self._roots: list[Model] = []
        self._pending = 0
        self._deferred: list[Level] = []
        self._rejections: list[tuple[tuple[int, ...], str]] = []
        self._tg: TaskGroup
        self._send: MemoryObjectSendStream[tuple[_Fetch, Any]]

    # -- entry -------------------------------------------------------------------

    async def execute(
        self, instances: list[Model], lookups: Sequence[Any], root_queryset: QuerySet[Any] | None
    ) -> list[Model]:
        normalized = normalize(lookups)
        if root_queryset is not None:
            compiled = compile_queryset(root_queryset)
            trace = self._caller.trace
            step = trace.start(ROOT_KEY, "query", compiled.sql, compiled.params) if trace else None
            instances = await self._fetch_instances(compiled)
            self._journal.mark_created(instances)
            if trace is not None and step is not None:
                trace.finish(step, len(instances))
        if not instances or not normalized or not _accept_caches(instances):
            return instances
        self._plan = Plan(instances[0])
        invalid: Exception | None = None
        try:
            self._plan.add_lookups(normalized, ())
        except (AttributeError, ValueError) as error:
            # The plan holds the lookups before the invalid one. If none of them can
            # fail, Django certainly reaches this error: raise it before any query.
            # Otherwise run them first, as Django does, so its first error wins.
            if not self._plan.may_raise():
                raise
            invalid = error
        self._roots = instances
        try:
            if self._plan.roots:
                await self._run_graph()
            if invalid is not None:
                raise invalid
        except BaseException:
            self._journal.rollback()
            raise
        return instances

    async def _run_graph(self) -> None:
        send, receive = anyio.create_memory_object_stream[tuple[_Fetch, Any]](math.inf)
        self._send = send
        error: BaseException | None = None
        try:
            async with anyio.create_task_group() as tg, send, receive:
                self._tg = tg
                for level in list(self._plan.roots):
                    await self._schedule(level)
                self._raise_rejection()
                while self._pending:
                    fetch, payload = await receive.receive()
                    self._pending -= 1
                    await self._on_fetched(fetch, payload)
                    self._raise_rejection()
                self._raise_rejection()
        except BaseExceptionGroup as group:
            error = _primary_error(group)
        if error is not None:
            # Raised outside the handler: the error keeps its own cause (the driver's
            # error under Django's) and context instead of the group's.
            raise error
        unfinished = [level.key for level in self._plan.levels.values() if not level.done]
        assert not unfinished, f"levels never ran: {unfinished}"

    def _raise_rejection(self) -> None:
        """Raise Django's "already seen" error for the first rejected lookup in Django's
        order, once no undecided level could be rejected for an earlier lookup."""
        if not self._rejections:
            return
        first, key = min(self._rejections)
        if any(
            level.requeried_by is not None
            and level.requeried_by < first
            and not level.started
            and not level.done
            for level in self._plan.levels.values()
        ):
            return
        raise already_seen(key)

    # -- scheduling ----------------------------------------------------------------

    async def _schedule(self, level: Level) -> None:
        """Start ``level`` now if Django would have run its predecessors, else defer it."""
        if self._plan.blockers(level):
            self._deferred.append(level)
            return
        await self._start(level, self._parent_objects(level))

    def _parent_objects(self, level: Level) -> list[Any]:
        return self._roots if level.parent is None else level.parent.result

    async def _finish(self, level: Level, objects: list[Any] | None) -> None:
        """Record ``level``'s objects and start its children (or skip them: no objects)."""
        level.done = True
        level.result = objects or []
        if objects:
            for child in list(level.children):
                await self._schedule(child)
        else:
            _skip_descendants(level)
        await self._release_deferred()

    async def _release_deferred(self) -> None:
        """Start deferred levels whose blockers are done (starting one may finish others)."""
        while True:
            ready = next(
                (level for level in self._deferred if level.done or not self._plan.blockers(level)),
                None,
            )
            if ready is None:
                return
            self._deferred.remove(ready)
            if not ready.done:
                await self._start(ready, self._parent_objects(ready))

    async def _start(self, level: Level, obj_list: list[Any]) -> None:
        """One step of Django's ``prefetch_related_objects`` loop for ``level``."""
        level.started = True
        step = await self._sync_or_thread(self._decide, level, obj_list)
        trace = self._caller.trace
        if isinstance(step, _Fetch):
            self._raise_rejection()  # before its query is sent: Django's error is certain
            self._launch(step)
            # Let the new fetch tasks start before this task builds and compiles the
            # next level's query: each sends its own a scheduling round or two later
            # (limiter, pool, its query task), while later siblings are still being
            # compiled, so the server works while the loop compiles. Nothing here
            # waits for a connection.
            await anyio.lowlevel.checkpoint()
        else:
            if trace is not None and step is not None:
                trace.finish(trace.start(level.key, "walk"), len(step))
            await self._finish(level, step)

    def _launch(self, fetch: _Fetch) -> None:
        """Start a fetch task per part (per chunk), or one for a delegated level."""
        trace = self._caller.trace
        key = fetch.level.key
        if not fetch.parts:
            if trace is not None:
                fetch.step = trace.start(key, "django")
            self._pending += 1
            self._tg.start_soon(self._fetch_delegated, fetch)
            return
        chunks = len(fetch.parts)
        for number, part in enumerate(fetch.parts, 1):
            if trace is not None:
                name = key if chunks == 1 else f"{key} #{number}/{chunks}"
                part.step = trace.start(name, "query", part.compiled.sql, part.compiled.params)
            self._pending += 1
            self._tg.start_soon(self._fetch_part, fetch, part)

    def _decide(self, level: Level, obj_list: list[Any]) -> _Fetch | list[Any] | None:
        """Fetch (a ``_Fetch`` to run), walk (the next objects) or stop (``None``)."""
        if not obj_list or not _accept_caches(obj_list):
            return None
        first_obj = obj_list[0]
        prefetcher, descriptor, attr_found, is_fetched = get_prefetcher(
            first_obj, level.through_attr, level.to_attr
        )
        if not attr_found:
            raise cannot_find(
                level.through_attr, first_obj.__class__.__name__, level.lookup.prefetch_through
            )
        if level.terminal_for and prefetcher is None:
            raise not_prefetchable(level.terminal_for[0].prefetch_through)
        if prefetcher is not None:
            fetched: Callable[[Any], bool] = is_fetched  # type: ignore[assignment]
            obj_to_fetch = [obj for obj in obj_list if not fetched(obj)]
            if obj_to_fetch:
                if level.requeried_by is not None:
                    # Django would fetch this path, then reject the later queryset
                    # when it reaches that lookup: the first such lookup wins.
                    self._rejections.append((level.requeried_by, level.key))
                if level.as_attr:
                    # Django checks this after the query; the outcome is the same.
                    _check_to_attr(type(obj_to_fetch[0]), level.to_attr)
                relations = self._relations(descriptor, prefetcher, obj_to_fetch, level.querysets())
                parts = [_Part(rel, compile_queryset(rel.queryset)) for rel in relations]
                return _Fetch(level, obj_to_fetch, parts, prefetcher)
        # Already fetched (select_related, an earlier lookup) or not a relation at all
        # (a property): walk on through the attribute's values.
        return _traverse(obj_list, level.through_attr)

    def _relations(
        self, descriptor: Any, prefetcher: Any, parents: list[Model], querysets: list[Any] | None
    ) -> list[RelationQuery]:
        """The level's queries: one, one per chunk of at most ``CHUNK_SIZE`` parent keys,
        or none when the relation kind is delegated to Django.

        Parents are grouped by their match key first, so each related row is fetched by
        exactly one chunk (one instance per row, as Django's single query gives). Levels
        whose queryset has its own ``prefetch_related()`` lookups are not split.
        """
        size = self._config.chunk_size
        if size is None or len(parents) <= size:
            relation = build_relation_query(descriptor, prefetcher, parents, querysets)
            return [] if relation is None else [relation]
        # Key functions and lookups do not depend on the parents: learn them from one.
        probe = build_relation_query(descriptor, prefetcher, parents[:1], querysets)
        if probe is None:
            return []
        groups: dict[Any, list[Model]] = {}
        for key, parent in zip(key_values(probe.instance_attr, parents), parents, strict=True):
            groups.setdefault(key, []).append(parent)
        chunks = [parents]
        if len(groups) > size and not probe.additional_lookups:
            grouped = list(groups.values())
            chunks = [
                [parent for group in grouped[start : start + size] for parent in group]
                for start in range(0, len(grouped), size)
            ]
        relations = []
        for chunk in chunks:
            relation = build_relation_query(descriptor, prefetcher, chunk, querysets)
            assert relation is not None  # the probe's relation kind
            relations.append(relation)
        if querysets:  # Django hints the Prefetch queryset with the first parent
            querysets[0]._add_hints(instance=parents[0])
        return relations

    # -- fetching ------------------------------------------------------------------

    async def _fetch_part(self, fetch: _Fetch, part: _Part) -> None:
        instances = await self._fetch_instances(part.compiled)
        await self._send.send((fetch, (part, instances)))

    async def _fetch_delegated(self, fetch: _Fetch) -> None:
        payload = await self._call_django(
            _django_prefetch_querysets, fetch.prefetcher, fetch.instances, fetch.level.querysets()
        )
        await self._send.send((fetch, payload))

    async def _fetch_instances(self, compiled: CompiledQuery) -> list[Model]:
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

        await self._executor(compiled.alias).fetch(compiled, consume)
        if for_thread:
            instances += await self._call_django(_build_all, build, for_thread)
        return instances

    def _executor(self, alias: str) -> Executor:
        executor = self._executors.get(alias)
        if executor is None:
            caller_connection = self._caller.connections.get(alias)
            if caller_connection is not None and caller_connection.vendor != "postgresql":
                raise exceptions.ImproperlyConfigured(
                    f"async_prefetch cannot run queries on database {alias!r} "
                    f"({caller_connection.vendor}); only PostgreSQL is supported."
                )
            if self._caller.caller_connections:
                assert caller_connection is not None
                executor = CallerConnectionExecutor(caller_connection)
            else:
                executor = PoolExecutor(alias, self._limiter, caller_connection)
            self._executors[alias] = executor
        return executor

    # -- linking -------------------------------------------------------------------

    async def _on_fetched(self, fetch: _Fetch, payload: Any) -> None:
        level = fetch.level
        links: list[tuple[RelationQuery, list[Model]]]
        if fetch.parts:
            part, related = payload
            part.related = related
            self._mark_created(level, part.relation, related)
            if part.step is not None and self._caller.trace is not None:
                self._caller.trace.finish(part.step, len(related))
            links = [(p.relation, p.related) for p in fetch.parts if p.related is not None]
            if len(links) < len(fetch.parts):
                return  # linked once every chunk is in
            relation = links[0][0]
            if relation.link_back is not None and relation.additional_lookups:
                # Django's builder evaluated the queryset, its prefetches included,
                # before writing the reverse caches (which skip cached relations).
                # (Such levels are never split: there is one part.)
                await _Run(self._caller, self).execute(
                    links[0][1], relation.additional_lookups, None
                )
            related = [obj for _, objs in links for obj in objs]
        else:
            relation, related = payload
            self._mark_created(level, relation, related)
            links = [(relation, related)]
        level.fetched = True
        await self._sync_or_thread(self._link_and_assign, level, fetch.instances, links, related)
        if fetch.step is not None and self._caller.trace is not None:
            self._caller.trace.finish(fetch.step, len(related))
        if relation.additional_lookups:
            auto = normalize(relation.additional_lookups, level.key)
            # Django runs these right after the current lookup, before the next one,
            # the deepest level's first.
            order = (*level.order[0], -level.depth)
            self._plan.add_lookups(auto, order, parent=level)
        await self._finish(level, related)

    def _mark_created(self, level: Level, relation: RelationQuery, related: list[Model]) -> None:
        """Tell the journal about built instances that will be parents (this level has
        children, or will have its queryset's own lookups): only parents are written to
        and so looked up there. Recording leaf instances would cost memory for nothing;
        writes to an unrecorded one are merely journaled."""
        if level.children or relation.additional_lookups:
            self._journal.mark_created(related)

    def _link_and_assign(
        self,
        level: Level,
        instances: list[Model],
        links: list[tuple[RelationQuery, list[Model]]],
        related: list[Model],
    ) -> None:
        """Reverse caches on the related objects (per query), then the parents' caches.

        Key functions may read deferred fields (one query each, as in Django), so
        this may run on a worker thread; repeating it after a partial run is harmless.
        """
        relation = links[0][0]
        keys: list[Any] | None = None
        if relation.link_back is not None:
            keys = []
            for part, objs in links:
                assert part.link_back is not None  # every chunk's comes from one builder
                keys += part.link_back(objs)
        self._assign(level, instances, relation, related, keys)

    async def _call_django(self, func: Callable[..., T], *args: Any) -> T:
        """Run synchronous Django code that may query, without blocking the event loop.

        On the caller's connections (inside ``atomic``) it runs on the caller's thread
        (whose connection holds the transaction and logs the queries itself); otherwise
        on a worker thread whose queries are reported to the caller's connections.
        """
        if self._caller.caller_connections:
            return await sync_to_async(func, thread_sensitive=True)(*args)
        result, queries = await anyio.to_thread.run_sync(
            _logging_queries, self._caller.connections, func, *args, abandon_on_cancel=False
        )
        for alias, entries in queries.items():
            connection = self._caller.connections.get(alias)
            if connection is not None and connection.queries_logged:
                connection.queries_log.extend(entries)
        return result

    async def _sync_or_thread(self, func: Callable[..., T], *args: Any) -> T:
        """Call ``func`` here; if it needs the database (a property), via ``_call_django``.

        The calling task waits meanwhile, so the instances it owns are touched by one
        thread at a time (fetch tasks may build new instances on the loop meanwhile).
        """
        try:
            return func(*args)
        except SynchronousOnlyOperation:
            return await self._call_django(func, *args)

    def _assign(
        self,
        level: Level,
        instances: list[Model],
        relation: RelationQuery,
        related: list[Model],
        keys: list[Any] | None,
    ) -> None:
        """Fill caches on ``instances`` as Django's ``prefetch_one_level`` does.

        ``keys`` are ``related``'s ``rel_obj_attr`` keys when ``link_back`` read them.
        """
        rel_obj_cache: dict[Any, list[Model]] = {}
        if keys is None:
            keys = key_values(relation.rel_obj_attr, related)
        for key, rel_obj in zip(keys, related, strict=True):
            rel_obj_cache.setdefault(key, []).append(rel_obj)
        lookup = level.lookup
        to_attr, as_attr = level.to_attr, level.as_attr
        leaf_queryset: Any = lookup.queryset if level.is_leaf else None
        cache_name = relation.cache_name
        instance_attr = relation.instance_attr
        journal = self._journal
        if not (relation.single or as_attr or leaf_queryset is not None):
            # A to-many relation into the prefetch cache, the common case: its loop alone.
            # It writes no attribute a key reads, so the keys can be read first, at once.
            make_queryset = queryset_maker(instances, to_attr)
            parent_keys = key_values(instance_attr, instances)
            made_querysets = []
            for obj, parent_key in zip(instances, parent_keys, strict=True):
                made: Any = make_queryset(obj)
                made._result_cache = rel_obj_cache.get(parent_key, [])
                made._prefetch_done = True
                made_querysets.append(made)
            caches = [obj._prefetched_objects_cache for obj in instances]  # type: ignore[attr-defined]
            journal.set_items(instances, caches, cache_name, made_querysets)
            return
        for obj in instances:  # a key read, then the writes, per parent as in Django
            vals = rel_obj_cache.get(instance_attr(obj), [])
            if relation.single:
                val = vals[0] if vals else None
                if as_attr:
                    journal.set_attribute(obj, to_attr, val)
                elif relation.is_descriptor:
                    journal.set_attribute(obj, cache_name, val)
                else:
                    journal.set_item(obj, obj._state.fields_cache, cache_name, val)
            elif as_attr:
                journal.set_attribute(obj, to_attr, vals)
            else:  # a leaf Prefetch queryset, filtered per parent as Django does
                source = leaf_queryset._chain() if _compat.CHAIN_LEAF_QUERYSET else leaf_queryset
                qs: Any = getattr(obj, to_attr)._apply_rel_filters(source)
                qs._result_cache = vals
                qs._prefetch_done = True
                cache = obj._prefetched_objects_cache  # type: ignore[attr-defined]
                journal.set_item(obj, cache, cache_name, qs)


def _accept_caches(obj_list: list[Any]) -> bool:
    """Give every object a prefetch cache, as Django's loop does before each step; False
    (the step and its lookup's rest are skipped, quietly, as in Django) as soon as one
    cannot have one (``None``, a dict or tuple of ``values()``, an ``int``)."""
    for obj in obj_list:
        if not hasattr(obj, "_prefetched_objects_cache"):
            try:
                obj._prefetched_objects_cache = {}
            except (AttributeError, TypeError):
                return False
    return True


def _build_all(build: Callable[[Rows], list[Model]], batches: list[Rows]) -> list[Model]:
    return [obj for rows in batches for obj in build(rows)]


def alias_of(instances: Sequence[Any]) -> str:
    """The database the instances came from (Django routes their prefetches there)."""
    state = getattr(instances[0], "_state", None) if instances else None
    return getattr(state, "db", None) or DEFAULT_DB_ALIAS


def _check_to_attr(model: type[Model], to_attr: str) -> None:
    try:
        model._meta.get_field(to_attr)
    except exceptions.FieldDoesNotExist:
        return
    raise to_attr_conflict(to_attr, model)


def _skip_descendants(level: Level) -> None:
    for child in level.children:
        if not child.done:
            child.done = True
            _skip_descendants(child)


def _traverse(obj_list: list[Any], through_attr: str) -> list[Any]:
    """Django's walk through an attribute that needs no query (lists flattened, None skipped)."""
    new_obj_list: list[Any] = []
    for obj in obj_list:
        if through_attr in getattr(obj, "_prefetched_objects_cache", ()):
            new_obj = list(obj._prefetched_objects_cache.get(through_attr))
        else:
            try:
                new_obj = getattr(obj, through_attr)
            except exceptions.ObjectDoesNotExist:
                continue
        if new_obj is None:
            continue
        if isinstance(new_obj, list):
            new_obj_list.extend(new_obj)
        else:
            new_obj_list.append(new_obj)
    return new_obj_list


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


def _django_prefetch_querysets(
    prefetcher: Any, instances: list[Model], querysets: list[Any] | None
) -> tuple[RelationQuery, list[Model]]:
    """Django's own builder and query, for relation kinds without a native builder."""
    rel_qs, rel_obj_attr, instance_attr, single, cache_name, is_descriptor = (
        prefetcher.get_prefetch_querysets(instances, querysets)
    )
    additional = take_additional_lookups(rel_qs)
    relation = RelationQuery(
        rel_qs,
        rel_obj_attr,
        instance_attr,
        single,
        cache_name,
        is_descriptor,
        additional_lookups=additional,
    )
    return relation, list(rel_qs)


def _primary_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The error a failed run raises: the first real error of its task group (the
    siblings' cancellations are noise), or a cancellation if there is nothing else.

    The other real errors stay reachable, as trio keeps them: listed in a note, and as
    an exception group in the error's ``__context__`` when that is free.
    """
    errors: list[BaseException] = []

    def collect(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                collect(inner)
        else:
            errors.append(exc)

    collect(group)
    cancelled = anyio.get_cancelled_exc_class()
    real = [error for error in errors if not isinstance(error, cancelled)]
    if not real:
        return errors[0] if errors else group
    primary, others = real[0], real[1:]
    if others:
        primary.add_note(
            f"async_prefetch: {len(others)} other quer{'y' if len(others) == 1 else 'ies'} "
            "of the same call failed too: "
            + "; ".join(f"{type(other).__name__}: {other}" for other in others)
        )
        if primary.__context__ is None:
            primary.__context__ = BaseExceptionGroup("other errors of the same call", others)
    return primary
