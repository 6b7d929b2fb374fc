"""The differential harness: the same lookups through Django and through the engine.

``check_sync``/``check_async`` fetch two fresh lists of the same rows, prefetch the lookups on
one with Django's ``prefetch_related_objects`` and on the other with the engine, and require
equal snapshots (:mod:`tests.cache_snapshot`) and the same number of queries.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeAlias

from asgiref.sync import sync_to_async
from django.apps import apps
from django.contrib.contenttypes.models import ContentType
from django.db import DEFAULT_DB_ALIAS, connection, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Prefetch, QuerySet, prefetch_related_objects
from django.test.utils import CaptureQueriesContext

import async_prefetch
from tests.cache_snapshot import assert_same_prefetch

Lookup: TypeAlias = "str | Prefetch[Any, Any, Any]"
Source = QuerySet[Any] | Callable[[], list[Any]]


def warm_content_types() -> None:
    """Same ContentType cache for both sides: Django's run must not warm it for the engine."""
    ContentType.objects.clear_cache()
    ContentType.objects.get_for_models(*apps.get_app_config("testapp").get_models())


def fresh(source: Source) -> list[Any]:
    """A new list of new instances (nothing cached) for ``source``; warm ContentType cache."""
    warm_content_types()
    if isinstance(source, QuerySet):
        return list(source.all())
    return list(source())


def fresh_lookups(lookups: Sequence[Lookup]) -> list[Lookup]:
    """Independent copies: Django mutates querysets it is given (hints), so never share them."""
    return copy.deepcopy(list(lookups))


def describe(lookups: Sequence[Lookup]) -> str:
    return ", ".join(
        f"Prefetch({lk.prefetch_through!r}, to_attr={lk.to_attr!r}, qs={lk.queryset is not None})"
        if isinstance(lk, Prefetch)
        else repr(lk)
        for lk in lookups
    )


def assert_same_queries(
    lookups: Sequence[Lookup], django_sql: list[str], engine_sql: list[str]
) -> None:
    if len(django_sql) == len(engine_sql):
        return
    lines = [
        f"query count differs for lookups [{describe(lookups)}]: "
        f"django {len(django_sql)}, engine {len(engine_sql)}",
        "django:",
        *(f"  {sql}" for sql in django_sql),
        "engine:",
        *(f"  {sql}" for sql in engine_sql),
    ]
    raise AssertionError("\n".join(lines))


def django_side(objs: list[Any], lookups: Sequence[Lookup]) -> list[str]:
    with CaptureQueriesContext(connection) as ctx:
        prefetch_related_objects(objs, *fresh_lookups(lookups))
    return [q["sql"] for q in ctx.captured_queries]


def engine_side(objs: list[Any], lookups: Sequence[Lookup]) -> list[str]:
    with CaptureQueriesContext(connection) as ctx:
        async_prefetch.prefetch_related_objects(objs, *fresh_lookups(lookups))
    return [q["sql"] for q in ctx.captured_queries]


def check_sync(source: Source, lookups: Sequence[Lookup]) -> None:
    expected = fresh(source)
    django_sql = django_side(expected, lookups)
    got = fresh(source)
    engine_sql = engine_side(got, lookups)
    assert_same_prefetch(expected, got, lookups)
    assert_same_queries(lookups, django_sql, engine_sql)


def _thread_sensitive_connection(alias: str) -> BaseDatabaseWrapper:
    return connections[alias]


@asynccontextmanager
async def query_log(alias: str = DEFAULT_DB_ALIAS) -> AsyncIterator[list[str]]:
    """``CaptureQueriesContext`` for async code, without ``ensure_connection()``.

    "The caller's connection" of a coroutine is ambiguous: the event loop thread's own
    ``connections[alias]``, or the one of the thread ``sync_to_async`` runs Django's code on.
    Both are put in logging mode and both logs are collected, so the engine may report to
    either (reporting a query to both would count it twice, and be a bug).
    """
    wrappers = [connections[alias]]
    other = await sync_to_async(_thread_sensitive_connection)(alias)
    if other is not wrappers[0]:
        wrappers.append(other)
    saved = [w.force_debug_cursor for w in wrappers]
    starts = [len(w.queries_log) for w in wrappers]
    for w in wrappers:
        w.force_debug_cursor = True
    captured: list[str] = []
    try:
        yield captured
    finally:
        for w, flag, start in zip(wrappers, saved, starts, strict=True):
            captured.extend(q["sql"] for q in list(w.queries_log)[start:])
            w.force_debug_cursor = flag


def closing(func: Callable[[], Any]) -> Callable[[], Any]:
    """Run ``func`` in a sync_to_async worker and close that thread's connection afterwards."""

    def run() -> Any:
        try:
            return func()
        finally:
            connection.close()

    return run


async def django_side_async(
    source: Source, lookups: Sequence[Lookup]
) -> tuple[list[Any], list[str]]:
    def work() -> tuple[list[Any], list[str]]:
        objs = fresh(source)
        return objs, django_side(objs, lookups)

    result: tuple[list[Any], list[str]] = await sync_to_async(closing(work))()
    return result


async def fresh_async(source: Source) -> list[Any]:
    objs: list[Any] = await sync_to_async(closing(lambda: fresh(source)))()
    return objs


async def check_async(source: Source, lookups: Sequence[Lookup]) -> None:
    expected, django_sql = await django_side_async(source, lookups)
    got = await fresh_async(source)
    async with query_log() as engine_sql:
        await async_prefetch.aprefetch_related_objects(got, *fresh_lookups(lookups))
    assert_same_prefetch(expected, got, lookups)
    assert_same_queries(lookups, django_sql, engine_sql)
