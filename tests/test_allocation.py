"""The engine keeps fewer objects alive than Django for the same prefetch, and no longer
than its caller does.

Objects tracked by CPython's cyclic garbage collector are what makes its collections
expensive: at zero latency a prefetch spends much of its time there, so an engine that
allocated more than Django (for example a materialised ``__dict__`` per instance, which
CPython otherwise avoids) would lose to Django however fast its own code is.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import threading
import time
import weakref
from typing import Any

import pytest
from django.db.models import Prefetch, prefetch_related_objects

import async_prefetch
from async_prefetch.runtime import bridge
from tests.factories import seed_bookstore
from tests.testapp.models import Book, Review

pytestmark = pytest.mark.django_db(transaction=True)

LOOKUPS: list[Any] = [
    "authors__location",
    "pages",
    "tags",
    "publisher",
    Prefetch("reviews", queryset=Review.objects.order_by("pk"), to_attr="review_list"),
]


def kept_alive(prefetch: Any) -> tuple[int, int]:
    """Tracked objects that the prefetched books keep alive, and the number of querysets
    in their prefetch caches (at every depth)."""
    books = list(Book.objects.order_by("pk"))
    gc.collect()
    before = len(gc.get_objects())
    prefetch(books, *LOOKUPS)
    gc.collect()
    after = len(gc.get_objects())
    return after - before, cached_querysets(books)


def cached_querysets(instances: list[Any]) -> int:
    count, seen = 0, set()
    while instances:
        instance = instances.pop()
        if id(instance) in seen:
            continue
        seen.add(id(instance))
        for queryset in getattr(instance, "_prefetched_objects_cache", {}).values():
            count += 1
            instances.extend(queryset)
    return count


# The engine's own per-call state that outlives a call (pool and event-loop bookkeeping),
# independent of the number of instances.
CONSTANT = 60


def test_no_more_tracked_objects_than_django() -> None:
    seed_bookstore(n_books=80)
    kept_alive(prefetch_related_objects)  # warm both sides' caches
    kept_alive(async_prefetch.prefetch_related_objects)
    django, querysets = kept_alive(prefetch_related_objects)
    engine, engine_querysets = kept_alive(async_prefetch.prefetch_related_objects)
    assert django > 2000
    assert engine_querysets == querysets > 200
    # Django's cached querysets each hold a full Query (a WhereNode, its children list,
    # a set); the engine's hold an UnfilteredQuery until used (test_unfiltered_query).
    assert engine <= django - 3 * querysets + CONSTANT, (
        f"engine keeps {engine} tracked objects alive, Django {django} ({querysets} querysets)"
    )


def _has_dict_object(obj: Any) -> bool:
    """Whether CPython made ``obj`` a ``__dict__`` object (asked without making one):
    an instance keeping its attributes in compact storage refers to their values only."""
    return any(type(referent) is dict for referent in gc.get_referents(obj))


@pytest.mark.parametrize(
    "lookup",
    [
        pytest.param("publisher", id="forward-fk-no-own-fk"),
        pytest.param("tags", id="m2m-no-own-fk"),
        pytest.param("pages", id="reverse-fk-with-fk"),
    ],
)
def test_instances_store_attributes_as_djangos_do(lookup: str) -> None:
    """Built without ``__init__``, instances still store their attributes the way
    Django's do: a model without forward relations in compact storage, one whose
    foreign key descriptor writes ``__dict__`` in a ``__dict__`` object."""
    seed_bookstore(n_books=5)
    expected = list(Book.objects.order_by("pk"))
    prefetch_related_objects(expected, lookup)
    got = list(Book.objects.order_by("pk"))
    async_prefetch.prefetch_related_objects(got, lookup)

    def related(books: list[Book]) -> list[Any]:
        objs = [getattr(book, lookup) for book in books]
        return [o for obj in objs for o in (obj.all() if hasattr(obj, "all") else [obj])]

    theirs, ours = related(expected), related(got)
    assert len(theirs) == len(ours) > 0
    assert [_has_dict_object(obj) for obj in ours] == [_has_dict_object(obj) for obj in theirs]


@pytest.mark.parametrize("api", ["sync", "async"])
def test_engine_thread_lets_go_of_the_result_when_it_hands_it_over(
    api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefetched instances reference each other, so once the caller drops them only the
    cyclic collector frees them; the engine thread must not still hold them when the
    caller's ``gc.collect()`` runs. The portal sets its future's result before it leaves
    the frame that holds it: a done callback runs on the engine thread in between, and
    this one waits there until the caller has collected (added after the callback that
    wakes an async caller)."""
    seed_bookstore()
    collected = threading.Event()

    def hold(future: concurrent.futures.Future[Any]) -> None:
        future.add_done_callback(lambda _: collected.wait(10))

    if api == "sync":
        portal = bridge._get_portal()
        start_task_soon = portal.start_task_soon

        def start_and_hold(*args: Any) -> Any:
            future = start_task_soon(*args)
            hold(future)
            return future

        monkeypatch.setattr(portal, "start_task_soon", start_and_hold)
    else:
        wrap_future = asyncio.wrap_future

        def wrap_and_hold(future: Any, **kwargs: Any) -> Any:
            wrapped = wrap_future(future, **kwargs)
            hold(future)
            return wrapped

        monkeypatch.setattr(asyncio, "wrap_future", wrap_and_hold)

    def prefetched_and_dropped() -> weakref.ref[Book]:
        if api == "sync":
            books = async_prefetch.prefetch(Book.objects.order_by("pk"), "pages")
        else:
            books = asyncio.run(aprefetch_books())
        first = weakref.ref(books[0])
        del books
        gc.collect()
        return first

    try:
        first = prefetched_and_dropped()
    finally:
        collected.set()
    assert first() is None


async def aprefetch_books() -> list[Book]:
    books: list[Book] = await async_prefetch.aprefetch(Book.objects.order_by("pk"), "pages")
    return books


class _Cyclic:
    """Refers to itself, as prefetched instances do through their reverse caches."""

    def __init__(self) -> None:
        self.itself = self


def test_result_is_dropped_when_the_caller_is_cancelled_after_the_engine_finished() -> None:
    """The engine task finishes, then the caller is cancelled before it resumes: the
    ``CancelledError`` it gets (and its traceback's frames) must not keep the result."""
    finished = threading.Event()
    result: weakref.ref[_Cyclic] | None = None

    async def work() -> _Cyclic:
        nonlocal result
        obj = _Cyclic()
        result = weakref.ref(obj)
        finished.set()
        return obj

    async def cancelled_late() -> BaseException:
        task = asyncio.ensure_future(bridge.run_async(work))
        await asyncio.sleep(0)  # the task now waits for the engine thread
        assert finished.wait(5)  # this loop is blocked: the task cannot resume
        time.sleep(0.05)  # noqa: ASYNC251 (blocks the loop on purpose: the engine thread hands the result over meanwhile)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError as error:
            return error
        raise AssertionError("the caller was not cancelled")

    error = asyncio.run(cancelled_late())
    gc.collect()
    assert result is not None
    assert result() is None, "the raised CancelledError still holds the result"
    del error
