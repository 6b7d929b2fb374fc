"""The scheduler: runs a plan with one linking task and concurrent fetch tasks.

The task that calls :func:`run_prefetch` is the only one that touches instances anyone
else can see: it decides each level (Django's ``get_prefetcher`` and ``is_fetched``),
builds and compiles its query, fills caches and starts the children. Each fetch task
runs one query and builds new instances from its rows as they are read, batch by batch,
without awaiting within a batch; it only reads existing instances (known related
objects), and hands the new ones over when done. A failure anywhere cancels the
remaining fetches and undoes the call's writes from the journal. I/O goes through the
call's :class:`~.session.Session`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Collection, Coroutine, Mapping, Sequence
from typing import Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectSendStream
from django.db.models import Model, QuerySet

from ..access import events
from ..access.modes import PrefetchMode
from ..hydration.caches import (
    accept_caches,
    fill_caches,
    fill_values,
    link_back_keys,
    link_back_values,
)
from ..planning.errors import already_seen
from ..planning.plan import Level, Plan, normalize
from ..relations import RelationQuery
from ..relations.delegated import django_prefetch_querysets
from ..sql.compiler import CompiledQuery, compile_queryset
from .decide import Fetch, Part, decide
from .errors import primary_error
from .fill_order import FillOrder
from .journal import Journal
from .memo import MemoSpec
from .memo_level import MemoBatch, MemoLevel
from .memo_round import MemoRounds
from .session import CallerContext, Session
from .trace import ROOT_KEY, RunTrace

__all__ = ["run_in_session", "run_prefetch"]


async def run_prefetch(
    instances: list[Model],
    lookups: Sequence[Any],
    caller: CallerContext,
    *,
    root_queryset: QuerySet[Any] | None = None,
    memo: MemoSpec = None,
    mode: PrefetchMode | None = None,
) -> list[Model]:
    """Prefetch ``lookups`` onto ``instances`` (or the rows of ``root_queryset``),
    consulting ``memo`` (see :mod:`.memo`); ``mode`` is the fetch mode the roots' related
    instances derive theirs from when the roots have none (see :mod:`..access.modes`).

    Returns the instances. On any failure or cancellation the call's own writes are
    undone and no pooled connection stays checked out.
    """
    return await run_in_session(Session(caller, memo, mode), instances, lookups, root_queryset)


async def run_in_session(
    session: Session,
    instances: list[Model],
    lookups: Sequence[Any],
    root_queryset: QuerySet[Any] | CompiledQuery | None = None,
    *,
    built: bool = False,
) -> list[Model]:
    """:func:`run_prefetch` in ``session`` (one limit, executors and trace for several
    runs: the chunks of a stream), with a journal of its own. ``root_queryset`` may be
    compiled already (Django's compile-time errors raised by the caller). ``built``: the
    caller built ``instances`` and nobody else can reach them yet (a stream's chunk,
    dropped whole if its prefetch fails): writes to them are not recorded."""
    session.journal = Journal()
    session.journal.open()
    if built:
        session.journal.mark_created(instances)
    run = _Run(session)
    try:
        return await run.execute(instances, lookups, root_queryset, outer=True)
    finally:
        session.journal.close()
        session.journal = Journal()  # it holds the run's caches: they go with the run
        run.discard()


class _Run:
    """One plan run: the call's lookups, or a queryset's own lookups on its instances."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._trace = session.trace
        self._plan: Plan
        self._roots: list[Model] = []
        self._pending = 0
        self._deferred: list[Level] = []
        # The run's state of each level (the plan holds none).
        self._started: set[Level] = set()
        self._fetched: set[Level] = set()  # ran a query (Django's ``done_queries``)
        self._results: dict[Level, list[Any]] = {}  # done: the objects it yields
        self._rejections: list[tuple[tuple[int, ...], str]] = []
        self._memos = MemoRounds(self)  # memo levels and their batch queries
        self._order = FillOrder()  # parents' caches written in Django's order
        self._tg: TaskGroup
        self._send: MemoryObjectSendStream[tuple[Fetch | MemoLevel | MemoBatch, Any]]

    def discard(self) -> None:
        """Drop the run's state once it has ended: the run is in reference cycles (its memo
        rounds, its task group) that would keep its instances and their related objects
        until a full garbage collection."""
        self.__dict__.clear()

    # -- entry -------------------------------------------------------------------

    async def execute(
        self,
        instances: list[Model],
        lookups: Sequence[Any],
        root_queryset: QuerySet[Any] | CompiledQuery | None,
        *,
        outer: bool,
    ) -> list[Model]:
        """Run ``lookups``; the outer run of a call undoes the call's writes on failure."""
        normalized = normalize(lookups)
        if root_queryset is not None:
            compiled = (
                root_queryset
                if isinstance(root_queryset, CompiledQuery)
                else compile_queryset(root_queryset)
            )
            trace = self._trace
            step = trace.start(ROOT_KEY, "query", compiled.sql, compiled.params) if trace else None
            instances = await self._session.fetch_instances(compiled)
            self._session.journal.mark_created(instances)
            if trace is not None and step is not None:
                trace.finish(step, len(instances))
        if not instances or not normalized or not accept_caches(instances):
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
            if outer:
                self._session.journal.rollback()
            raise
        return instances

    async def _run_graph(self) -> None:
        send, receive = anyio.create_memory_object_stream[
            tuple[Fetch | MemoLevel | MemoBatch, Any]
        ](math.inf)
        self._send = send
        error: BaseException | None = None
        try:
            async with anyio.create_task_group() as tg, send, receive:
                self._tg = tg
                for level in list(self._plan.roots):
                    await self._schedule(level)
                await self._memos.flush()
                self._raise_rejection()
                while self._pending:
                    fetch, payload = await receive.receive()
                    self._pending -= 1
                    if isinstance(fetch, Fetch):
                        await self._on_fetched(fetch, payload)
                    elif isinstance(fetch, MemoLevel):
                        await self._memos.on_pairs(fetch, payload)
                    else:
                        await self._memos.on_batch(fetch, payload)
                    # Every level this round decided is in: their memo keys, one query
                    # per memo.
                    await self._memos.flush()
                    self._raise_rejection()
                self._raise_rejection()
        except BaseExceptionGroup as group:
            error = primary_error(group)
        if error is not None:
            # Raised outside the handler: the error keeps its own cause (the driver's
            # error under Django's) and context instead of the group's.
            raise error
        unfinished = [key for key, level in self._plan.levels.items() if level not in self._results]
        assert not unfinished, f"levels never ran: {unfinished}"
        assert not self._order, "writes held past the run"

    def _raise_rejection(self) -> None:
        """Raise Django's "already seen" error for the first rejected lookup in Django's
        order, once no undecided level could be rejected for an earlier lookup."""
        if not self._rejections:
            return
        first, key = min(self._rejections)
        if any(
            level.requeried_by is not None
            and level.requeried_by < first
            and level not in self._started
            and level not in self._results
            for level in self._plan.levels.values()
        ):
            return
        raise already_seen(key)

    # -- scheduling ----------------------------------------------------------------

    async def _schedule(self, level: Level) -> None:
        """Start ``level`` now if Django would have run its predecessors, else defer it."""
        if self._plan.blockers(level, self._done()):
            self._deferred.append(level)
            return
        await self._start(level, self._parent_objects(level))

    def _parent_objects(self, level: Level) -> list[Any]:
        return self._roots if level.parent is None else self._results[level.parent]

    def _siblings(self, level: Level) -> list[Level]:
        """The levels that write to ``level``'s parents."""
        return self._plan.roots if level.parent is None else level.parent.children

    def _done(self) -> Collection[Level]:
        """The levels done for what waits on them: objects in, writes made."""
        if not self._order:
            return self._results.keys()
        return self._results.keys() - self._order.held()

    async def _fill(self, level: Level, instances: list[Model], fill: Any, *args: Any) -> None:
        """Write ``level``'s values to its parents, ``fill(level, instances, *args)``, now
        or, while a sibling Django runs first has not written yet, when it has
        (:mod:`.fill_order`)."""
        write = functools.partial(self._write, level, instances, fill, *args)
        if self._order.must_wait(level, self._siblings(level), self._results):
            self._order.hold(level, write)
        else:
            await write()

    async def _write(self, level: Level, instances: list[Model], fill: Any, *args: Any) -> None:
        await self._session.sync_or_thread(fill, level, instances, *args)
        self._report_filled(level, instances)

    async def _release_fills(self) -> None:
        done: Mapping[Level, Any] = self._results
        while self._order and (write := self._order.next_ready(self._siblings, done)):
            await write()

    def _report_filled(self, level: Level, instances: list[Model]) -> None:
        """Tell the N+1 report, when one listens, which caches ``level`` filled."""
        if events.has_cache_listeners() and not level.as_attr:
            mode = self._session.root_mode
            where = mode.where if mode is not None else None
            events.emit_filled(instances, level.key, level.through_attr, where=where)

    async def _finish(self, level: Level, objects: list[Any] | None) -> None:
        """Record ``level``'s objects and start its children (or skip them: no objects)."""
        self._results[level] = objects or []
        if objects:
            for child in list(level.children):
                await self._schedule(child)
        else:
            self._skip_descendants(level)
        await self._release_fills()
        await self._release_deferred()

    async def _release_deferred(self) -> None:
        """Start deferred levels whose blockers are done (starting one may finish others)."""
        while True:
            ready = next(
                (
                    level
                    for level in self._deferred
                    if level in self._results or not self._plan.blockers(level, self._done())
                ),
                None,
            )
            if ready is None:
                return
            self._deferred.remove(ready)
            if ready not in self._results:
                await self._start(ready, self._parent_objects(ready))

    async def _start(self, level: Level, obj_list: list[Any]) -> None:
        """One step of Django's ``prefetch_related_objects`` loop for ``level``."""
        self._started.add(level)
        step = await self._session.sync_or_thread(
            decide, self._session, level, obj_list, self._rejections
        )
        trace = self._trace
        if isinstance(step, Fetch):
            self._raise_rejection()  # before its query is sent: Django's error is certain
            self._launch(step)
            # Let the new fetch tasks start before this task builds and compiles the
            # next level's query: each sends its own a scheduling round or two later
            # (limiter, pool, its query task), while later siblings are still being
            # compiled, so the server works while the loop compiles. Nothing here
            # waits for a connection.
            await anyio.lowlevel.checkpoint()
        elif isinstance(step, MemoLevel):
            self._raise_rejection()
            if trace is not None:
                step.step = trace.start(level.key, "memo")
            if step.pairs is not None:
                self._memos.start_pairs(step)
            else:
                await self._memos.request(step)
        else:
            if trace is not None and step is not None:
                trace.finish(trace.start(level.key, "walk"), len(step))
            await self._finish(level, step)

    def _launch(self, fetch: Fetch) -> None:
        """Start a fetch task per part (per chunk), or one for a delegated level."""
        trace = self._trace
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

    # -- fetching ------------------------------------------------------------------

    async def _fetch_part(self, fetch: Fetch, part: Part) -> None:
        # The reverse caches as the rows are built, where they can be (``applied``).
        link = part.relation.row_link
        if link is not None:
            link = dataclasses.replace(link)  # this query's own
        instances = await self._session.fetch_instances(part.compiled, link)
        part.linked = link is not None and link.applied
        await self._send.send((fetch, (part, instances)))

    async def _fetch_delegated(self, fetch: Fetch) -> None:
        payload = await self._session.call_django(
            django_prefetch_querysets, fetch.prefetcher, fetch.instances, fetch.level.querysets()
        )
        await self._send.send((fetch, payload))

    # -- linking -------------------------------------------------------------------

    async def _on_fetched(self, fetch: Fetch, payload: Any) -> None:
        level = fetch.level
        links: list[tuple[RelationQuery, list[Model]]]
        if fetch.parts:
            part, related = payload
            part.related = related
            self._mark_created(level, part.relation, related)
            if part.step is not None and self._trace is not None:
                self._trace.finish(part.step, len(related))
            links = [(p.relation, p.related) for p in fetch.parts if p.related is not None]
            if len(links) < len(fetch.parts):
                return  # linked once every chunk is in
            relation = links[0][0]
            if relation.link_back is not None and relation.additional_lookups:
                # Django's builder evaluated the queryset, its prefetches included,
                # before writing the reverse caches (which skip cached relations).
                # (Such levels are never split: there is one part.)
                await _Run(self._session).execute(
                    links[0][1], relation.additional_lookups, None, outer=False
                )
            related = [obj for _, objs in links for obj in objs]
            unlinked = [link for link, p in zip(links, fetch.parts, strict=True) if not p.linked]
        else:
            relation, related = payload
            self._mark_created(level, relation, related)
            links = unlinked = [(relation, related)]
        self._fetched.add(level)
        # The related objects' reverse caches now (its children read them), unless
        # written as their rows were built; the parents' caches in Django's order.
        keys = await self._session.sync_or_thread(link_back_keys, unlinked) if unlinked else None
        if len(unlinked) != len(links):
            keys = None  # the grouping reads every object's key itself
        journal = self._session.journal
        await self._fill(level, fetch.instances, fill_caches, relation, related, keys, journal)
        if fetch.step is not None and self._trace is not None:
            self._trace.finish(fetch.step, len(related))
        if relation.additional_lookups:
            auto = normalize(relation.additional_lookups, level.key)
            # Django runs these right after the current lookup, before the next one,
            # the deepest level's first.
            order = (*level.order[0], -level.depth)
            self._plan.add_lookups(
                auto, order, parent=level, started=self._started, fetched=self._fetched
            )
        await self._finish(level, related)

    # -- hooks for the memo rounds ----------------------------------------------------

    @property
    def session(self) -> Session:
        return self._session

    @property
    def trace(self) -> RunTrace | None:
        return self._trace

    def launch(self, func: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        """Start a fetch task whose result the linking loop waits for."""
        self._pending += 1
        self._tg.start_soon(func, *args)

    async def post(self, item: MemoLevel | MemoBatch, payload: Any) -> None:
        """Hand a fetch task's result to the linking loop."""
        await self._send.send((item, payload))

    async def run_lookups(self, instances: list[Model], lookups: list[Any]) -> None:
        """A queryset's own lookups on its instances, in this call's session."""
        await _Run(self._session).execute(instances, lookups, None, outer=False)

    async def complete(self, served: MemoLevel) -> None:
        """Fill the parents' caches with the memo level's instances and finish it."""
        level = served.level
        values, related = served.values()
        self._fetched.add(level)  # Django's done_queries: it would have queried
        journal = self._session.journal
        if served.link_back is not None:  # the related objects' caches now: children read them
            link_back_values(served.instances, values, served.link_back, journal)
        await self._fill(level, served.instances, fill_values, served.relation, values, journal)
        if served.step is not None and self._trace is not None:
            self._trace.finish(served.step, served.hits)
        await self._finish(level, related)

    def _skip_descendants(self, level: Level) -> None:
        """Mark every level below ``level`` done without objects (it yielded none)."""
        for child in level.children:
            if child not in self._results:
                self._results[child] = []
                self._skip_descendants(child)

    def _mark_created(self, level: Level, relation: RelationQuery, related: list[Model]) -> None:
        """Tell the journal about built instances that will be parents (this level has
        children, or will have its queryset's own lookups): only parents are written to
        and so looked up there. Recording leaf instances would cost memory for nothing;
        writes to an unrecorded one are merely journaled."""
        if level.children or relation.additional_lookups:
            self._session.journal.mark_created(related)
