"""The demo's bookstore: configure Django for it, seed it, and fetch one page two ways.

:func:`seed` fills the tables of :mod:`async_prefetch.devtools.demo` (also the bench's
``chain`` workload); :func:`page_queryset` is a list page's queryset with its prefetches;
:func:`run_django_side` fetches it with Django's ``prefetch_related`` and
:func:`run_engine_side` with ``aprefetch``, each returning a :class:`DemoResult` whose
:attr:`~DemoResult.signature` compares equal when both fetched the same objects.
"""

from __future__ import annotations

import asyncio
import datetime
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TextIO

import django
from django.apps import apps
from django.conf import settings
from django.core.management import call_command
from django.db import connection
from django.db.models import Prefetch, QuerySet
from django.test.utils import CaptureQueriesContext

import async_prefetch
from async_prefetch.devtools.embedded import ServerInfo
from async_prefetch.devtools.signature import signature as relation_signature

if TYPE_CHECKING:
    from async_prefetch.devtools.demo.models import Book

DEMO_APP = "async_prefetch.devtools.demo"
TIMELINE_WIDTH = 15
"""Bar width of the engine's timeline: its lines fit in about 80 columns."""


@dataclass(frozen=True)
class DemoResult:
    """One way of fetching the page: how many books, queries and seconds, the first books'
    lines, the page's :func:`signature` and (for the engine) its rendered timeline."""

    label: str
    books: int
    queries: int
    seconds: float
    sample: list[str]
    signature: list[Any]
    timeline: str = ""


def configure_django(server: ServerInfo, proxy: tuple[str, int] | None = None) -> None:
    """Point Django at ``server`` (through ``proxy``, a TCP host and port, if given; unless
    settings are already configured) and create the demo tables. Raises ``RuntimeError``
    if configured settings lack the demo app."""
    if not settings.configured:
        overrides = {"HOST": proxy[0], "PORT": str(proxy[1])} if proxy else {}
        settings.configure(
            DATABASES={"default": server.django_database(**overrides)},
            INSTALLED_APPS=["django.contrib.contenttypes", DEMO_APP],
            USE_TZ=True,
            TIME_ZONE="UTC",
            DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        )
        django.setup()
    if not apps.is_installed(DEMO_APP):
        raise RuntimeError(f"the demo needs {DEMO_APP!r} in INSTALLED_APPS")
    call_command("migrate", run_syncdb=True, verbosity=0)


class _Progress:
    """A progress bar on ``stream`` that appears only once the work has taken ``delay`` s."""

    def __init__(self, total: int, stream: TextIO = sys.stderr, delay: float = 1.0) -> None:
        self.total, self.done, self.stream, self.delay = total, 0, stream, delay
        self.started = time.perf_counter()
        self.drawn = False

    def advance(self, label: str) -> None:
        self.done += 1
        if time.perf_counter() - self.started < self.delay:
            return
        filled = 30 * self.done // self.total
        bar = "#" * filled + "." * (30 - filled)
        self.stream.write(f"\rseeding [{bar}] {self.done}/{self.total} {label:<12}")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")


