"""Long key lists are split into chunks fetched concurrently (``ASYNC_PREFETCH['CHUNK_SIZE']``).

With a chunk size of 2 the bookstore's levels split into several queries. Every cache must
still equal Django's single-query result, including object identity (books sharing a
publisher share one instance: chunks split distinct keys, never one key's parents), and
the chunks must run at once, measured with the server's clock.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.db.models import Prefetch
from django.test.utils import CaptureQueriesContext
from pytest_django.fixtures import Settings

import async_prefetch
from tests.cache_snapshot import assert_same_prefetch
from tests.conftest import Bookstore
from tests.differential import django_side, engine_side, fresh
from tests.server_time import SLEEP, slow
from tests.testapp.models import Author, Book, Page, Review

pytestmark = pytest.mark.django_db(transaction=True)

CHUNK = 2


@pytest.fixture
def small_chunks(settings: Settings) -> None:
    settings.ASYNC_PREFETCH = {"CHUNK_SIZE": CHUNK}


LOOKUPS: list[list[Any]] = [
    ["pages"],
    ["authors__location", "publisher"],
    ["profile", "ebook", "editions"],
    ["tags", Prefetch("reviews", queryset=Review.objects.order_by("-stars"), to_attr="rv")],
    [Prefetch("pages", queryset=Page.objects.order_by("-number")[:2], to_attr="last_two")],
]


@pytest.mark.parametrize("lookups", LOOKUPS, ids=lambda lookups: repr(lookups)[:40])
def test_chunked_caches_equal_djangos(
    bookstore: Bookstore, small_chunks: None, lookups: list[Any]
) -> None:
    expected = fresh(Book.objects.order_by("pk"))
    django_sql = django_side(expected, lookups)
    got = fresh(Book.objects.order_by("pk"))
    engine_sql = engine_side(got, lookups)
    assert_same_prefetch(expected, got, lookups)
    assert len(engine_sql) > len(django_sql), "the levels were split"


def test_level_with_its_own_prefetches_is_not_split(
    bookstore: Bookstore, small_chunks: None
) -> None:
    """Django evaluates such a queryset with its lookups at once: its level stays one
    query (the ``location`` level it adds is split like any other)."""
    lookups = [Prefetch("authors", queryset=Author.objects.prefetch_related("location"))]
    expected = fresh(Book.objects.order_by("pk"))
    django_sql = django_side(expected, lookups)
    got = fresh(Book.objects.order_by("pk"))
    engine_sql = engine_side(got, lookups)
    assert_same_prefetch(expected, got, lookups)

    def author_queries(sql: list[str]) -> int:
        return sum("_prefetch_related_val_book_id" in query for query in sql)

    assert author_queries(engine_sql) == author_queries(django_sql) == 1
    assert len(engine_sql) > len(django_sql)


def test_shared_targets_stay_one_instance(bookstore: Bookstore, small_chunks: None) -> None:
    """Authors share locations: one location instance per row, whatever the chunks."""
    authors = list(Author.objects.order_by("pk"))
    keys = {a.location_id for a in authors if a.location_id is not None}
    assert len(keys) > CHUNK
    with CaptureQueriesContext(connection) as ctx:
        async_prefetch.prefetch_related_objects(authors, "location")
    assert len(ctx.captured_queries) == -(-len(keys) // CHUNK)
    by_key: dict[int, Any] = {}
    for author in authors:
        if author.location_id is not None:
            assert by_key.setdefault(author.location_id, author.location) is author.location


def test_chunks_run_at_once(bookstore: Bookstore, small_chunks: None) -> None:
    books = list(Book.objects.order_by("pk"))
    assert len(books) > 2 * CHUNK
    lookup = Prefetch("pages", queryset=slow(Page.objects.all()), to_attr="slow_pages")
    with CaptureQueriesContext(connection) as ctx:
        async_prefetch.prefetch_related_objects(books, lookup)
    chunks = -(-len(books) // CHUNK)
    assert len(ctx.captured_queries) == chunks
    starts = {page.started_at for book in books for page in book.slow_pages}  # type: ignore[attr-defined]
    assert len(starts) == chunks, "one start time per chunk query"
    spread = max(starts) - min(starts)
    assert spread < timedelta(seconds=SLEEP / 2), f"chunks started {spread} apart"
