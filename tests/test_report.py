"""The N+1 report: ``prefetch_report()`` blocks and ``PrefetchReportMiddleware`` on real
views under Django's test client (sync and async), against the queries Django runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.core.exceptions import ObjectDoesNotExist
from django.db import connection
from django.db.models import Prefetch, prefetch_related_objects
from django.db.models.fields import related_descriptors
from django.http import HttpRequest, HttpResponse
from django.template import Context, Engine
from django.test import AsyncClient, Client, override_settings
from django.test.utils import CaptureQueriesContext
from django.urls import path

from async_prefetch import _compat
from async_prefetch.access import hooks
from async_prefetch.access.report import NPlusOneError, PrefetchReport, prefetch_report
from async_prefetch.api import aprefetch, prefetch
from tests.conftest import Bookstore
from tests.testapp.models import Author, Book, Comment

MIDDLEWARE = ["async_prefetch.access.middleware.PrefetchReportMiddleware"]
HERE = "tests/test_report.py"


def _line(marker: str) -> str:
    """``tests/test_report.py:N`` of the line of this file that ends with ``# <marker>``."""
    with open(__file__) as source:
        for number, text in enumerate(source, 1):
            if text.rstrip().endswith(f"# {marker}"):
                return f"{HERE}:{number}"
    raise AssertionError(marker)


# -- views --------------------------------------------------------------------------------


def publishers_view(request: HttpRequest) -> HttpResponse:
    books = Book.objects.order_by("pk")
    names = [str(book.publisher) for book in books if book.publisher_id]  # sync-view
    return HttpResponse(",".join(names))


def prefetched_view(request: HttpRequest) -> HttpResponse:
    books = list(Book.objects.order_by("pk").prefetch_related("pages", "authors"))  # fill
    pages = sum(len(book.pages.all()) for book in books)
    return HttpResponse(str(pages))


TEMPLATE = Engine().from_string(
    "{% for book in books %}\n{{ book.publisher.name }}\n{% endfor %}"  # template line 2
)


def template_view(request: HttpRequest) -> HttpResponse:
    books = Book.objects.order_by("pk")
    return HttpResponse(TEMPLATE.render(Context({"books": books})))  # template-view


def _page_counts(books: list[Book]) -> list[int]:
    return [len(book.pages.all()) for book in books]  # async-view


async def pages_view(request: HttpRequest) -> HttpResponse:
    books = [book async for book in Book.objects.order_by("pk")]
    counts = await sync_to_async(_page_counts)(books)
    return HttpResponse(str(sum(counts)))


async def clean_async_view(request: HttpRequest) -> HttpResponse:
    books = [book async for book in Book.objects.order_by("pk").prefetch_related("pages")]
    return HttpResponse(str(sum(len(book.pages.all()) for book in books)))


urlpatterns = [
    path("publishers/", publishers_view),
    path("prefetched/", prefetched_view),
    path("template/", template_view),
    path("pages/", pages_view),
    path("clean-async/", clean_async_view),
]


@pytest.fixture
def report_logs(caplog: pytest.LogCaptureFixture) -> Iterator[list[PrefetchReport]]:
    """The reports the middleware logged during the test."""
    caplog.set_level(logging.INFO, logger="async_prefetch.report")
    reports: list[PrefetchReport] = []
    yield reports
    reports.extend(
        record.prefetch_report  # type: ignore[attr-defined]
        for record in caplog.records
        if record.name == "async_prefetch.report"
    )


def _logged(caplog: pytest.LogCaptureFixture) -> list[PrefetchReport]:
    return [
        record.prefetch_report  # type: ignore[attr-defined]
        for record in caplog.records
        if record.name == "async_prefetch.report"
    ]


# -- the middleware under the test client ----------------------------------------------