def seed(n_books: int = 200, seed: int = 0) -> bool:
    """Insert ``n_books`` books (8-12 pages and 3-7 reviews each) with their publishers,
    authors, locations and tags, deterministically for a given ``seed``.

    Returns ``False`` (and inserts nothing) when the demo tables already hold books.
    """
    from async_prefetch.devtools.demo.models import (
        Author,
        Book,
        Location,
        Page,
        Publisher,
        Review,
        Tag,
    )

    if Book.objects.exists():
        return False
    rng = random.Random(seed)
    words = [
        "river",
        "stone",
        "glass",
        "winter",
        "garden",
        "machine",
        "silent",
        "paper",
        "north",
        "empire",
    ]
    chunk = 20
    book_chunks = range(0, n_books, chunk)

    publishers = Publisher.objects.bulk_create(
        [Publisher(name=f"{w.title()} House") for w in words]
    )
    locations = Location.objects.bulk_create(
        [
            Location(city=c)
            for c in ["Lyon", "Porto", "Kyoto", "Quito", "Oslo", "Perth", "Lagos", "Turin"]
        ]
    )
    tags = Tag.objects.bulk_create([Tag(name=f"{w}-{i}") for i, w in enumerate(words * 2)])
    authors = Author.objects.bulk_create(
        [
            Author(name=f"Author {i:03d}", location=rng.choice([None, *locations]))
            for i in range(max(2, n_books // 3))
        ]
    )
    books: list[Book] = []

    def make_books() -> None:
        books.extend(
            Book.objects.bulk_create(
                Book(
                    title=" ".join(rng.sample(words, 3)).title() + f" {i}",
                    publisher=rng.choice(publishers),
                    published=datetime.date(1990, 1, 1)
                    + datetime.timedelta(days=rng.randrange(12000)),
                )
                for i in range(n_books)
            )
        )

    def link_authors_and_tags() -> None:
        Book.authors.through.objects.bulk_create(
            Book.authors.through(book_id=b.pk, author_id=a.pk)
            for b in books
            for a in rng.sample(authors, rng.randint(1, 3))
        )
        Book.tags.through.objects.bulk_create(
            Book.tags.through(book_id=b.pk, tag_id=t.pk)
            for b in books
            for t in rng.sample(tags, rng.randint(1, 4))
        )

    def pages_and_reviews(start: int) -> None:
        part = books[start : start + chunk]
        Page.objects.bulk_create(
            Page(book=b, number=n, text=f"Page {n} of {b.title}. " * 20)
            for b in part
            for n in range(1, rng.randint(8, 12) + 1)
        )
        Review.objects.bulk_create(
            Review(book=b, stars=rng.randint(1, 5), body=f"A review of {b.title}.")
            for b in part
            for _ in range(rng.randint(3, 7))
        )

    steps: list[tuple[str, Callable[[], None]]] = [
        ("books", make_books),
        ("links", link_authors_and_tags),
        *((f"pages {start}", partial(pages_and_reviews, start)) for start in book_chunks),
    ]
    progress = _Progress(len(steps))
    try:
        for label, step in steps:
            step()
            progress.advance(label)
    finally:
        progress.close()
    return True


def page_queryset(page_size: int = 50) -> QuerySet[Book]:
    """The first ``page_size`` books by title with everything a list page shows."""
    from async_prefetch.devtools.demo.models import Book, Review

    return Book.objects.order_by("title", "pk").prefetch_related(
        "authors__location",
        "tags",
        "pages",
        Prefetch("reviews", queryset=Review.objects.filter(stars__gte=4), to_attr="good_reviews"),
        "publisher",
    )[:page_size]


def describe(book: Book) -> str:
    """One line about a fetched book; touches only prefetched data."""
    authors = ", ".join(f"{a.name} ({a.location or 'nowhere'})" for a in book.authors.all())
    tags = ", ".join(t.name for t in book.tags.all())
    good = len(book.good_reviews)  # type: ignore[attr-defined]
    pages = len(book.pages.all())
    return (
        f"{book.title!r} ({book.publisher}) by {authors}; "
        f"tags: {tags}; pages: {pages}; good reviews: {good}"
    )


PAGE_PATHS = ("publisher", "authors__location", "tags", "pages", "good_reviews")
"""Everything the page shows: :func:`signature` records these relations."""


def signature(books: Sequence[Book]) -> list[Any]:
    """Everything the page shows, by primary key and in order: equal pages, equal lists.
    Reads caches only: a relation that was not prefetched raises instead of loading."""
    return relation_signature(books, PAGE_PATHS)


def run_django_side(page_size: int = 50) -> DemoResult:
    """Fetch the page with Django's own ``prefetch_related`` (after a warm-up connect)."""
    connection.ensure_connection()
    with CaptureQueriesContext(connection) as captured:
        started = time.perf_counter()
        books = list(page_queryset(page_size))
        seconds = time.perf_counter() - started
    return DemoResult(
        label="Django prefetch_related",
        books=len(books),
        queries=len(captured.captured_queries),
        seconds=seconds,
        sample=[describe(b) for b in books[:3]],
        signature=signature(books),
    )


async def _engine_page(page_size: int) -> tuple[list[Book], float, async_prefetch.RunTrace]:
    with async_prefetch.tracing() as trace:
        started = time.perf_counter()
        books = await async_prefetch.aprefetch(page_queryset(page_size))
        seconds = time.perf_counter() - started
    return books, seconds, trace


def run_engine_side(page_size: int = 50) -> DemoResult:
    """Fetch the same page with ``await aprefetch(...)`` in an event loop, traced."""
    books, seconds, trace = asyncio.run(_engine_page(page_size))
    return DemoResult(
        label="async_prefetch aprefetch",
        books=len(books),
        queries=trace.queries,
        seconds=seconds,
        sample=[describe(b) for b in books[:3]],
        signature=signature(books),
        timeline=trace.render(width=TIMELINE_WIDTH),
    )
