"""The public API: async and sync prefetch entry points."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any, TypeAlias, TypeVar

import anyio
from asgiref.sync import async_to_sync, sync_to_async
from django.db import connections
from django.db.models import Model, Prefetch, QuerySet
from django.db.models import query as django_query
from django.db.models.query import ModelIterable

from . import bridge
from .engine import CallerContext, alias_of, run_prefetch
from .pools import close_pools
from .trace import current_trace

M = TypeVar("M", bound=Model)
Lookup: TypeAlias = "str | Prefetch[Any]"

#: Django's own implementation, captured before ``install()`` can replace it.
django_prefetch_related_objects = django_query.prefetch_related_objects

_warned_aliases: set[str] = set()


class FallbackWarning(RuntimeWarning):
    """Issued once per database alias that the engine hands back to Django."""


def _engine_supports(alias: str) -> bool:
    vendor = connections[alias].vendor
    if vendor == "postgresql":
        return True
    if alias not in _warned_aliases:
        _warned_aliases.add(alias)
        warnings.warn(
            f"async_prefetch: database {alias!r} is {vendor}, not PostgreSQL; falling back to "
            "Django's own prefetch_related_objects (serial, no pool).",
            FallbackWarning,
            stacklevel=3,
        )
    return False


def _evaluate(queryset: QuerySet[M]) -> list[M]:
    return list(queryset)


def _engine_root(queryset: QuerySet[Any]) -> bool:
    """True when the engine can fetch the queryset's own rows (plain model rows)."""
    query = queryset.query
    return queryset._iterable_class is ModelIterable and not query.select_for_update


async def _capture_async_caller() -> CallerContext:
    """The connections of the thread Django runs this coroutine's sync code on.

    Under ``async_to_sync`` (Django's async test cases, sync middleware) that is the
    outer thread, whose connection may hold an ``atomic`` block.
    """
    return await sync_to_async(CallerContext.capture, thread_sensitive=True)(current_trace())


def _split(
    queryset: QuerySet[M], lookups: tuple[Lookup, ...], using: str | None
) -> tuple[QuerySet[M], list[Lookup]]:
    if using is not None:
        queryset = queryset.using(using)
    all_lookups = [*queryset._prefetch_related_lookups, *lookups]  # type: ignore[attr-defined]
    queryset = queryset._chain()  # type: ignore[attr-defined]
    queryset._prefetch_related_lookups = ()  # type: ignore[attr-defined]
    return queryset, all_lookups


async def _run_async(caller: CallerContext, func: Any, *args: Any) -> Any:
    """Await ``func(*args, caller)`` on the engine thread, or, when the caller is inside
    ``atomic``, here, serially on the caller's own connections (only they see its rows)."""
    if caller.in_atomic():
        return await func(*args, caller.on_caller_connections())
    return await bridge.run_async(func, *args, caller)


def _run_sync(caller: CallerContext, func: Any, *args: Any) -> Any:
    """:func:`_run_async` for synchronous callers.

    Inside ``atomic`` the run goes through ``async_to_sync``: its event loop runs on a
    helper thread while this thread, which owns the transaction, runs the run's queries
    (``sync_to_async(thread_sensitive=True)`` comes back here), one at a time.
    """
    if caller.in_atomic():
        return async_to_sync(func)(*args, caller.on_caller_connections())
    return bridge.run_sync(func, *args, caller)


async def aprefetch(
    qs_or_instances: QuerySet[M] | Iterable[M], *lookups: Lookup, using: str | None = None
) -> list[M]:
    """Evaluate a queryset (or take instances) and prefetch ``lookups`` concurrently.

    Lookups already on the queryset (``qs.prefetch_related(...)``) run too. ``using``
    picks the database for the queryset's own rows. Returns the instances with their
    caches filled exactly as Django's ``prefetch_related`` fills them.
    """
    if not isinstance(qs_or_instances, QuerySet):
        instances = list(qs_or_instances)
        await aprefetch_related_objects(instances, *lookups)
        return instances
    queryset, all_lookups = _split(qs_or_instances, lookups, using)
    if not _engine_supports(queryset.db) or not _engine_root(queryset):
        instances = await sync_to_async(_evaluate)(queryset)
        await aprefetch_related_objects(instances, *all_lookups)
        return instances
    caller = await _capture_async_caller()
    fetched: list[M] = await _run_async(caller, _run_root, queryset, all_lookups)
    return fetched


async def aprefetch_related_objects(instances: Iterable[Model], *lookups: Lookup) -> None:
    """Async ``prefetch_related_objects``: same arguments, same caches, concurrent queries."""
    instances = instances if isinstance(instances, list) else list(instances)
    if not instances:
        return
    if not _engine_supports(alias_of(instances)):
        await sync_to_async(django_prefetch_related_objects)(instances, *lookups)
        return
    caller = await _capture_async_caller()
    await _run_async(caller, run_prefetch, instances, lookups)


def prefetch(
    qs_or_instances: QuerySet[M] | Iterable[M], *lookups: Lookup, using: str | None = None
) -> list[M]:
    """Synchronous :func:`aprefetch`; the engine runs on its own event-loop thread."""
    if not isinstance(qs_or_instances, QuerySet):
        instances = list(qs_or_instances)
        prefetch_related_objects(instances, *lookups)
        return instances
    queryset, all_lookups = _split(qs_or_instances, lookups, using)
    if not _engine_supports(queryset.db):
        instances = list(queryset)
        django_prefetch_related_objects(instances, *all_lookups)
        return instances
    caller = CallerContext.capture()
    if not _engine_root(queryset):  # rows Django builds; the lookups still concurrent
        instances = list(queryset)
        if instances:
            _run_sync(caller, run_prefetch, instances, all_lookups)
        return instances
    fetched: list[M] = _run_sync(caller, _run_root, queryset, all_lookups)
    return fetched


async def _run_root(queryset: QuerySet[M], lookups: list[Lookup], caller: CallerContext) -> list[M]:
    return await run_prefetch([], lookups, caller, root_queryset=queryset)  # type: ignore[return-value]


def prefetch_related_objects(model_instances: Iterable[Model], *related_lookups: Lookup) -> None:
    """Drop-in for Django's ``prefetch_related_objects``, run by the engine.

    Inside ``atomic`` the engine runs on the caller's own connections, one query at a
    time, so the transaction's uncommitted rows are seen.
    """
    instances = model_instances if isinstance(model_instances, list) else list(model_instances)
    if not instances:
        return
    if not _engine_supports(alias_of(instances)):
        django_prefetch_related_objects(instances, *related_lookups)
        return
    _run_sync(CallerContext.capture(), run_prefetch, instances, related_lookups)


async def aclose() -> None:
    """Close the engine's connection pools (they reopen on next use; also done at exit)."""
    await anyio.to_thread.run_sync(bridge.on_engine_thread, close_pools)