@override_settings(ROOT_URLCONF=__name__, MIDDLEWARE=MIDDLEWARE)
def test_sync_view_n_plus_one_is_reported(
    bookstore: Bookstore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="async_prefetch.report")
    with CaptureQueriesContext(connection) as queries:
        response = Client().get("/publishers/")
    assert response.status_code == 200
    with_publisher = Book.objects.filter(publisher__isnull=False).count()
    assert with_publisher >= 2
    assert len(queries) == 1 + with_publisher  # Django ran the N+1 the report names
    (report,) = _logged(caplog)
    assert report.name == "GET /publishers/"
    (group,) = report.n_plus_one
    assert (group.model, group.relation, group.lookup) == ("Book", "publisher", "publisher")
    assert (group.loads, group.instances, group.peers) == (with_publisher, with_publisher, 1)
    assert group.where == _line("sync-view")
    assert report.lookups_to_add == ["publisher"]
    record = next(r for r in caplog.records if r.name == "async_prefetch.report")
    assert record.levelno == logging.WARNING
    assert f"N+1: Book.publisher (to-one) loaded one instance at a time for {with_publisher}" in (
        record.getMessage()
    )


@override_settings(ROOT_URLCONF=__name__, MIDDLEWARE=MIDDLEWARE)
def test_async_view_n_plus_one_is_reported(
    bookstore: Bookstore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="async_prefetch.report")
    response = async_to_sync(AsyncClient().get)("/pages/")
    assert response.status_code == 200
    (report,) = _logged(caplog)
    (group,) = report.n_plus_one
    books = len(bookstore.book_ids)
    assert (group.model, group.relation, group.many) == ("Book", "pages", True)
    assert (group.loads, group.instances) == (books, books)
    assert group.where == _line("async-view")
    assert report.lookups_to_add == ["pages"]


@override_settings(ROOT_URLCONF=__name__, MIDDLEWARE=MIDDLEWARE)
def test_clean_views_report_nothing(bookstore: Bookstore, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="async_prefetch.report")
    assert async_to_sync(AsyncClient().get)("/clean-async/").status_code == 200
    assert not _logged(caplog)  # an empty report is not logged


@override_settings(ROOT_URLCONF=__name__, MIDDLEWARE=MIDDLEWARE)
def test_template_location(bookstore: Bookstore, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="async_prefetch.report")
    assert Client().get("/template/").status_code == 200
    (report,) = _logged(caplog)
    (group,) = report.n_plus_one
    assert group.relation == "publisher"
    assert group.where == f"{_line('template-view')} (template <unknown source>:2)"


@override_settings(ROOT_URLCONF=__name__, MIDDLEWARE=MIDDLEWARE)
def test_prefetch_never_read_under_the_client(
    bookstore: Bookstore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="async_prefetch.report")
    assert Client().get("/prefetched/").status_code == 200
    (report,) = _logged(caplog)
    assert not report.n_plus_one
    (unread,) = report.unread
    assert (unread.model, unread.lookup) == ("Book", "authors")
    assert unread.instances == len(bookstore.book_ids)
    assert unread.where == _line("fill")
    assert report.lookups_to_remove == ["authors"]


@override_settings(
    ROOT_URLCONF=__name__, MIDDLEWARE=MIDDLEWARE, ASYNC_PREFETCH_REPORT={"RAISE": True}
)
def test_raise_setting_fails_the_request(bookstore: Bookstore) -> None:
    with pytest.raises(NPlusOneError, match=r"Book\.publisher"):
        Client().get("/publishers/")
    with pytest.raises(NPlusOneError, match=r"Book\.pages"):
        async_to_sync(AsyncClient().get)("/pages/")
    with pytest.raises(NPlusOneError, match=r"Book\.publisher"):  # a sync view under ASGI
        async_to_sync(AsyncClient().get)("/publishers/")
    assert Client().get("/prefetched/").status_code == 200  # unread prefetches do not raise


@override_settings(
    ROOT_URLCONF=__name__,
    MIDDLEWARE=MIDDLEWARE,
    ASYNC_PREFETCH_REPORT={"RAISE": True, "THRESHOLD": 100},
)
def test_threshold_setting(bookstore: Bookstore) -> None:
    assert Client().get("/publishers/").status_code == 200


# -- blocks -------------------------------------------------------------------------------


def _load_locations() -> None:
    for author in Author.objects.all():
        author.location  # noqa: B018


def _raising_block(fail: bool = False) -> None:
    with prefetch_report(raise_on_n_plus_one=True, log=False):
        _load_locations()
        if fail:
            raise KeyError("mine")


def test_block_raise_mode(bookstore: Bookstore) -> None:
    with pytest.raises(NPlusOneError) as raised:
        _raising_block()
    assert raised.value.report.n_plus_one[0].relation == "location"
    assert 'add "location" (select_related or prefetch_related)' in str(raised.value)
    with prefetch_report(raise_on_n_plus_one=True, log=False) as report:
        book = Book.objects.filter(publisher__isnull=False).first()
        assert book is not None
        book.publisher  # noqa: B018  (one load: not an N+1)
    assert report.lazy_loads
    assert not report.n_plus_one


