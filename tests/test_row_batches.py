"""Rows are read and built into instances a batch at a time, on the query's connection.

A result is never held as a full list of Python rows next to the instances built from it:
the executor converts ``BATCH_ROWS`` rows, the fetch task builds them, and the next batch
is converted only then. The connection stays checked out until the last batch is built,
so a failure while building must still return it, and leave no cache filled.
"""

from __future__ import annotations

import gc
import tracemalloc
from typing import Any

import pytest
from django.db import connection
from django.db.models import Prefetch, prefetch_related_objects
from django.db.models.signals import post_init
from django.test.utils import CaptureQueriesContext

import async_prefetch
from async_prefetch.execution import pool as executor
from async_prefetch.hydration.rows import row_builder
from async_prefetch.runtime import bridge
from async_prefetch.runtime import session as engine
from tests.cache_snapshot import assert_same_prefetch
from tests.factories import seed_bookstore
from tests.run_state import checked_out_now, settle_pool, state_of
from tests.testapp.models import Book, Page, Review

pytestmark = pytest.mark.django_db(transaction=True)

LOOKUPS: list[Any] = [
    "pages",
    "authors__location",
    Prefetch("reviews", queryset=Review.objects.order_by("-pk"), to_attr="review_list"),
]


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, int]]:
    """Batches of 3 rows; the model and size of every batch built, in order."""
    monkeypatch.setattr(executor, "BATCH_ROWS", 3)
    sizes: list[tuple[Any, int]] = []
    original = row_builder

    def recording(compiled: Any, **options: Any) -> Any:
        build = original(compiled, **options)
        model = compiled.queryset.model

        def recorded(rows: Any) -> Any:
            sizes.append((model, len(rows)))
            return build(rows)

        return recorded

    monkeypatch.setattr(engine, "row_builder", recording)
    return sizes


def test_rows_are_built_batch_by_batch(batches: list[tuple[Any, int]]) -> None:
    seed_bookstore(n_books=12)
    expected = list(Book.objects.order_by("pk"))
    prefetch_related_objects(expected, *LOOKUPS)
    got = list(Book.objects.order_by("pk"))
    async_prefetch.prefetch_related_objects(got, *LOOKUPS)
    assert_same_prefetch(expected, got, LOOKUPS)
    pages = Page.objects.count()
    assert pages > 3
    assert max(size for _, size in batches) == 3
    assert [size for model, size in batches if model is Page] == [3] * (pages // 3) + (
        [pages % 3] if pages % 3 else []
    )


def test_failure_in_a_later_batch_returns_the_connection(batches: list[tuple[Any, int]]) -> None:
    seed_bookstore(n_books=12)
    books: list[Any] = list(Book.objects.order_by("pk"))
    before = state_of(books)
    last_page = Page.objects.order_by("-pk").values_list("pk", flat=True)[0]

    def explode(sender: type[Page], instance: Page, **kwargs: Any) -> None:
        if instance.pk == last_page:
            raise RuntimeError("cannot build this page")

    post_init.connect(explode, sender=Page)
    try:
        with pytest.raises(RuntimeError, match="cannot build this page"):
            async_prefetch.prefetch_related_objects(books, *LOOKUPS)
    finally:
        post_init.disconnect(explode, sender=Page)
    # The failing page was not in the pages' first batch: earlier ones were built.
    assert len([size for model, size in batches if model is Page]) > 1
    assert state_of(books) == before
    assert bridge.run_sync(settle_pool) == 0


def traced_peak(prefetch: Any, lookups: list[Any]) -> int:
    """Peak of Python's allocations (every thread) while ``prefetch`` fills fresh books."""
    books = list(Book.objects.order_by("pk"))
    gc.collect()
    tracemalloc.start()
    try:
        prefetch(books, *lookups)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


def test_peak_python_memory_is_not_above_djangos() -> None:
    """The engine runs its queries at once but builds each result as it is read: its peak
    stays at or below Django's, which reads one query at a time, 100 rows at a time."""
    seed_bookstore(n_books=100)
    Page.objects.bulk_create(
        Page(book=book, number=100 + n, text=f"page {n} of {book.pk} " * 4)
        for book in Book.objects.all()
        for n in range(30)
    )
    # Lists, not querysets: what is measured is rows and instances (the querysets'
    # savings are test_allocation's and test_unfiltered_query's).
    lookups: list[Any] = [
        Prefetch(name, to_attr=f"{name}_list") for name in ("pages", "authors", "tags", "reviews")
    ]
    for _ in range(2):  # warm both sides (pool, compiled regexes, caches)
        traced_peak(prefetch_related_objects, lookups)
        traced_peak(async_prefetch.prefetch_related_objects, lookups)
    django = traced_peak(prefetch_related_objects, lookups)
    engine_peak = traced_peak(async_prefetch.prefetch_related_objects, lookups)
    assert django > 1_000_000
    assert engine_peak <= django, f"engine peak {engine_peak} B, Django {django} B"


def test_building_that_queries_runs_after_the_connection_is_returned(
    batches: list[tuple[Any, int]],
) -> None:
    """A model hook that queries cannot run on the event loop: those rows are built on a
    worker thread, all at once, once the pooled connection is back in the pool."""
    seed_bookstore(n_books=12)
    expected = list(Book.objects.order_by("pk"))
    prefetch_related_objects(expected, "pages")
    books: list[Any] = list(Book.objects.order_by("pk"))
    checked_out_while_building: list[int] = []

    def querying_hook(sender: type[Page], instance: Page, **kwargs: Any) -> None:
        Book.objects.exists()  # raises SynchronousOnlyOperation on the event loop
        checked_out_while_building.append(bridge.run_sync(checked_out_now))

    post_init.connect(querying_hook, sender=Page)
    try:
        async_prefetch.prefetch_related_objects(books, "pages")
    finally:
        post_init.disconnect(querying_hook, sender=Page)
    assert_same_prefetch(expected, books, ["pages"])
    assert len(checked_out_while_building) == Page.objects.count()
    assert set(checked_out_while_building) == {0}
    # The first batch was tried on the loop; the rest were kept and built in one go.
    sizes = [size for _, size in batches]
    assert sizes[0] == 3
    assert sum(sizes[1:]) == Page.objects.count()


def test_a_query_whose_rows_fail_is_logged_and_keeps_its_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seed_bookstore(n_books=3)

    def explode(sender: type[Page], instance: Page, **kwargs: Any) -> None:
        raise RuntimeError("cannot build this page")

    post_init.connect(explode, sender=Page)
    try:
        with (
            CaptureQueriesContext(connection) as logged,
            pytest.raises(RuntimeError, match="cannot build this page"),
        ):
            async_prefetch.prefetch_related_objects(list(Book.objects.all()), "pages")
        assert any('"testapp_page"' in query["sql"] for query in logged.captured_queries)

        def broken_log(cursor: Any, query: Any) -> str:
            raise ValueError("the query log failed")

        monkeypatch.setattr(executor, "_executed_sql", broken_log)
        with (
            CaptureQueriesContext(connection),
            pytest.raises(RuntimeError, match="cannot build this page"),
        ):
            async_prefetch.prefetch_related_objects(list(Book.objects.all()), "pages")
    finally:
        post_init.disconnect(explode, sender=Page)
    assert bridge.run_sync(settle_pool) == 0
