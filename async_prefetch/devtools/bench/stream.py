"""The ``stream`` workload: a big table of books consumed chunk by chunk, five ways.

Each book has an ``author`` and a ``translator`` (one model, a third of translators
``None``), a ``publisher`` (a small table) and ``categories`` (many-to-many, 0-3 per book).
The sides (:data:`SIDES`) stream the same books in primary-key order with the same
``chunk_size``:

* ``django_iterator``: ``root.prefetch_related(*LOOKUPS).iterator(chunk_size=...)``;
* ``django_aiterator``: ``async for`` over ``root.prefetch_related(*LOOKUPS).aiterator(...)``;
* ``memoized_prefetch``: Django's ``root.iterator(chunk_size=...)`` cut into chunks of
  ``chunk_size``, each given to django-memoized-prefetch's ``MemoizedPrefetch.process_chunk``
  (authors and translators from one LRU, publishers loaded whole, categories through the
  join rows);
* ``engine``: :func:`async_prefetch.iterator` (the synchronous stream) with ``LOOKUPS``;
* ``engine_memo``: the same with ``Memo(Author)``, ``Memo(Publisher, all=True)`` and
  ``Memo(Category)``;
* ``floor``: a lower bound, not an equivalent (:meth:`StreamWorkload.floor`): every author,
  publisher and category, and which categories each book has, already in memory (loaded
  before the timer starts); timed, only what no stream can skip: the books' rows read with
  one plain psycopg cursor (one round trip), each book built and given its caches the
  cheapest way the loop body accepts, and the loop body.

Memos (both kinds) are created inside each timed run: every run starts cold. Every side
hands its books to :func:`consume`, the loop body: it reads each book's four relations once,
as a consumer would, and reduces them to a :class:`Digest` compared across sides.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from django.db import transaction

if TYPE_CHECKING:
    from django.db.models import QuerySet

    from async_prefetch.devtools.bench.models import StreamBook

NAME: Final = "stream"
SIDES: Final = (
    "django_iterator",
    "django_aiterator",
    "memoized_prefetch",
    "engine",
    "engine_memo",
    "floor",
)
LOOKUPS: Final = ("author", "translator", "publisher", "categories")
BOOKS: Final = 100_000
CHUNK_SIZE: Final = 2000
QUICK_BOOKS: Final = 1000
QUICK_CHUNK_SIZE: Final = 250
AUTHORS: Final = 5000
PUBLISHERS: Final = 20
CATEGORIES: Final = 50

_SEED_DB = "default"
_BATCH_SIZE = 5000


# -- the loop body ----------------------------------------------------------------------------

Row: TypeAlias = "tuple[int, int, int | None, int, tuple[int, ...]]"


@dataclass(frozen=True)
class Digest:
    """What a side's stream held: the number of books, the sum of every id read, and one
    hash per ``chunk_size`` books of their ``(pk, author, translator, publisher,
    categories)`` ids (categories sorted: django-memoized-prefetch caches a set)."""

    books: int
    id_sum: int
    chunk_hashes: tuple[int, ...]

    def difference(self, other: Digest, chunk_size: int) -> str | None:
        """``None`` when equal, else where ``other`` first differs from this digest."""
        if self == other:
            return None
        for index, (mine, theirs) in enumerate(
            zip(self.chunk_hashes, other.chunk_hashes, strict=False)
        ):
            if mine != theirs:
                start = index * chunk_size
                end = min(start + chunk_size, self.books) - 1
                return f"books {start}..{end} (in stream order) differ"
        return f"{other.books} books (id sum {other.id_sum}), expected {self.books} ({self.id_sum})"


def _row(book: Any) -> Row:
    translator = book.translator
    return (
        book.pk,
        book.author.pk,
        None if translator is None else translator.pk,
        book.publisher.pk,
        tuple(sorted(category.pk for category in book.categories.all())),
    )


class _Digester:
    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self.rows: list[Row] = []
        self.hashes: list[int] = []
        self.books = 0
        self.id_sum = 0

    def add(self, book: Any) -> None:
        row = _row(book)
        self.rows.append(row)
        self.id_sum += row[0] + row[1] + (row[2] or 0) + row[3] + sum(row[4])
        if len(self.rows) == self.chunk_size:
            self._flush()

    def _flush(self) -> None:
        self.books += len(self.rows)
        self.hashes.append(hash(tuple(self.rows)))
        self.rows.clear()

    def digest(self) -> Digest:
        if self.rows:
            self._flush()
        return Digest(self.books, self.id_sum, tuple(self.hashes))


def consume(books: Iterable[Any], chunk_size: int) -> Digest:
    """The loop body of every synchronous side: read each book's ``author``, ``translator``,
    ``publisher`` and ``categories.all()`` once; sum their ids; hash each ``chunk_size``
    books' ids."""
    digester = _Digester(chunk_size)
    for book in books:
        digester.add(book)
    return digester.digest()