@pytest.fixture
def open_report() -> Iterator[PrefetchReport]:
    """The pattern of the guide: a report around the whole test."""
    with prefetch_report(log=False) as report:
        yield report


def test_report_opened_by_a_fixture(bookstore: Bookstore, open_report: PrefetchReport) -> None:
    _load_locations()
    assert [g.relation for g in open_report.n_plus_one] == ["location"]


def test_block_error_is_not_masked(bookstore: Bookstore) -> None:
    with pytest.raises(KeyError):
        _raising_block(fail=True)


def test_nested_unread_level(bookstore: Bookstore) -> None:
    with prefetch_report(log=False) as report:
        books = list(Book.objects.prefetch_related("authors__location", "publisher"))  # nested
        for book in books:
            list(book.authors.all())
    assert [(u.model, u.lookup, u.where) for u in report.unread] == [
        ("Author", "authors__location", _line("nested")),
        ("Book", "publisher", _line("nested")),
    ]
    assert report.lookups_to_remove == ["authors__location", "publisher"]
    with prefetch_report(log=False) as report:
        books = list(Book.objects.prefetch_related("authors__location"))
    # Neither level was read: the shorter lookup is the one to remove.
    assert report.lookups_to_remove == ["authors"]


def test_unread_to_one_and_walks(bookstore: Bookstore) -> None:
    """A to-one level is unread although Django's own walk read it to reach the next one."""
    with prefetch_report(log=False) as report:
        books = list(Book.objects.prefetch_related("publisher", "authors__location"))
        for book in books:
            for author in book.authors.all():
                author.location  # noqa: B018
    assert [u.lookup for u in report.unread] == ["publisher"]
    with prefetch_report(log=False) as report:
        books = list(Book.objects.prefetch_related("publisher__books"))
        for book in books:
            book.publisher  # noqa: B018
    assert [u.lookup for u in report.unread] == ["publisher__books"]
    assert not report.n_plus_one


def test_generic_and_reverse_one_to_one_reads(bookstore: Bookstore) -> None:
    with prefetch_report(log=False) as report:
        comments = list(Comment.objects.prefetch_related("content_object"))
        books = list(Book.objects.prefetch_related("profile"))
        for comment in comments:
            comment.content_object  # noqa: B018
        for book in books:
            with contextlib.suppress(ObjectDoesNotExist):
                book.profile  # noqa: B018  (a cached None raises: still a read)
    assert not report.unread
    with prefetch_report(log=False) as report:
        list(Comment.objects.prefetch_related("content_object"))
        list(Book.objects.prefetch_related("profile", Prefetch("pages", to_attr="page_list")))
    # A to_attr list is a plain attribute whose reads are not seen: never reported.
    assert sorted(u.lookup for u in report.unread) == ["content_object", "profile"]


def test_prefetch_related_objects_and_reread(bookstore: Bookstore) -> None:
    books = list(Book.objects.all())
    with prefetch_report(log=False) as report:
        prefetch_related_objects(books, "pages", "tags")
        for book in books[:1]:
            list(book.tags.all())
    assert [u.lookup for u in report.unread] == ["pages"]


def test_engine_instances_name_the_lookup_and_call(bookstore: Bookstore) -> None:
    with prefetch_report(log=False) as report:
        books = prefetch(Book.objects.order_by("pk"), "authors")  # engine-call
        for book in books:
            for author in book.authors.all():
                author.location  # noqa: B018
    groups = report.n_plus_one
    assert [(g.model, g.relation, g.lookup) for g in groups] == [
        ("Author", "location", "authors__location")
    ]
    assert groups[0].origin == _line("engine-call")
    assert f'add "authors__location" to the prefetch call at {_line("engine-call")}' in str(report)


