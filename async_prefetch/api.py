"""The public API: async and sync prefetch entry points."""

from __future__ import annotations

import functools
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import anyio
from asgiref.sync import sync_to_async
from django.db.models import Model, Prefetch, QuerySet
from django.db.models import query as django_query

from ._compat import HAS_FETCH_MODES
from .access.auto import mode_for_call
from .access.events import has_listeners
from .access.hooks import ensure_installed
from .access.learn import LearnedPlan, plan_for
from .access.modes import Origin, PrefetchMode
from .access.sites import call_site
from .dispatch import (
    capture_async_caller,
    engine_root,
    engine_supports,
    evaluate,
    run_async,
    run_sync,
    split_lookups,
)
from .execution.pools import close_pools
from .runtime import bridge
from .runtime.memo import MemoSpec
from .runtime.scheduler import run_prefetch
from .runtime.session import CallerContext, alias_of, in_call_scope
from .runtime.trace import current_trace

M = TypeVar("M", bound=Model)
Lookup: TypeAlias = "str | Prefetch[Any]"

#: Django's own implementation, captured before ``install()`` can replace it.
django_prefetch_related_objects = django_query.prefetch_related_objects


async def aprefetch(
    qs_or_instances: QuerySet[M] | Iterable[M],
    *lookups: Lookup,
    using: str | None = None,
    memo: MemoSpec = None,
    learn: bool = False,
    key: Hashable | None = None,
    consistent: bool | None = None,
) -> list[M]:
    """Evaluate a queryset (or take instances) and prefetch ``lookups`` concurrently.

    Lookups already on the queryset (``qs.prefetch_related(...)``) run too. ``using``
    picks the database for the queryset's own rows. Returns the instances with their
    caches filled exactly as Django's ``prefetch_related`` fills them. ``memo``: related
    instances already held, shared with other calls (:class:`~async_prefetch.Memo`).
    ``learn``: add the lookups that code reached lazily on what earlier calls from this
    call site (or with this ``key``) returned (see :mod:`async_prefetch.access.learn`).
    ``consistent``: every query of the call sees one database snapshot (default: the
    ``CONSISTENT`` setting; given instances were read before it).
    """
    call = _Call.make("aprefetch", learn, key, consistent)
    if not isinstance(qs_or_instances, QuerySet):
        instances = list(qs_or_instances)
        await _aprefetch_objects(instances, call.lookups_on(instances, lookups), memo, call)
        return instances
    queryset, all_lookups = split_lookups(qs_or_instances, lookups, using)
    all_lookups = call.lookups(queryset.model, all_lookups)
    mode = call.root_mode(queryset)
    if not engine_supports(queryset.db) or not engine_root(queryset):
        instances = await sync_to_async(evaluate)(queryset)
        await _aprefetch_objects(instances, all_lookups, memo, call, mode)
        return instances
    caller = await capture_async_caller()
    runner = _runner(memo, root=queryset, mode=mode, consistent=call.consistent)
    fetched: list[M] = await run_async(caller, runner, [], all_lookups)
    return fetched


async def aprefetch_related_objects(
    instances: Iterable[Model], *lookups: Lookup, memo: MemoSpec = None
) -> None:
    """Async ``prefetch_related_objects``: same arguments, same caches, concurrent queries."""
    instances = instances if isinstance(instances, list) else list(instances)
    await _aprefetch_objects(
        instances, lookups, memo, _Call.make("aprefetch_related_objects", False, None)
    )


async def _aprefetch_objects(
    instances: list[Any],
    lookups: Sequence[Lookup],
    memo: MemoSpec,
    call: _Call,
    mode: PrefetchMode | None = None,
) -> None:
    if not instances:
        return
    if not engine_supports(alias_of(instances)):
        await sync_to_async(django_prefetch_related_objects)(instances, *lookups)
        return
    caller = await capture_async_caller()
    runner = _runner(memo, mode=mode or call.mode(), consistent=call.consistent)
    await run_async(caller, runner, instances, lookups)


def prefetch(
    qs_or_instances: QuerySet[M] | Iterable[M],
    *lookups: Lookup,
    using: str | None = None,
    memo: MemoSpec = None,
    learn: bool = False,
    key: Hashable | None = None,
    consistent: bool | None = None,
) -> list[M]:
    """Synchronous :func:`aprefetch`; the engine runs on its own event-loop thread."""
    call = _Call.make("prefetch", learn, key, consistent)
    if not isinstance(qs_or_instances, QuerySet):
        instances = list(qs_or_instances)
        _prefetch_objects(instances, call.lookups_on(instances, lookups), memo, call)
        return instances
    queryset, all_lookups = split_lookups(qs_or_instances, lookups, using)
    all_lookups = call.lookups(queryset.model, all_lookups)
    mode = call.root_mode(queryset)
    if not engine_supports(queryset.db) or not engine_root(queryset):
        instances = list(queryset)  # rows Django builds; the lookups still concurrent
        _prefetch_objects(instances, all_lookups, memo, call, mode)
        return instances
    runner = _runner(memo, root=queryset, mode=mode, consistent=call.consistent)
    fetched: list[M] = run_sync(CallerContext.capture(), runner, [], all_lookups)
    return fetched


