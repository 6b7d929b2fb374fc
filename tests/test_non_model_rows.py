"""Objects that cannot hold a prefetch cache make Django give up quietly, and so must the engine.

Django's loop gives every object of a step a ``_prefetched_objects_cache`` first and skips
the lookup's step (no query, no error) as soon as one object refuses the attribute: ``None``,
the dicts of ``values()``, the tuples of ``values_list()``, the ints of ``flat=True``. A default
manager that prefetches therefore works with ``values()`` in ordinary code.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.db.models import prefetch_related_objects
from django.test.utils import CaptureQueriesContext

import async_prefetch
from tests.conftest import Bookstore
from tests.testapp.models import Book, Location

pytestmark = pytest.mark.django_db(transaction=True)


def lists() -> dict[str, Any]:
    book = Book.objects.order_by("pk").first()
    return {
        "none-first": [None, book],
        "none-last": [book, None],
        "dict": [{"id": 1}, book],
        "tuple": [(1,), book],
    }


@pytest.mark.parametrize("kind", ["none-first", "none-last", "dict", "tuple"])
def test_objects_without_a_cache_are_a_no_op(bookstore: Bookstore, kind: str) -> None:
    expected, got = lists()[kind], lists()[kind]
    with CaptureQueriesContext(connection) as django_queries:
        prefetch_related_objects(expected, "pages", "authors")
    with CaptureQueriesContext(connection) as engine_queries:
        async_prefetch.prefetch_related_objects(got, "pages", "authors")
    assert len(engine_queries) == len(django_queries) == 0
    assert [
        vars(obj).get("_prefetched_objects_cache") for obj in got if hasattr(obj, "_state")
    ] == [vars(obj).get("_prefetched_objects_cache") for obj in expected if hasattr(obj, "_state")]


@pytest.mark.anyio
async def test_objects_without_a_cache_are_a_no_op_async(bookstore: Bookstore) -> None:
    book = await Book.objects.order_by("pk").afirst()
    objs: list[Any] = [None, book]
    await async_prefetch.aprefetch_related_objects(objs, "pages")
    assert book is not None
    assert not hasattr(book, "_prefetched_objects_cache")


@pytest.mark.parametrize(
    "values",
    [
        lambda qs: qs.values("id", "title"),
        lambda qs: qs.values_list("id", "title"),
        lambda qs: qs.values_list("id", flat=True),
    ],
    ids=["values", "values_list", "flat"],
)
def test_values_querysets_with_prefetches_under_install(
    bookstore: Bookstore, installed: None, values: Any
) -> None:
    queryset = Book.objects.order_by("pk").prefetch_related("authors", "pages")
    rows = list(values(queryset))
    async_prefetch.uninstall()
    assert rows == list(values(queryset))


@pytest.mark.parametrize("func", ["prefetch", "aprefetch"])
def test_values_querysets_through_the_api(bookstore: Bookstore, func: str) -> None:
    queryset: Any = Book.objects.order_by("pk").values("id").prefetch_related("authors")
    if func == "prefetch":
        rows = async_prefetch.prefetch(queryset, "pages")
    else:
        from asgiref.sync import async_to_sync

        rows = async_to_sync(async_prefetch.aprefetch)(queryset, "pages")
    assert rows == list(Book.objects.order_by("pk").values("id"))


def test_default_manager_that_prefetches_with_values(bookstore: Bookstore, installed: None) -> None:
    """``Location.objects`` prefetches "country" by default."""
    names = list(Location.objects.order_by("name").values_list("name", flat=True))
    assert names == sorted(Location.objects.values_list("name", flat=True))