async def aconsume(books: AsyncIterable[Any], chunk_size: int) -> Digest:
    """:func:`consume` for an async stream."""
    digester = _Digester(chunk_size)
    async for book in books:
        digester.add(book)
    return digester.digest()


# -- the workload ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamWorkload:
    """``books`` books (``seq`` 0..books-1) streamed in chunks of ``chunk_size``; ``runs``
    overrides the default number of timed runs."""

    books: int
    chunk_size: int
    runs: int | None = 3
    name: str = NAME

    @property
    def description(self) -> str:
        return (
            f"{self.books} books streamed in chunks of {self.chunk_size}: author and translator "
            f"({AUTHORS} authors), publisher ({PUBLISHERS}), categories (M2M of {CATEGORIES}, "
            "0-3 per book)"
        )

    def seed(self) -> bool:
        """Make sure the books exist (see :func:`seed_books`)."""
        return seed_books(self.books)

    def root(self, alias: str) -> QuerySet[StreamBook]:
        """The books in primary-key order on ``alias``, unevaluated, without lookups."""
        from async_prefetch.devtools.bench.models import StreamBook

        return StreamBook.objects.using(alias).filter(seq__lt=self.books).order_by("pk")

    def side(self, name: str, alias: str) -> Callable[[asyncio.Runner], Digest]:
        """The untimed body of side ``name`` on ``alias``: streams and consumes every book
        (an async side runs on the given runner)."""
        sides: dict[str, Callable[[asyncio.Runner], Digest]] = {
            "django_iterator": lambda _: self._django_iterator(alias),
            "django_aiterator": lambda runner: runner.run(self._django_aiterator(alias)),
            "memoized_prefetch": lambda _: self._memoized_prefetch(alias),
            "engine": lambda _: self._engine(alias, memo=False),
            "engine_memo": lambda _: self._engine(alias, memo=True),
            "floor": lambda _: self.floor(alias)(),
        }
        return sides[name]

    def timed(self, name: str, alias: str, runner: asyncio.Runner) -> tuple[float, Digest]:
        """Seconds to stream and consume every book with side ``name``, and the digest
        (for ``floor``, what :meth:`floor` loads before returning is not timed)."""
        if name == "floor":
            floor = self.floor(alias)
            started = time.perf_counter()
            digest = floor()
            return time.perf_counter() - started, digest
        body = self.side(name, alias)
        started = time.perf_counter()
        digest = body(runner)
        return time.perf_counter() - started, digest

    def floor(self, alias: str) -> Callable[[], Digest]:
        """The ``floor`` side: loads every author, publisher and category and which
        categories each book has (in Django's order), then returns the part to time.

        That part reads the books' rows with one plain psycopg cursor on ``alias``'s Django
        connection (the whole result in one round trip, converted ``chunk_size`` rows at a
        time), builds each book straight into its ``__dict__`` (``Model.__init__`` skipped),
        writes its ``author``, ``translator`` and ``publisher`` into its fields cache and a
        queryset holding its categories into its prefetch cache (sharing one template
        queryset's state: lighter than the per-parent querysets Django leaves, but what the
        loop body reads through ``categories.all()``), and consumes the books with
        :func:`consume`. A lower bound for any stream of these books whose caches are
        Django's types, not an equivalent of ``prefetch_related``.
        """
        from django.db import connections
        from django.db.models.base import ModelState

        from async_prefetch.devtools.bench import models

        authors = models.StreamAuthor.objects.using(alias).in_bulk()
        publishers = models.StreamPublisher.objects.using(alias).in_bulk()
        categories = models.StreamCategory.objects.using(alias).in_bulk()
        per_book: dict[int, list[Any]] = {}
        pairs = (
            models.StreamBookCategory.objects.using(alias)
            .filter(book__seq__lt=self.books)
            .order_by("book_id", "category_id")
            .values_list("book_id", "category_id")
        )
        for book_id, category_id in pairs:
            per_book.setdefault(book_id, []).append(categories[category_id])
        root = self.root(alias)
        first = root.first()
        assert first is not None
        template_queryset = first.categories.all()
        template = dict(template_queryset.__dict__)
        queryset_class = type(template_queryset)
        book_class = models.StreamBook
        names = [field.attname for field in book_class._meta.concrete_fields]
        pk_at, author_at, translator_at, publisher_at = (
            names.index(name) for name in ("id", "author_id", "translator_id", "publisher_id")
        )
        sql, params = root.query.get_compiler(alias).as_sql()
        connection = connections[alias]
        connection.ensure_connection()
        chunk_size = self.chunk_size
        new = object.__new__

        def build(row: tuple[Any, ...]) -> Any:
            book = new(book_class)
            state = ModelState()
            state.adding = False
            state.db = alias
            translator_id = row[translator_at]
            state.fields_cache = {
                "author": authors[row[author_at]],
                "translator": None if translator_id is None else authors[translator_id],
                "publisher": publishers[row[publisher_at]],
            }
            attrs = book.__dict__
            attrs["_state"] = state
            attrs.update(zip(names, row, strict=True))
            queryset: Any = new(queryset_class)
            queryset.__dict__.update(template)
            queryset._result_cache = per_book.get(row[pk_at]) or []
            queryset._prefetch_done = True
            attrs["_prefetched_objects_cache"] = {"categories": queryset}
            return book

        def books() -> Iterator[Any]:
            raw = connection.connection
            assert raw is not None
            with raw.cursor() as cursor:
                cursor.execute(sql, params)
                while rows := cursor.fetchmany(chunk_size):
                    chunk = [build(row) for row in rows]
                    del rows
                    yield from chunk

        def run() -> Digest:
            return consume(books(), chunk_size)

        return run

    def _django_iterator(self, alias: str) -> Digest:
        queryset = self.root(alias).prefetch_related(*LOOKUPS)
        return consume(queryset.iterator(chunk_size=self.chunk_size), self.chunk_size)

    async def _django_aiterator(self, alias: str) -> Digest:
        queryset = self.root(alias).prefetch_related(*LOOKUPS)
        return await aconsume(queryset.aiterator(chunk_size=self.chunk_size), self.chunk_size)

    def _memoized_prefetch(self, alias: str) -> Digest:
        from django_memoized_prefetch import (  # type: ignore[import-untyped]
            MemoizedPrefetch,
            MemoizedPrefetchConfig,
        )

        from async_prefetch.devtools.bench import models

        with models.reading_from(alias):  # the join rows: ``through_model.objects``
            memoized = MemoizedPrefetch(
                MemoizedPrefetchConfig(
                    models.StreamAuthor,
                    ["author", "translator"],
                    queryset=models.StreamAuthor.objects.using(alias),
                ),
                MemoizedPrefetchConfig(
                    models.StreamPublisher,
                    ["publisher"],
                    queryset=models.StreamPublisher.objects.using(alias),
                    prefetch_all=True,
                ),
                MemoizedPrefetchConfig(
                    models.StreamCategory,
                    ["categories"],
                    queryset=models.StreamCategory.objects.using(alias),
                    is_many_to_many=True,
                    through_model=models.StreamBookCategory,
                    source_field="book_id",
                    target_field="category_id",
                ),
            )

            def books() -> Iterator[Any]:
                rows = self.root(alias).iterator(chunk_size=self.chunk_size)
                while chunk := list(islice(rows, self.chunk_size)):
                    memoized.process_chunk(chunk)
                    yield from chunk

            return consume(books(), self.chunk_size)

    def _engine(self, alias: str, *, memo: bool) -> Digest:
        import async_prefetch
        from async_prefetch import Memo
        from async_prefetch.devtools.bench import models

        memos = (
            [
                Memo(models.StreamAuthor),
                Memo(models.StreamPublisher, all=True),
                Memo(models.StreamCategory),
            ]
            if memo
            else None
        )
        stream = async_prefetch.iterator(
            self.root(alias), *LOOKUPS, chunk_size=self.chunk_size, memo=memos
        )
        return consume(stream, self.chunk_size)


