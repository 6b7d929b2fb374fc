"""The test schema and its seed data: every table gets rows, and Django's own prefetch works."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.contenttypes.models import ContentType
from django.core.management import call_command
from django.db import models
from django.db.models import Prefetch
from pytest_django import DjangoAssertNumQueries

from async_prefetch.devtools.demo import bookstore as demo
from tests.conftest import Bookstore
from tests.factories import seed_bookstore
from tests.testapp.models import (
    Author,
    Book,
    BookProfile,
    Comment,
    Country,
    EBook,
    Edition,
    Location,
    Page,
    Publisher,
    Review,
    Tag,
    Tagging,
)

ALL_MODELS: list[type[models.Model]] = [
    Country,
    Location,
    Publisher,
    Author,
    Tag,
    Book,
    EBook,
    Tagging,
    Page,
    Review,
    BookProfile,
    Edition,
    Comment,
    Book.authors.through,
]


@pytest.mark.django_db(transaction=True)
def test_seed_fills_every_table(bookstore: Bookstore) -> None:
    for model in ALL_MODELS:
        assert model._default_manager.exists(), model.__name__
    assert len(bookstore.book_ids) == 6
    assert Review.all_objects.filter(hidden=True).exists()
    assert Review.objects.count() < Review.all_objects.count()
    assert Author.objects.filter(mentor__isnull=False).exists()
    assert Author.objects.filter(location__isnull=True).exists()
    assert Location.objects.filter(country__isnull=True).exists()
    assert Publisher.objects.filter(books__isnull=True).exists()
    assert Book.objects.filter(publisher__isnull=True).exists()
    assert Book.objects.filter(authors__isnull=True).exists()
    assert {c.content_type.model_class() for c in Comment.objects.all()} == {Book, Author}


@pytest.mark.django_db
def test_seed_is_deterministic_and_sized() -> None:
    def snapshot() -> list[Any]:
        return [
            list(Book.objects.order_by("title").values_list("title", "isbn", "price")),
            list(Page.objects.values_list("book__isbn", "number")),
            list(Review.all_objects.order_by("book__isbn", "created").values_list("stars")),
        ]

    seed_bookstore(n_books=20, seed=7)
    first = snapshot()
    assert Book.objects.count() == 20
    assert EBook.objects.count() == 1
    for model in reversed(ALL_MODELS):
        model._base_manager.all().delete()
    seed_bookstore(n_books=20, seed=7)
    assert snapshot() == first


def test_django_prefetch_related_over_every_relation_kind(
    bookstore: Bookstore, django_assert_num_queries: DjangoAssertNumQueries
) -> None:
    ContentType.objects.get_for_model(Book)  # warm the cache GenericRelation reads
    good = Review.objects.filter(stars__gte=3)
    # books, authors, locations, countries, mentors, tags, pages, reviews, good reviews,
    # profiles, editions, comments, publishers, ebooks: one query each
    with django_assert_num_queries(14):
        books = list(
            Book.objects.order_by("pk").prefetch_related(
                "authors__location__country",
                "authors__mentor",
                "tags",
                "pages",
                "reviews",
                Prefetch("reviews", queryset=good, to_attr="good_reviews"),
                "profile",
                "editions",
                "comments",
                "publisher",
                "ebook",
            )
        )
        for book in books:
            for author in book.authors.all():
                str(author.location.country if author.location else None)
                str(author.mentor)
            list(book.tags.all())
            list(book.pages.all())
            list(book.reviews.all())
            list(book.editions.all())
            list(book.comments.all())
            str(book.publisher)
            getattr(book, "profile", None)
            getattr(book, "ebook", None)

    assert [b.pk for b in books] == bookstore.book_ids
    for book in books:
        fresh = Book.objects.get(pk=book.pk)
        assert [a.pk for a in book.authors.all()] == [a.pk for a in fresh.authors.all()]
        assert {t.name for t in book.tags.all()} == {t.name for t in fresh.tags.all()}
        numbers = [p.number for p in book.pages.all()]
        assert numbers == sorted(numbers) == [p.number for p in fresh.pages.all()]
        assert {r.pk for r in book.reviews.all()} == {r.pk for r in fresh.reviews.all()}
        assert not any(r.hidden for r in book.reviews.all())
        good_reviews: list[Review] = book.good_reviews
        assert {r.pk for r in good_reviews} == set(
            fresh.reviews.filter(stars__gte=3).values_list("pk", flat=True)
        )
        assert {e.pk for e in book.editions.all()} == {e.pk for e in fresh.editions.all()}
        assert {c.pk for c in book.comments.all()} == {c.pk for c in fresh.comments.all()}
        assert book.publisher_id == fresh.publisher_id
        assert hasattr(book, "ebook") == (book.pk == bookstore.ebook_id)


@pytest.mark.django_db
def test_testapp_migration_matches_models() -> None:
    """tests/testapp/migrations must be regenerated (makemigrations testapp) after model edits."""
    call_command("makemigrations", "testapp", "--check", "--dry-run", verbosity=0)


@pytest.mark.django_db
def test_demo_seeds_once_and_fetches_a_page_in_seven_queries() -> None:
    assert demo.seed(n_books=30)
    assert not demo.seed(n_books=30)
    result = demo.run_django_side(page_size=10)
    assert (result.books, result.queries) == (10, 7)
    assert len(result.sample) == 3
    assert all("pages: " in line for line in result.sample)
