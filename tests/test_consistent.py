"""``consistent=True``: every query of one call sees one database snapshot.

A writer commits between the call's first stage (the root query) and its second (the
prefetches), triggered by the first stage's completion: without ``consistent`` the second
stage sees the write (the stages disagree), with it never.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import psycopg
import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.db import connection, connections, transaction
from django.db import utils as django_db_utils
from django.db.models import Prefetch
from django.db.transaction import TransactionManagementError
from django.test.utils import CaptureQueriesContext

import async_prefetch
from async_prefetch.execution.pools import connection_kwargs
from async_prefetch.gather import agather
from async_prefetch.runtime import bridge
from async_prefetch.runtime.session import Session
from async_prefetch.streaming import iterator
from tests.factories import seed_bookstore
from tests.run_state import busy_engine_connections, settle_pool, sleepers
from tests.server_time import SLEEP, SLEEPING, slow, start_of
from tests.servers import Unavailable, pgbouncer_databases
from tests.testapp.models import Author, Book, Page, Review
from tests.thirdparty.models import Pet

pytestmark = pytest.mark.django_db(transaction=True)


def write_after_first_read(
    monkeypatch: pytest.MonkeyPatch, write: Callable[[psycopg.Connection[Any]], None]
) -> list[int]:
    """Once the first query of a call has been read, ``write`` runs (and commits) on a
    connection of its own; returns the list of the writes done so far (``[1]`` after)."""
    writes: list[int] = []
    original = Session.fetch_instances

    async def fetch_instances(self: Session, compiled: Any, *args: Any) -> Any:
        instances = await original(self, compiled, *args)
        if not writes:
            kwargs = {**connection_kwargs("default")}
            kwargs.pop("cursor_factory")
            with psycopg.connect(**kwargs) as conn:
                write(conn)
            writes.append(1)
        return instances

    monkeypatch.setattr(Session, "fetch_instances", fetch_instances)
    return writes


@pytest.fixture
def writer_after_first_stage(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """After the first query of a call has been read, a writer on a connection of its own
    commits a new page for every book; yields the numbers of the writes done so far."""
    seed_bookstore()

    def write(conn: psycopg.Connection[Any]) -> None:
        conn.execute(
            "INSERT INTO testapp_page (book_id, number, text) "
            "SELECT id, 1000, 'late' FROM testapp_book"
        )

    return write_after_first_read(monkeypatch, write)


def _late_pages(books: list[Book]) -> int:
    return sum(page.number == 1000 for book in books for page in book.pages.all())


def test_without_consistent_the_stages_disagree(writer_after_first_stage: list[int]) -> None:
    books = async_prefetch.prefetch(Book.objects.order_by("pk"), "pages")
    assert writer_after_first_stage == [1]
    assert _late_pages(books) == len(books)  # the second stage saw the write


#: The two strategies: the pool with an exported snapshot (the default), and one pipelined
#: transaction on one pooled connection (``PIPELINE: True``, or ``round_trips=1``).
STRATEGIES = pytest.mark.parametrize("pipeline", ["atomic", True], ids=["snapshot", "pipeline"])


@STRATEGIES
def test_consistent_prefetch_sees_one_snapshot(
    writer_after_first_stage: list[int], settings: Any, pipeline: Any
) -> None:
    settings.ASYNC_PREFETCH = {"PIPELINE": pipeline}
    books = async_prefetch.prefetch(
        Book.objects.order_by("pk"), "pages", "authors__books__pages", consistent=True
    )
    assert writer_after_first_stage == [1]
    assert _late_pages(books) == 0
    deep = [b for book in books for a in book.authors.all() for b in a.books.all()]
    assert deep
    assert _late_pages(deep) == 0
    assert Page.objects.filter(number=1000).count() == len(books)  # the write is there


@pytest.mark.parametrize("round_trips", [None, 1])
def test_consistent_aprefetch_and_agather(
    writer_after_first_stage: list[int], round_trips: int | None
) -> None:
    async def run() -> tuple[list[Book], list[Author]]:
        books, authors = await agather(
            Book.objects.order_by("pk").prefetch_related("pages"),
            Author.objects.order_by("pk").prefetch_related("books__pages"),
            consistent=True,
            round_trips=round_trips,
        )
        return books, authors

    books, authors = async_to_sync(run)()
    assert writer_after_first_stage == [1]
    assert _late_pages(books) == 0
    assert _late_pages([b for a in authors for b in a.books.all()]) == 0
    late = async_to_sync(async_prefetch.aprefetch)(
        Book.objects.order_by("pk"), "pages", consistent=True
    )
    assert _late_pages(late) == len(late)  # a new call, a new snapshot


def test_consistent_setting(writer_after_first_stage: list[int], settings: Any) -> None:
    settings.ASYNC_PREFETCH = {"CONSISTENT": True}
    books = async_prefetch.prefetch(Book.objects.order_by("pk"), "pages")
    assert _late_pages(books) == 0
    books = async_prefetch.prefetch(Book.objects.order_by("pk"), "pages", consistent=False)
    assert _late_pages(books) == len(books)


@STRATEGIES
def test_consistent_queries_still_run_at_once(settings: Any, pipeline: Any) -> None:
    """On the pool (the default) a stage's queries overlap in the server; in one
    pipelined transaction the server runs them one after another."""
    settings.ASYNC_PREFETCH = {"PIPELINE": pipeline}
    seed_bookstore()
    books = async_prefetch.prefetch(
        Book.objects.order_by("pk"),
        Prefetch("pages", queryset=slow(Page.objects.all())),
        Prefetch("reviews", queryset=slow(Review.objects.all())),
        Prefetch("authors", queryset=slow(Author.objects.all())),
        consistent=True,
    )
    starts = sorted(
        [
            start_of([p for b in books for p in b.pages.all()]),
            start_of([r for b in books for r in b.reviews.all()]),
            start_of([a for b in books for a in b.authors.all()]),
        ]
    )
    spread = (starts[-1] - starts[0]).total_seconds()
    if pipeline is True:
        assert spread >= 2 * SLEEP * 0.9
    else:
        assert spread < SLEEP  # one after another would be 2 * SLEEP apart


@STRATEGIES
def test_the_call_returns_its_connection_and_ends_its_transaction(
    settings: Any, pipeline: Any
) -> None:
    settings.ASYNC_PREFETCH = {"PIPELINE": pipeline}
    seed_bookstore()
    async_prefetch.prefetch(Book.objects.all(), "pages", "authors", consistent=True)
    assert busy_engine_connections() == 0
    # A failing call ends it too.
    with pytest.raises(django_db_utils.ProgrammingError):
        async_prefetch.prefetch(
            Book.objects.all(),
            async_prefetch_prefetch_failing(),
            consistent=True,
        )
    assert busy_engine_connections() == 0


def async_prefetch_prefetch_failing() -> Any:
    return Prefetch("pages", queryset=Page.objects.extra(where=["no_such_column = 1"]))


FAILING_REVIEWS = Prefetch("reviews", queryset=Review.objects.extra(where=["no_such_column = 1"]))


def test_inside_read_committed_atomic_consistent_is_refused() -> None:
    seed_bookstore()
    with transaction.atomic():
        with pytest.raises(TransactionManagementError, match="REPEATABLE READ"):
            async_prefetch.prefetch(Book.objects.all(), "pages", consistent=True)
        transaction.set_rollback(True)


# -- behind PgBouncer in transaction pooling mode ------------------------------------------


@pytest.fixture(scope="module")
def bouncer(django_db_setup: None) -> Iterator[str]:
    """An alias of the test database through PgBouncer in transaction pooling mode."""
    alias = "bouncer_consistent"  # extra_databases(): one use per alias and process
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(
                pgbouncer_databases(3, {alias: {"DISABLE_SERVER_SIDE_CURSORS": True}})
            )
        except Unavailable as exc:
            pytest.skip(f"no PgBouncer: {exc}")
        yield alias


@pytest.mark.django_db(transaction=True, databases=["default", "bouncer_consistent"])
def test_consistent_and_pipelines_through_pgbouncer(
    bouncer: str, writer_after_first_stage: list[int]
) -> None:
    books = async_prefetch.prefetch(
        Book.objects.using(bouncer).order_by("pk"), "pages", "authors", consistent=True
    )
    assert writer_after_first_stage == [1]
    assert _late_pages(books) == 0
    books = async_prefetch.prefetch(Book.objects.using(bouncer).order_by("pk"), "pages")
    assert _late_pages(books) == len(books)
    # Inside atomic: each stage one pipeline on the caller's connection through PgBouncer.
    with transaction.atomic(using=bouncer):
        book = Book.objects.using(bouncer).order_by("pk").first()
        assert book is not None
        Page.objects.using(bouncer).create(book=book, number=2000)
        got = async_prefetch.prefetch(Book.objects.using(bouncer).order_by("pk"), "pages", "tags")
        assert 2000 in [page.number for page in got[0].pages.all()]
        transaction.set_rollback(True, using=bouncer)


# -- cancellation: nothing left running, nothing held ---------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("round_trips", [None, 1], ids=["snapshot", "pipeline"])
async def test_cancelled_call_stops_its_queries_and_releases_everything(
    round_trips: int | None,
) -> None:
    await sync_to_async(seed_bookstore)()
    started = time.perf_counter()
    with anyio.move_on_after(0.5) as scope:
        await agather(
            Book.objects.order_by("pk").prefetch_related("pages", SLEEPING),
            consistent=True,
            round_trips=round_trips,
        )
    assert scope.cancelled_caught
    # Stopped in the server, not waited for: SLEEPING sleeps 5 s.
    assert time.perf_counter() - started < 4
    assert await sync_to_async(sleepers)() == 0
    assert await bridge.run_async(settle_pool) == 0
    assert await sync_to_async(busy_engine_connections)() == 0  # no open transaction
    await async_prefetch.aclose()


@pytest.mark.parametrize(
    ("consistent", "round_trips"), [(True, None), (True, 1), (None, 1)], ids=str
)
def test_a_failing_query_fails_the_call_with_djangos_error(
    consistent: bool | None, round_trips: int | None
) -> None:
    seed_bookstore()

    async def gather() -> Any:
        return await agather(
            Book.objects.prefetch_related("pages", FAILING_REVIEWS, "tags"),
            Author.objects.all(),
            consistent=consistent,
            round_trips=round_trips,
        )

    with pytest.raises(django_db_utils.ProgrammingError, match="no_such_column") as caught:
        async_to_sync(gather)()
    assert isinstance(caught.value.__cause__, psycopg.errors.UndefinedColumn)
    assert async_to_sync(bridge.run_async)(settle_pool) == 0
    assert busy_engine_connections() == 0


# -- streams: the root cursor's snapshot, imported by every chunk's prefetches -------------


@pytest.mark.parametrize(
    ("consistent", "server_side_cursors"),
    [(False, True), (True, True), (True, False)],
    ids=["not-consistent", "cursor", "no-cursor"],
)
def test_iterator_chunks_share_the_root_snapshot(
    writer_after_first_stage: list[int], consistent: bool, server_side_cursors: bool
) -> None:
    """The writer commits once the first chunk's first prefetch is read: the later chunks'
    prefetches see it, unless the stream is consistent."""
    settings_dict = connections["default"].settings_dict
    saved = settings_dict.get("DISABLE_SERVER_SIDE_CURSORS", False)
    settings_dict["DISABLE_SERVER_SIDE_CURSORS"] = not server_side_cursors
    try:
        books = list(
            iterator(Book.objects.order_by("pk"), "pages", chunk_size=2, consistent=consistent)
        )
    finally:
        settings_dict["DISABLE_SERVER_SIDE_CURSORS"] = saved
    assert writer_after_first_stage == [1]
    assert len(books) == Book.objects.count()
    assert _late_pages(books[:2]) == 0  # read before the write
    assert _late_pages(books[2:]) == (0 if consistent else len(books) - 2)


@pytest.mark.parametrize(
    ("consistent", "pipeline"),
    [(False, "atomic"), (True, "atomic"), (True, True)],
    ids=["not-consistent", "snapshot", "pipeline"],
)
def test_levels_django_runs_see_the_snapshot_too(
    monkeypatch: pytest.MonkeyPatch, settings: Any, consistent: bool, pipeline: Any
) -> None:
    """django-taggit's prefetcher is delegated: Django's own code runs its query on a
    worker thread, which imports the call's snapshot."""
    settings.ASYNC_PREFETCH = {"PIPELINE": pipeline}
    for index in range(3):
        Pet.objects.create(name=f"pet {index}").tags.add("early")
    tag_table = Pet.tags.through.tag_model()._meta.db_table
    through = Pet.tags.through._meta.db_table
    pet_table = Pet._meta.db_table

    def write(conn: psycopg.Connection[Any]) -> None:
        (tag_id,) = conn.execute(
            f"INSERT INTO {tag_table} (name, slug) VALUES ('late', 'late') RETURNING id"
        ).fetchone() or (None,)
        conn.execute(
            f"INSERT INTO {through} (content_object_id, tag_id) SELECT id, %s FROM {pet_table}",
            [tag_id],
        )

    writes = write_after_first_read(monkeypatch, write)
    pets = async_prefetch.prefetch(Pet.objects.order_by("pk"), "tags", consistent=consistent)
    assert writes == [1]
    late = [pet for pet in pets if "late" in [tag.name for tag in pet.tags.all()]]
    assert len(late) == (0 if consistent else 3)


