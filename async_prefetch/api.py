"""The public API: async and sync prefetch entry points."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any, TypeAlias, TypeVar

import anyio
from asgiref.sync import sync_to_async
from django.db.models import Model, Prefetch, QuerySet
from django.db.models import query as django_query

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
from .runtime.session import CallerContext, alias_of

M = TypeVar("M", bound=Model)
Lookup: TypeAlias = "str | Prefetch[Any]"

#: Django's own implementation, captured before ``install()`` can replace it.
django_prefetch_related_objects = django_query.prefetch_related_objects


async def aprefetch(
    qs_or_instances: QuerySet[M] | Iterable[M],
    *lookups: Lookup,
    using: str | None = None,
    memo: MemoSpec = None,
) -> list[M]:
    """Evaluate a queryset (or take instances) and prefetch ``lookups`` concurrently.

    Lookups already on the queryset (``qs.prefetch_related(...)``) run too. ``using``
    picks the database for the queryset's own rows. Returns the instances with their
    caches filled exactly as Django's ``prefetch_related`` fills them. ``memo``: related
    instances already held, shared with other calls (:class:`~async_prefetch.Memo`).
    """
    if not isinstance(qs_or_instances, QuerySet):
        instances = list(qs_or_instances)
        await aprefetch_related_objects(instances, *lookups, memo=memo)
        return instances
    queryset, all_lookups = split_lookups(qs_or_instances, lookups, using)
    if not engine_supports(queryset.db) or not engine_root(queryset):
        instances = await sync_to_async(evaluate)(queryset)
        await aprefetch_related_objects(instances, *all_lookups, memo=memo)
        return instances
    caller = await capture_async_caller()
    fetched: list[M] = await run_async(caller, _runner(memo, root=queryset), [], all_lookups)
    return fetched


async def aprefetch_related_objects(
    instances: Iterable[Model], *lookups: Lookup, memo: MemoSpec = None
) -> None:
    """Async ``prefetch_related_objects``: same arguments, same caches, concurrent queries."""
    instances = instances if isinstance(instances, list) else list(instances)
    if not instances:
        return
    if not engine_supports(alias_of(instances)):
        await sync_to_async(django_prefetch_related_objects)(instances, *lookups)
        return
    caller = await capture_async_caller()
    await run_async(caller, _runner(memo), instances, lookups)


def prefetch(
    qs_or_instances: QuerySet[M] | Iterable[M],
    *lookups: Lookup,
    using: str | None = None,
    memo: MemoSpec = None,
) -> list[M]:
    """Synchronous :func:`aprefetch`; the engine runs on its own event-loop thread."""
    if not isinstance(qs_or_instances, QuerySet):
        instances = list(qs_or_instances)
        prefetch_related_objects(instances, *lookups, memo=memo)
        return instances
    queryset, all_lookups = split_lookups(qs_or_instances, lookups, using)
    if not engine_supports(queryset.db):
        instances = list(queryset)
        django_prefetch_related_objects(instances, *all_lookups)
        return instances
    caller = CallerContext.capture()
    if not engine_root(queryset):  # rows Django builds; the lookups still concurrent
        instances = list(queryset)
        if instances:
            run_sync(caller, _runner(memo), instances, all_lookups)
        return instances
    fetched: list[M] = run_sync(caller, _runner(memo, root=queryset), [], all_lookups)
    return fetched


def prefetch_related_objects(
    model_instances: Iterable[Model], *related_lookups: Lookup, memo: MemoSpec = None
) -> None:
    """Drop-in for Django's ``prefetch_related_objects``, run by the engine.

    Inside ``atomic`` the engine runs on the caller's own connections, one query at a
    time, so the transaction's uncommitted rows are seen.
    """
    instances = model_instances if isinstance(model_instances, list) else list(model_instances)
    if not instances:
        return
    if not engine_supports(alias_of(instances)):
        django_prefetch_related_objects(instances, *related_lookups)
        return
    run_sync(CallerContext.capture(), _runner(memo), instances, related_lookups)


def _runner(memo: MemoSpec, root: QuerySet[Any] | None = None) -> Any:
    """``run_prefetch`` with ``memo`` and the root queryset bound."""
    return functools.partial(run_prefetch, root_queryset=root, memo=memo)


async def aclose() -> None:
    """Close the engine's connection pools (they reopen on next use; also done at exit)."""
    await anyio.to_thread.run_sync(bridge.on_engine_thread, close_pools)
