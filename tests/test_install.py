"""``install()`` routes Django's own prefetching through the engine; ``uninstall()`` undoes it."""

from __future__ import annotations

import time
from typing import Any

import django.db.models
import pytest
from django.db.models import Prefetch
from django.db.models import query as django_query

import async_prefetch
from async_prefetch.api import django_prefetch_related_objects
from tests.factories import seed_bookstore
from tests.server_time import SLEEP, slow
from tests.testapp.models import Book, Page

SIBLINGS = 4


def sleeping_lookups() -> list[Prefetch[Any]]:
    return [
        Prefetch("pages", queryset=slow(Page.objects.all()), to_attr=f"pages_{i}")
        for i in range(SIBLINGS)
    ]


def timed(func: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = func()
    return result, time.perf_counter() - started


@pytest.mark.django_db(transaction=True)
def test_unmodified_prefetch_related_becomes_concurrent(installed: None) -> None:
    seed_bookstore()
    books, elapsed = timed(lambda: list(Book.objects.prefetch_related(*sleeping_lookups())))
    assert books
    assert all(len(b.pages_0) == len(b.pages_3) for b in books)
    assert elapsed < (SIBLINGS - 1) * SLEEP, f"{SIBLINGS} sleeping siblings took {elapsed:.2f}s"


@pytest.mark.django_db(transaction=True)
def test_uninstall_restores_django() -> None:
    seed_bookstore()
    django_aprefetch = django.db.models.aprefetch_related_objects
    async_prefetch.install()
    try:
        assert django_query.prefetch_related_objects is async_prefetch.prefetch_related_objects
        assert (
            django.db.models.aprefetch_related_objects is async_prefetch.aprefetch_related_objects
        )
    finally:
        async_prefetch.uninstall()
    assert django_query.prefetch_related_objects is django_prefetch_related_objects
    assert django.db.models.prefetch_related_objects is django_prefetch_related_objects
    assert django.db.models.aprefetch_related_objects is django_aprefetch
    _, elapsed = timed(lambda: list(Book.objects.prefetch_related(*sleeping_lookups())))
    assert elapsed >= SIBLINGS * SLEEP, "Django runs them one after another"


@pytest.mark.anyio
@pytest.mark.django_db(transaction=True)
async def test_aiterator_and_async_for_become_concurrent(installed: None) -> None:
    from asgiref.sync import sync_to_async

    await sync_to_async(seed_bookstore)()
    queryset = Book.objects.prefetch_related(*sleeping_lookups())

    started = time.perf_counter()
    books = [book async for book in queryset.aiterator(chunk_size=100)]
    elapsed = time.perf_counter() - started
    assert books
    assert all(hasattr(b, "pages_3") for b in books)
    assert elapsed < (SIBLINGS - 1) * SLEEP, f"aiterator() took {elapsed:.2f}s"

    started = time.perf_counter()
    books = [book async for book in queryset.all()]
    elapsed = time.perf_counter() - started
    assert books
    assert all(hasattr(b, "pages_3") for b in books)
    assert elapsed < (SIBLINGS - 1) * SLEEP, f"async for took {elapsed:.2f}s"
    await async_prefetch.aclose()


def test_app_config_installs_when_the_setting_asks(settings: Any) -> None:
    import async_prefetch as package
    from async_prefetch.apps import AsyncPrefetchConfig
    from async_prefetch.patching import is_installed

    config = AsyncPrefetchConfig("async_prefetch", package)
    settings.ASYNC_PREFETCH = {"INSTALL": False}
    config.ready()
    assert not is_installed()
    settings.ASYNC_PREFETCH = {"INSTALL": True}
    try:
        config.ready()
        assert is_installed()
        assert django_query.prefetch_related_objects is async_prefetch.prefetch_related_objects
    finally:
        async_prefetch.uninstall()


@pytest.mark.anyio
async def test_sync_api_refuses_to_block_an_event_loop() -> None:
    from django.core.exceptions import SynchronousOnlyOperation

    with pytest.raises(SynchronousOnlyOperation):
        async_prefetch.prefetch_related_objects([Book(pk=1)], "pages")
