"""Prefetching through the engine in Django's test cases.

``TestCase`` runs each test in a transaction: the engine reads through the test's own
connection. ``TransactionTestCase`` commits: the engine reads on its pool, whose
connections are open when the test runner drops the test database.
"""

from __future__ import annotations

from django.db import connection
from django.test import TestCase, TransactionTestCase

import async_prefetch

from .models import Book, Shelf


def create_shelves() -> None:
    for name, titles in {"fiction": ["Emma", "Ulysses"], "poetry": ["Odes"]}.items():
        shelf = Shelf.objects.create(name=name)
        for title in titles:
            Book.objects.create(shelf=shelf, title=title)


def titles(shelves: list[Shelf]) -> dict[str, list[str]]:
    return {shelf.name: sorted(book.title for book in shelf.books.all()) for shelf in shelves}


EXPECTED = {"fiction": ["Emma", "Ulysses"], "poetry": ["Odes"]}


def engine_sessions() -> int:
    """The engine's pooled connections to the test database (named ``async_prefetch``)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = 'async_prefetch' AND datname = current_database()"
        )
        row = cursor.fetchone()
    return int(row[0])


class PrefetchInATransaction(TestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        create_shelves()

    def test_prefetch_related(self) -> None:
        shelves = list(Shelf.objects.prefetch_related("books").order_by("name"))
        with self.assertNumQueries(0):
            assert titles(shelves) == EXPECTED


class PrefetchOnThePool(TransactionTestCase):
    def setUp(self) -> None:
        create_shelves()

    def test_prefetch_related(self) -> None:
        shelves = list(Shelf.objects.prefetch_related("books").order_by("name"))
        with self.assertNumQueries(0):
            assert titles(shelves) == EXPECTED
        assert engine_sessions() > 0

    async def test_aprefetch(self) -> None:
        shelves = await async_prefetch.aprefetch(Shelf.objects.order_by("name"), "books")
        assert titles(shelves) == EXPECTED
