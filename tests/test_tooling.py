"""Engine queries show up where Django tooling looks: django-debug-toolbar's SQL panel
and the caller's connection's ``execute_wrappers`` (which can also block them)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.conf import settings
from django.db import connection, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Prefetch
from django.http import HttpRequest, HttpResponse
from django.test import AsyncClient, Client, override_settings
from django.test.utils import CaptureQueriesContext
from django.urls import include, path

import async_prefetch
from async_prefetch.execution.querylog import instrumented_like
from tests.factories import seed_bookstore
from tests.run_state import state_of
from tests.testapp.models import Book, Page

# Six relation queries and the books': seven queries, each its own table.
LOOKUPS = ["pages", "authors", "authors__location", "publisher", "tags", "reviews"]
QUERIES = 1 + len(LOOKUPS)


def page(books: list[Any]) -> HttpResponse:
    pages = sum(len(book.pages.all()) for book in books)
    return HttpResponse(f"<html><body>{len(books)} books, {pages} pages</body></html>")


def django_view(request: HttpRequest) -> HttpResponse:
    return page(list(Book.objects.order_by("pk").prefetch_related(*LOOKUPS)))


def installed_view(request: HttpRequest) -> HttpResponse:
    async_prefetch.install()
    try:
        return page(list(Book.objects.order_by("pk").prefetch_related(*LOOKUPS)))
    finally:
        async_prefetch.uninstall()


async def async_view(request: HttpRequest) -> HttpResponse:
    return page(await async_prefetch.aprefetch(Book.objects.order_by("pk"), *LOOKUPS))


class URLconf:
    """The toolbar tests' URLconf (built once ``debug_toolbar`` is an installed app)."""

    def __init__(self) -> None:
        self.urlpatterns = [
            path("django/", django_view),
            path("installed/", installed_view),
            path("async/", async_view),
            path("__debug__/", include("debug_toolbar.urls")),
        ]