def test_a_call_starting_with_a_level_django_runs() -> None:
    """No query of the engine's before the delegated level: it exports the snapshot."""
    Pet.objects.create(name="pet").tags.add("early")
    pets = list(Pet.objects.all())
    with CaptureQueriesContext(connection) as queries:
        async_prefetch.prefetch(pets, "tags", consistent=True)
    assert [tag.name for tag in pets[0].tags.all()] == ["early"]
    assert len(queries) == 1, [q["sql"][:80] for q in queries]  # the snapshot is not logged


def test_inside_repeatable_read_atomic_consistent_runs_in_the_transaction() -> None:
    seed_bookstore()
    conn = connections["default"]
    options = conn.settings_dict["OPTIONS"]
    saved = dict(options)
    conn.close()
    options["isolation_level"] = psycopg.IsolationLevel.REPEATABLE_READ
    try:
        with transaction.atomic():
            book = Book.objects.order_by("pk").first()
            assert book is not None
            Page.objects.create(book=book, number=3000)  # uncommitted: seen
            books = async_prefetch.prefetch(Book.objects.order_by("pk"), "pages", consistent=True)
            assert 3000 in [page.number for page in books[0].pages.all()]
            transaction.set_rollback(True)
    finally:
        conn.close()
        options.clear()
        options.update(saved)
