"""django-memoized-prefetch's README example, with :class:`async_prefetch.Memo`.

Run from the repository root: ``pip install -e ".[embedded]" && python
examples/memoized_prefetch.py``. It starts an embedded PostgreSQL, creates the README's
models (the test app ``tests/memoapp``), then processes every book and every review in chunks, as
the README does with ``MemoizedPrefetch.process_chunk``:

* authors and translators from one memo: one query per chunk for the authors not seen
  in an earlier chunk (``author`` and ``translator`` merged);
* publishers loaded once, whole (``all=True``);
* categories: the join rows per chunk, the categories themselves from the memo;
* reviews: ``book`` through ``select_related``, then ``book__publisher`` and
  ``book__author`` from the same memos.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import django
from django.conf import settings
from django.core.management import call_command

import async_prefetch
from async_prefetch import Memo
from async_prefetch.devtools.embedded import get_server


def configure() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.memoapp
    settings.configure(
        DATABASES={"default": get_server().django_database()},
        INSTALLED_APPS=["tests.memoapp"],
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    )
    django.setup()
    call_command("migrate", verbosity=0)


def seed(n_books: int = 5_000) -> None:
    from tests.memoapp.models import Author, Book, Category, Publisher, Review

    if Book.objects.exists():
        return
    rng = random.Random(0)
    authors = Author.objects.bulk_create(
        Author(name=f"author {i}", email=f"author{i}@example.com") for i in range(500)
    )
    publishers = Publisher.objects.bulk_create(
        Publisher(name=f"publisher {i}", country="NZ") for i in range(20)
    )
    categories = Category.objects.bulk_create(Category(name=f"category {i}") for i in range(30))
    books = Book.objects.bulk_create(
        Book(
            title=f"book {i}",
            isbn=f"{i:013}",
            author=rng.choice(authors),
            translator=rng.choice([None, None, *authors]),
            publisher=rng.choice(publishers),
        )
        for i in range(n_books)
    )
    through = Book.categories.through
    through.objects.bulk_create(
        through(book=book, category=category)
        for book in books
        for category in rng.sample(categories, rng.randint(0, 3))
    )
    Review.objects.bulk_create(
        Review(book=rng.choice(books), rating=rng.randint(1, 5), comment="") for _ in range(n_books)
    )


def main() -> None:
    from tests.memoapp.models import Author, Book, Category, Publisher, Review

    authors = Memo(Author, size=10_000)
    publishers = Memo(Publisher, all=True)
    categories = Memo(Category)
    memos = [authors, publishers, categories]

    with async_prefetch.tracing() as trace:
        lines = 0
        for book in async_prefetch.iterator(
            Book.objects.order_by("pk"),
            "author",
            "translator",
            "publisher",
            "categories",
            chunk_size=1_000,
            memo=memos,
        ):
            translator = book.translator.name if book.translator is not None else None
            names = [category.name for category in book.categories.all()]
            lines += bool((book.author.name, translator, book.publisher.name, names))
    print(f"books: {lines} processed with {trace.queries} prefetch queries")

    with async_prefetch.tracing() as trace:
        ratings = 0
        for review in async_prefetch.iterator(
            Review.objects.select_related("book").order_by("pk"),
            "book__publisher",
            "book__author",
            chunk_size=1_000,
            memo=[authors, publishers],  # the same memos: nothing fetched twice
        ):
            ratings += review.rating
            assert review.book.publisher is publishers.get(review.book.publisher_id)
    print(f"reviews: rating total {ratings} with {trace.queries} prefetch queries")
    print(
        f"held: {len(authors)} authors, {len(publishers)} publishers, {len(categories)} categories"
    )


if __name__ == "__main__":
    configure()
    seed()
    main()