@pytest.fixture
def toolbar() -> Iterator[None]:
    """The toolbar's middleware and SQL panel on every request of the test client.

    Settings first: the toolbar's ``ready()`` reads them when the app is installed.
    The URLconf is an object (Django reads its ``urlpatterns``) built once the
    toolbar's URLs can be imported.
    """
    with (
        override_settings(
            MIDDLEWARE=["debug_toolbar.middleware.DebugToolbarMiddleware"],
            STATIC_URL="/static/",
            TEMPLATES=[
                {"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}
            ],
            DEBUG_TOOLBAR_PANELS=["debug_toolbar.panels.sql.SQLPanel"],
            DEBUG_TOOLBAR_CONFIG={
                "IS_RUNNING_TESTS": False,
                "SHOW_TOOLBAR_CALLBACK": lambda request: True,
                "ENABLE_STACKTRACES": False,
            },
        ),
        override_settings(INSTALLED_APPS=[*settings.INSTALLED_APPS, "debug_toolbar"]),
    ):
        from debug_toolbar.store import get_store

        store: Any = get_store()
        with override_settings(ROOT_URLCONF=URLconf()):
            store.clear()
            yield
            store.clear()


def panel_queries() -> list[dict[str, Any]]:
    """The queries the SQL panel recorded for the one request since the store was cleared."""
    from debug_toolbar.store import get_store

    store: Any = get_store()
    (request_id,) = store.request_ids()
    queries: list[dict[str, Any]] = store.panel(request_id, "SQLPanel")["queries"]
    store.clear()
    return queries


def tables(queries: list[dict[str, Any]]) -> list[str]:
    """The table each query reads first, sorted (engine and Django SQL differ otherwise)."""
    return sorted(q["raw_sql"].split(" FROM ", 1)[1].split()[0] for q in queries)


def get(client: Client, url: str) -> None:
    response = client.get(url)
    assert response.status_code == 200
    assert b"books" in response.content


@pytest.mark.django_db(transaction=True)
def test_sql_panel_shows_every_query_of_an_installed_sync_view(toolbar: None) -> None:
    seed_bookstore()
    get(Client(), "/django/")
    by_django = panel_queries()
    get(Client(), "/installed/")
    by_engine = panel_queries()
    assert len(by_django) == QUERIES
    assert len(by_engine) == len(by_django)
    assert tables(by_engine) == tables(by_django)
    for query in by_engine:
        assert query["alias"] == "default"
        assert query["vendor"] == "postgresql"
        assert query["duration"] >= 0
        assert query["sql"].startswith("SELECT")


@pytest.mark.anyio
@pytest.mark.django_db(transaction=True)
async def test_sql_panel_shows_every_query_of_an_async_view(toolbar: None) -> None:
    from asgiref.sync import sync_to_async

    await sync_to_async(seed_bookstore)()
    client = AsyncClient()
    response = await client.get("/django/")
    assert response.status_code == 200
    by_django = await sync_to_async(panel_queries)()
    response = await client.get("/async/")
    assert response.status_code == 200
    assert b"books" in response.content
    by_engine = await sync_to_async(panel_queries)()
    assert len(by_django) == QUERIES
    assert len(by_engine) == len(by_django)
    assert tables(by_engine) == tables(by_django)
    (pages,) = [q for q in by_engine if '"testapp_page"' in q["raw_sql"].split(" FROM ", 1)[1]]
    assert "%s" in pages["raw_sql"]
    assert pages["params"]  # the books' keys, decoded for the panel
    assert "%s" not in pages["sql"]


Wrapper = Callable[..., Any]


def recording(calls: list[tuple[str, Any, bool, dict[str, Any]]]) -> Wrapper:
    def wrapper(execute: Wrapper, sql: str, params: Any, many: bool, context: Any) -> Any:
        calls.append((sql, params, many, context))
        return execute(sql, params, many, context)

    return wrapper


@pytest.mark.django_db(transaction=True)
def test_execute_wrappers_see_every_engine_query() -> None:
    seed_bookstore()
    books = list(Book.objects.order_by("pk"))
    calls: list[tuple[str, Any, bool, dict[str, Any]]] = []
    outer: list[str] = []

    def tagging(execute: Wrapper, sql: str, params: Any, many: bool, context: Any) -> Any:
        outer.append(sql)  # the outermost wrapper, called first
        return execute(f"{sql} /* tagged */", params, many, context)

    with (
        CaptureQueriesContext(connection) as captured,
        connection.execute_wrapper(tagging),
        connection.execute_wrapper(recording(calls)),
    ):
        async_prefetch.prefetch_related_objects(books, *LOOKUPS)
    assert len(calls) == len(outer) == len(LOOKUPS)
    assert all(sql.endswith(" /* tagged */") for sql, _, _, _ in calls)
    assert all(context["connection"] is connections["default"] for _, _, _, context in calls)
    assert not any(many for _, _, many, _ in calls)
    # What ran is what the innermost wrapper passed on.
    assert len(captured.captured_queries) == len(LOOKUPS)
    assert all(q["sql"].endswith(" /* tagged */") for q in captured.captured_queries)
    assert all("pages" in vars(book)["_prefetched_objects_cache"] for book in books)


def ran_in_server(marker: str) -> int:
    """Backends of other connections whose last query mentions ``marker``."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE %s AND pid <> pg_backend_pid()",
            [f"%{marker}%"],
        )
        (count,) = cursor.fetchone()
    return int(count)


class Blocked(Exception):
    pass


@pytest.mark.django_db(transaction=True)
def test_blocking_execute_wrapper_stops_engine_queries_before_the_server() -> None:
    seed_bookstore()
    books = list(Book.objects.order_by("pk"))
    before = state_of(books)
    marker = "blocked_by_wrapper_7f3a"
    lookup = Prefetch("pages", queryset=Page.objects.extra(where=[f"'{marker}' <> ''"]))

    def blocker(execute: Wrapper, sql: str, params: Any, many: bool, context: Any) -> Any:
        raise Blocked(sql)

    with connection.execute_wrapper(blocker), pytest.raises(Blocked) as raised:
        async_prefetch.prefetch_related_objects(books, lookup)
    assert marker in str(raised.value)
    assert ran_in_server(marker) == 0
    assert state_of(books) == before
    async_prefetch.prefetch_related_objects(books, lookup)  # unblocked: it runs
    assert ran_in_server(marker) == 1


class PanelStandIn:
    """What the toolbar's cursor wrapper calls on the SQL panel (its ``logger``)."""

    def __init__(self) -> None:
        self.recorded: list[dict[str, Any]] = []

    def record(self, **kwargs: Any) -> None:
        self.recorded.append(kwargs)

    def new_transaction_id(self, alias: str) -> str:
        return "t"

    def current_transaction_id(self, alias: str) -> str:
        return "t"


@pytest.mark.django_db(transaction=True)
def test_worker_thread_connection_borrows_the_callers_instrumentation(toolbar: None) -> None:
    """What the engine needs for Django code it runs on a worker thread: that thread's
    connection goes through the caller's wrappers and reaches the caller's SQL panel
    while borrowed, and only then."""
    caller = connections["default"]
    panel = PanelStandIn()
    calls: list[tuple[str, Any, bool, dict[str, Any]]] = []
    seen: list[BaseDatabaseWrapper] = []

    def on_worker() -> None:
        worker = connections["default"]
        seen.append(worker)
        try:
            with instrumented_like(caller, worker):
                Book.objects.filter(title="borrowed").count()
            Book.objects.filter(title="own").count()
        finally:
            worker.close()

    caller._djdt_logger = panel  # type: ignore[attr-defined]  # as the SQL panel does
    try:
        with caller.execute_wrapper(recording(calls)):
            thread = threading.Thread(target=on_worker)
            thread.start()
            thread.join()
    finally:
        caller._djdt_logger = None  # type: ignore[attr-defined]
    (worker,) = seen
    assert worker is not caller
    assert [params for _, params, _, _ in calls] == [("borrowed",)]
    assert [query["params"] for query in panel.recorded] == [["borrowed"]]
