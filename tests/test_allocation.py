"""The engine keeps fewer objects alive than Django for the same prefetch.

Objects tracked by CPython's cyclic garbage collector are what makes its collections
expensive: at zero latency a prefetch spends much of its time there, so an engine that
allocated more than Django (for example a materialised ``__dict__`` per instance, which
CPython otherwise avoids) would lose to Django however fast its own code is.
"""

from __future__ import annotations

import gc
from typing import Any

import pytest
from django.db.models import Prefetch, prefetch_related_objects

import async_prefetch
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