def build_stream(quick: bool = False, books: int | None = None) -> StreamWorkload:
    """The ``stream`` workload: :data:`BOOKS` books in chunks of :data:`CHUNK_SIZE`, or with
    ``quick`` :data:`QUICK_BOOKS` in chunks of :data:`QUICK_CHUNK_SIZE`; ``books`` overrides
    the number of books."""
    default, chunk_size = (QUICK_BOOKS, QUICK_CHUNK_SIZE) if quick else (BOOKS, CHUNK_SIZE)
    return StreamWorkload(books=default if books is None else books, chunk_size=chunk_size)


# -- seeding ----------------------------------------------------------------------------------


def seed_books(n: int) -> bool:
    """Make sure the authors, publishers, categories and books ``seq`` 0..n-1 exist (new
    books get deterministic relations); returns whether rows were inserted."""
    from async_prefetch.devtools.bench.models import (
        StreamAuthor,
        StreamBook,
        StreamBookCategory,
        StreamCategory,
        StreamPublisher,
    )

    have = set(StreamBook.objects.using(_SEED_DB).filter(seq__lt=n).values_list("seq", flat=True))
    missing = [seq for seq in range(n) if seq not in have]
    if not missing:
        return False
    with transaction.atomic(using=_SEED_DB):
        if not StreamAuthor.objects.using(_SEED_DB).exists():
            StreamAuthor.objects.using(_SEED_DB).bulk_create(
                (
                    StreamAuthor(name=f"author {i}", email=f"a{i}@example.com")
                    for i in range(AUTHORS)
                ),
                batch_size=_BATCH_SIZE,
            )
            StreamPublisher.objects.using(_SEED_DB).bulk_create(
                StreamPublisher(name=f"publisher {i}", country="NZ") for i in range(PUBLISHERS)
            )
            StreamCategory.objects.using(_SEED_DB).bulk_create(
                StreamCategory(name=f"category {i}") for i in range(CATEGORIES)
            )
        authors = list(StreamAuthor.objects.using(_SEED_DB).values_list("pk", flat=True))
        publishers = list(StreamPublisher.objects.using(_SEED_DB).values_list("pk", flat=True))
        categories = list(StreamCategory.objects.using(_SEED_DB).values_list("pk", flat=True))
        for start in range(0, len(missing), _BATCH_SIZE):
            books = StreamBook.objects.using(_SEED_DB).bulk_create(
                StreamBook(
                    seq=seq,
                    title=f"book {seq}",
                    author_id=authors[seq * 7919 % len(authors)],
                    translator_id=None
                    if seq % 3 == 0
                    else authors[(seq * 104_729 + 13) % len(authors)],
                    publisher_id=publishers[seq * 31 % len(publishers)],
                )
                for seq in missing[start : start + _BATCH_SIZE]
            )
            # 7 is coprime with 50: a book's (up to 3) categories are distinct.
            StreamBookCategory.objects.using(_SEED_DB).bulk_create(
                StreamBookCategory(
                    book=book, category_id=categories[(book.seq * 11 + j * 7) % len(categories)]
                )
                for book in books
                for j in range(book.seq % 4)
            )
    return True