def prefetch_related_objects(
    model_instances: Iterable[Model], *related_lookups: Lookup, memo: MemoSpec = None
) -> None:
    """Drop-in for Django's ``prefetch_related_objects``, run by the engine.

    Inside ``atomic`` the engine runs on the caller's own connections (each stage's
    queries in one pipeline), so the transaction's uncommitted rows are seen.
    """
    instances = model_instances if isinstance(model_instances, list) else list(model_instances)
    _prefetch_objects(
        instances, related_lookups, memo, _Call.make("prefetch_related_objects", False, None)
    )


def _prefetch_objects(
    instances: list[Any],
    lookups: Sequence[Lookup],
    memo: MemoSpec,
    call: _Call,
    mode: PrefetchMode | None = None,
) -> None:
    if not instances:
        return
    if not engine_supports(alias_of(instances)):
        django_prefetch_related_objects(instances, *lookups)
        return
    runner = _runner(memo, mode=mode or call.mode(), consistent=call.consistent)
    run_sync(CallerContext.capture(), runner, instances, lookups)


@dataclass(frozen=True)
class _Call:
    """Where a call comes from: its site (for messages), and its learned plan."""

    function: str
    where: str | None
    learned: LearnedPlan | None
    #: Whether the instances the call builds get a mode of the call's own (messages,
    #: learning). Free on Django 6.1 (every instance has a mode); on 5.2 a slot per
    #: instance, paid where it serves: async calls (lazy loads in an event loop),
    #: learning ones, and while an N+1 report listens. Auto-prefetching roots always
    #: pass theirs on.
    marks: bool
    #: The call's ``consistent`` option (``None``: the setting's).
    consistent: bool | None = None

    @classmethod
    def make(
        cls, function: str, learn: bool, key: Hashable | None, consistent: bool | None = None
    ) -> _Call:
        where = call_site(2)
        learned = plan_for(key if key is not None else (function, where)) if learn else None
        marks = HAS_FETCH_MODES or learn or function.startswith("a") or has_listeners()
        ensure_installed(to_one=marks)
        return cls(function, where, learned, marks, consistent)

    def lookups_on(self, instances: list[Any], lookups: Sequence[Lookup]) -> list[Lookup]:
        """:meth:`lookups` for a call given ``instances`` (of the first one's model)."""
        return self.lookups(type(instances[0]), lookups) if instances else list(lookups)

    def lookups(self, model: type[Model], lookups: Sequence[Lookup]) -> list[Lookup]:
        """``lookups`` plus what the call site learned (and the trace notes)."""
        if self.learned is None:
            return list(lookups)
        added = self.learned.lookups_for(model, lookups)
        if added:
            trace = current_trace()
            if trace is not None:
                trace.learned.extend(added)
        return [*lookups, *added]

    def root_mode(self, queryset: QuerySet[Any]) -> PrefetchMode | None:
        """The fetch mode of the roots the call builds from ``queryset`` (set on it)."""
        mode = mode_for_call(
            queryset.__dict__.get("_fetch_mode"),
            where=self.where,
            learned=self.learned,
            function=self.function,
        )
        if mode is not None and (self.marks or mode.auto):
            queryset._fetch_mode = mode  # type: ignore[attr-defined]
            return mode
        return None

    def mode(self) -> PrefetchMode | None:
        """The mode the related instances of given roots without one derive theirs from."""
        if not self.marks:
            return None
        return PrefetchMode(auto=False, origin=Origin(self.where, self.learned, self.function))


def _runner(
    memo: MemoSpec,
    root: QuerySet[Any] | None = None,
    mode: PrefetchMode | None = None,
    consistent: bool | None = None,
) -> Any:
    """``run_prefetch`` with ``memo``, the root queryset and the roots' mode bound, in a
    call scope (see :func:`.runtime.session.in_call_scope`) with the call's options."""
    run = functools.partial(run_prefetch, root_queryset=root, memo=memo, mode=mode)
    return in_call_scope(run, consistent=consistent)


async def aclose() -> None:
    """Close the engine's connection pools (they reopen on next use; also done at exit)."""
    await anyio.to_thread.run_sync(bridge.on_engine_thread, close_pools)
