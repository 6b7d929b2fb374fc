"""A reverse foreign key's reverse caches written as its rows are built (``RowLink``).

Django's builder caches each related object's parent while it evaluates the queryset
(``setattr(rel_obj, field.name, instance)`` unless already cached). The engine writes
that cache in the loop that builds the instances when the row holds the foreign key's
column and nothing else sets caches on the new instances; otherwise ``link_back`` does it
after the query. Either way each cache is Django's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.db.models import Prefetch, prefetch_related_objects
from pytest_django.fixtures import Settings

import async_prefetch
from async_prefetch.hydration import caches
from async_prefetch.runtime import scheduler
from tests.cache_snapshot import assert_same_prefetch
from tests.factories import seed_bookstore
from tests.testapp.models import Book, Page

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def link_back_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many related objects each ``link_back_keys`` call was given."""
    calls: list[int] = []
    original = caches.link_back_keys

    def recording(links: list[tuple[Any, list[Any]]]) -> Any:
        calls.append(sum(len(objs) for _, objs in links))
        return original(links)

    monkeypatch.setattr(scheduler, "link_back_keys", recording)
    return calls


def _compare(lookups: Callable[[], list[Any]]) -> list[Book]:
    """The engine's prefetch of ``lookups()`` against Django's (fresh lookups each: Django
    adds hints to a ``Prefetch`` queryset in place)."""
    ours = list(Book.objects.order_by("pk"))
    async_prefetch.prefetch_related_objects(ours, *lookups())
    djangos = list(Book.objects.order_by("pk"))
    prefetch_related_objects(djangos, *lookups())
    assert_same_prefetch(djangos, ours, lookups())
    return ours


def test_built_rows_hold_their_parent(link_back_calls: list[int]) -> None:
    seed_bookstore(n_books=8)
    books = _compare(lambda: ["pages"])
    assert link_back_calls == []  # nothing left to link after the query
    pages = [page for book in books for page in book.pages.all()]
    assert pages
    for book in books:
        for page in book.pages.all():
            assert page._state.fields_cache == {"book": book}
            assert page.book is book


def test_chunks_each_link_their_own_rows(settings: Settings, link_back_calls: list[int]) -> None:
    seed_bookstore(n_books=9)
    settings.ASYNC_PREFETCH = {"CHUNK_SIZE": 2}
    books = _compare(lambda: ["pages"])
    assert link_back_calls == []
    assert all(page.book is book for book in books for page in book.pages.all())


@pytest.mark.parametrize(
    "queryset",
    [
        Page.objects.select_related("book"),  # the populator caches the book first
        Page.objects.only("number"),  # the foreign key's column is not loaded
    ],
    ids=["select_related", "deferred_key"],
)
def test_rows_that_cannot_link_while_built_are_linked_after(
    link_back_calls: list[int], queryset: Any
) -> None:
    seed_bookstore(n_books=6)
    _compare(lambda: [Prefetch("pages", queryset=queryset.order_by("pk"))])
    # (a deferred key's read needs a query: tried on the loop, then on a worker thread)
    assert link_back_calls
    assert set(link_back_calls) == {Page.objects.count()}


def test_a_querysets_own_lookups_run_before_the_links(link_back_calls: list[int]) -> None:
    """Django's builder evaluates the queryset, its own prefetches included, before it
    writes the reverse caches: no linking while building there."""
    seed_bookstore(n_books=6)
    _compare(lambda: [Prefetch("pages", queryset=Page.objects.prefetch_related("book__authors"))])
    assert link_back_calls[-1] == Page.objects.count()  # after the nested levels
