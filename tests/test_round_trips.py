"""A prefetch query costs one network round trip: no BEGIN/ROLLBACK, no pool check.

A latency proxy adds a fixed round trip between the engine's pool and PostgreSQL; on a
warm pool, a step of N sibling queries must then take about one round trip, and a chain
of N dependent steps about N, never more. (Only the engine's pool uses the proxied
alias: pytest-django forbids Django connections to aliases added during a test.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connections
from django.db.models import Prefetch

import async_prefetch
from async_prefetch.devtools.embedded import get_server
from async_prefetch.devtools.latency_proxy import LatencyProxyProcess
from async_prefetch.execution.pools import close_pools
from async_prefetch.runtime import bridge
from tests.factories import seed_bookstore
from tests.testapp.models import Book, Page, Review

RTT = 0.08  # seconds: far above this machine's noise, so the bounds are robust
ALIAS = "through_proxy"


@pytest.fixture
def proxied_alias(transactional_db: None) -> Iterator[str]:
    """A database alias for the test database that goes through an RTT-adding proxy."""
    with LatencyProxyProcess(get_server().address(), rtt_ms=RTT * 1000) as proxy:
        connections.settings[ALIAS] = {
            **connections["default"].settings_dict,
            "HOST": proxy.host,
            "PORT": str(proxy.port),
        }
        try:
            yield ALIAS
        finally:
            connections[ALIAS].close()
            del connections[ALIAS]
            del connections.settings[ALIAS]
            bridge.run_sync(close_pools)


def timed(func: Any) -> float:
    started = time.perf_counter()
    func()
    return time.perf_counter() - started


def test_one_round_trip_per_step(proxied_alias: str, settings: Any) -> None:
    # Enough idle connections for five siblings: a missing one costs a connect.
    settings.ASYNC_PREFETCH = {"POOL": {"MIN_SIZE": 5}}
    seed_bookstore()

    def fresh() -> list[Book]:
        books = list(Book.objects.order_by("pk"))
        for book in books:  # prefetch queries follow the instances' database
            book._state.db = proxied_alias
        return books

    siblings: list[Any] = [
        "pages",
        "authors",
        "tags",
        "publisher",
        Prefetch("reviews", queryset=Review.objects.using(proxied_alias), to_attr="all_reviews"),
    ]
    # Open the pool and let it fill (connecting costs several round trips).
    async_prefetch.prefetch_related_objects(fresh(), *siblings)
    time.sleep(10 * RTT)

    books = fresh()
    elapsed = timed(lambda: async_prefetch.prefetch_related_objects(books, *siblings))
    assert elapsed < 1.6 * RTT, f"5 sibling queries took {elapsed / RTT:.2f} round trips"

    books = fresh()
    elapsed = timed(
        lambda: async_prefetch.prefetch_related_objects(books, "authors__location__country")
    )
    assert 3 * RTT <= elapsed < 3.6 * RTT, f"a 3-step chain took {elapsed / RTT:.2f} round trips"

    elapsed = timed(lambda: async_prefetch.prefetch(Page.objects.using(proxied_alias), "book"))
    assert 2 * RTT <= elapsed < 2.6 * RTT, f"queryset + 1 step took {elapsed / RTT:.2f} round trips"
