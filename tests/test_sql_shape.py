"""The engine's prefetch queries send each id list as one array: ``= ANY(%s)``, not ``IN``.

Checked on the SQL the engine reports to the caller's query log, for every relation kind
with a native builder (forward and reverse foreign keys and one-to-ones, many-to-many both
ways, relations to non-primary-key fields and to UUID keys); sliced ``Prefetch`` querysets
keep Django's ``ROW_NUMBER()`` filter.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.db.models import Prefetch
from django.test.utils import CaptureQueriesContext

import async_prefetch
from tests.conftest import Bookstore
from tests.differential import check_sync
from tests.testapp.models import Author, Book, Page

pytestmark = pytest.mark.django_db(transaction=True)


def engine_sql(lookup: Any) -> str:
    books = list(Book.objects.order_by("pk"))
    with CaptureQueriesContext(connection) as ctx:
        async_prefetch.prefetch_related_objects(books, lookup)
    assert len(ctx.captured_queries) == 1
    return ctx.captured_queries[0]["sql"]


@pytest.mark.parametrize(
    "lookup",
    [
        "publisher",  # forward FK to a UUID primary key
        "profile",  # reverse one-to-one
        "ebook",  # reverse one-to-one of multi-table inheritance
        "pages",  # reverse FK
        "editions",  # reverse FK to a non-primary-key field (isbn)
        "authors",  # many-to-many
        "tags",  # many-to-many through a model, to a non-primary-key field (name)
        "taggings",  # reverse FK of the through model
    ],
)
def test_id_lists_are_one_array(bookstore: Bookstore, lookup: str) -> None:
    sql = engine_sql(lookup)
    assert "= ANY(" in sql
    assert " IN (" not in sql
    check_sync(Book.objects.order_by("pk"), [lookup])


@pytest.mark.parametrize("lookup", ["pages", "authors", "publisher"])
def test_statement_text_does_not_depend_on_the_number_of_parents(
    bookstore: Bookstore, lookup: str
) -> None:
    texts = set()
    for count in (3, 4, 6):
        books = list(Book.objects.order_by("pk")[:count])
        with CaptureQueriesContext(connection) as ctx:
            async_prefetch.prefetch_related_objects(books, lookup)
        (query,) = ctx.captured_queries
        texts.add(query["sql"].split(" = ANY(")[0])
    assert len(texts) == 1, texts


def test_forward_foreign_key_from_many_parents(bookstore: Bookstore) -> None:
    authors = list(Author.objects.order_by("pk"))
    with CaptureQueriesContext(connection) as ctx:
        async_prefetch.prefetch_related_objects(authors, "location", "mentor")
    assert len(ctx.captured_queries) == 2
    assert all("= ANY(" in query["sql"] for query in ctx.captured_queries)
    check_sync(Author.objects.order_by("pk"), ["location", "mentor"])


def test_sliced_prefetch_keeps_djangos_window(bookstore: Bookstore) -> None:
    lookup = Prefetch("pages", queryset=Page.objects.order_by("number")[:2], to_attr="first")
    assert "ROW_NUMBER()" in engine_sql(lookup)
    check_sync(Book.objects.order_by("pk"), [lookup])