def test_reports_are_isolated_between_tasks(bookstore: Bookstore) -> None:
    """Two reports open at once in two asyncio tasks, their loads interleaved on one
    thread: each sees only its own."""

    def load_publishers() -> None:
        for book in Book.objects.all():
            book.publisher  # noqa: B018

    def load_locations() -> None:
        for author in Author.objects.all():
            author.location  # noqa: B018

    async def main() -> tuple[PrefetchReport, PrefetchReport]:
        barrier = asyncio.Barrier(2)

        async def task(load: Any) -> PrefetchReport:
            with prefetch_report(log=False) as report:
                await barrier.wait()  # both reports open
                await sync_to_async(load)()
                await barrier.wait()
                await sync_to_async(load)()
            return report

        return await asyncio.gather(task(load_publishers), task(load_locations))

    first, second = async_to_sync(main)()
    assert {(g.model, g.relation) for g in first.lazy_loads} == {("Book", "publisher")}
    assert {(g.model, g.relation) for g in second.lazy_loads} == {("Author", "location")}
    with_publisher = Book.objects.filter(publisher__isnull=False).count()
    assert first.n_plus_one[0].loads == first.n_plus_one[0].instances == 2 * with_publisher


def test_async_engine_call_in_a_report(bookstore: Bookstore) -> None:
    async def main() -> PrefetchReport:
        with prefetch_report(log=False) as report:
            books = await aprefetch(Book.objects.order_by("pk"), "pages")  # async-engine
            await sync_to_async(lambda: [book.publisher for book in books])()
        return report

    report = async_to_sync(main)()
    (group,) = report.n_plus_one
    assert (group.lookup, group.origin) == ("publisher", _line("async-engine"))


def test_hooks_only_while_a_report_is_open(bookstore: Bookstore) -> None:
    """No report, no read hooks: the descriptors are the ones without them."""
    hooks.ensure_installed()
    forward = related_descriptors.ForwardManyToOneDescriptor.__dict__["__get__"]
    reverse = related_descriptors.ReverseOneToOneDescriptor.__dict__["__get__"]
    with prefetch_report(log=False), prefetch_report(log=False):
        assert related_descriptors.ForwardManyToOneDescriptor.__dict__["__get__"] is not forward
    assert related_descriptors.ForwardManyToOneDescriptor.__dict__["__get__"] is forward
    assert related_descriptors.ReverseOneToOneDescriptor.__dict__["__get__"] is reverse


@pytest.mark.skipif(not _compat.HAS_FETCH_MODES, reason="Django 6.1's fetch modes")
def test_fetch_peers_is_not_an_n_plus_one(bookstore: Bookstore) -> None:
    from django.db.models import FETCH_PEERS

    with prefetch_report(log=False) as report:
        for book in Book.objects.fetch_mode(FETCH_PEERS):  # type: ignore[attr-defined]
            book.publisher  # noqa: B018
    (group,) = report.lazy_loads
    assert group.peers > 1
    assert not report.n_plus_one
    assert not report.unread  # what FETCH_PEERS fetched was read


def test_engine_prefetch_never_read(bookstore: Bookstore, installed: None) -> None:
    """Prefetches the engine ran (``install()``'s ``prefetch_related``, ``prefetch()``)."""
    with prefetch_report(log=False) as report:
        queryset = Book.objects.order_by("pk").prefetch_related("pages", "authors__location")
        books = list(queryset)  # routed
        for book in books:
            list(book.pages.all())
            list(book.authors.all())
        books = prefetch(Book.objects.order_by("pk"), "tags", "publisher")  # engine-fill
        for book in books:
            book.publisher  # noqa: B018
    assert [(u.model, u.lookup, u.where) for u in report.unread] == [
        ("Author", "authors__location", _line("routed")),
        ("Book", "tags", _line("engine-fill")),
    ]


def test_uninstall_under_an_open_report(bookstore: Bookstore) -> None:
    """``hooks.uninstall()`` while a report is open: the report keeps its read hooks, on
    Django's own descriptors, and closing it leaves Django's own code."""
    hooks.ensure_installed()
    try:
        with prefetch_report(log=False) as report:
            hooks.uninstall()
            django_get = related_descriptors.ReverseOneToOneDescriptor.__dict__["__get__"]
            assert (
                django_get.__wrapped__.__module__ == "django.db.models.fields.related_descriptors"
            )
            books = list(Book.objects.prefetch_related("publisher"))
            for book in books:
                book.publisher  # noqa: B018
        assert not report.unread
        current = related_descriptors.ReverseOneToOneDescriptor.__dict__["__get__"]
        assert current is django_get.__wrapped__
    finally:
        hooks.ensure_installed()
