"""Learned plans: lookups reached lazily after a call are added to the site's next call."""

from __future__ import annotations

from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.test.utils import CaptureQueriesContext

import async_prefetch
from async_prefetch.access import learn
from async_prefetch.access.learn import forget_learned, plan_for
from async_prefetch.access.modes import LazyLoadInAsyncContext
from async_prefetch.runtime.trace import tracing
from tests.cache_snapshot import assert_same_prefetch
from tests.test_autoprefetch import touch
from tests.testapp.models import Author, Book

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _forget() -> Any:
    forget_learned()
    yield
    forget_learned()


def view(**kwargs: Any) -> tuple[list[Book], int]:
    """A view: prefetches authors, then its template reads more than that."""
    books = async_prefetch.prefetch(Book.objects.order_by("pk"), "authors", learn=True, **kwargs)
    with CaptureQueriesContext(connection) as ctx:
        touch(books, "authors__location")
        touch(books, "pages")
    return books, len(ctx.captured_queries)


def test_second_call_has_no_lazy_loads(bookstore: Any) -> None:
    _, lazy = view()
    assert lazy > 2  # one query per author and per book: the N+1 the plan learns from
    with tracing() as trace:
        again, lazy = view()
    assert lazy == 0
    assert trace.learned == ["authors__location", "pages"]
    assert trace.queries == 4  # books, authors, locations, pages: up front
    expected = list(Book.objects.order_by("pk").prefetch_related("authors__location", "pages"))
    assert_same_prefetch(expected, again, ["authors__location", "pages"], modes=False)


def test_sites_and_keys_are_separate(bookstore: Any) -> None:
    view(key="a")
    _, lazy = view(key="b")
    assert lazy > 0
    _, lazy = view(key="a")
    assert lazy == 0
    forget_learned("a")
    _, lazy = view(key="a")
    assert lazy > 0


def test_call_site_is_the_default_key(bookstore: Any) -> None:
    counts = []
    for _ in range(2):  # one site: the second iteration's call learned from the first's
        books = async_prefetch.prefetch(Book.objects.order_by("pk"), learn=True)
        with CaptureQueriesContext(connection) as ctx:
            touch(books, "publisher")
        counts.append(len(ctx.captured_queries))
    assert counts[0] > 1
    assert counts[1] == 0


def test_off_by_default_and_bounded(bookstore: Any) -> None:
    books = async_prefetch.prefetch(Book.objects.order_by("pk"))
    touch(books, "publisher")
    assert not learn._plans
    plan = plan_for("bounded")
    for i in range(learn.MAX_LOOKUPS + 5):
        plan.note(f"rel{i}")
    plan.note("a__b__c__d__e")
    assert len(plan.lookups) == learn.MAX_LOOKUPS
    assert "a__b__c__d__e" not in plan.lookups


def test_lookups_that_do_not_resolve_are_not_added(bookstore: Any) -> None:
    """A key reused for another model, or a lookup the call already has, adds nothing."""
    plan = plan_for("shared")
    plan.note("authors__location")
    plan.note("publisher")
    authors = async_prefetch.prefetch(Author.objects.order_by("pk"), learn=True, key="shared")
    assert authors
    assert not hasattr(authors[0], "_prefetched_objects_cache")
    assert plan.lookups_for(Book, ["publisher"]) == ["authors__location"]


@pytest.mark.anyio
async def test_async_view_learns_from_the_refused_access(bookstore: Any) -> None:
    """In an event loop the lazy access is refused with the lookup to add, and noted:
    the next call from the site prefetches it."""

    async def async_view() -> list[Book]:
        return await async_prefetch.aprefetch(
            Book.objects.order_by("pk"), learn=True, key="async-view"
        )

    books = await async_view()
    with pytest.raises(LazyLoadInAsyncContext, match='"pages"'):
        list(books[0].pages.all())
    books = await async_view()

    def lazy() -> int:
        with CaptureQueriesContext(connection) as ctx:
            touch(books, "pages")
        return len(ctx.captured_queries)

    assert await sync_to_async(lazy)() == 0


def test_a_call_site_where_the_working_directory_is_gone(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process whose working directory was deleted still gets call sites (absolute)."""
    from async_prefetch.access import sites

    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    code = compile("sites.call_site(0)", "/elsewhere/views_gone_cwd.py", "eval")
    assert eval(code, {"sites": sites, "__name__": "app"}) == "/elsewhere/views_gone_cwd.py:1"
