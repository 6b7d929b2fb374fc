"""Queries that spend a known time in the server (and record when it started them), or fail there.

Concurrency is proven with the server's own clock: ``slow()`` adds ``pg_sleep`` in an
uncorrelated sub-select (run once per query) and selects ``statement_timestamp()``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db.models import Prefetch, QuerySet
from django.db.models.expressions import RawSQL

from tests.testapp.models import Review

SLEEP = 0.3


def slow(queryset: QuerySet[Any], seconds: float = SLEEP) -> QuerySet[Any]:
    """``queryset`` that spends ``seconds`` in the server and records its start time."""
    return queryset.extra(
        select={"started_at": "statement_timestamp()"},
        where=["EXISTS (SELECT 1 FROM pg_sleep(%s))"],
        params=[seconds],
    )


def start_of(objects: list[Any]) -> datetime:
    starts = {obj.started_at for obj in objects}
    assert len(starts) == 1, "one query per relation"
    start: datetime = starts.pop()
    return start


# Fails in the server after 0.2 s, when fast siblings have long been hydrated: the divisor
# is only known at run time (a constant ``1 / 0`` fails while planning, at once).
FAILING = Prefetch(
    "reviews",
    queryset=Review.objects.annotate(
        boom=RawSQL("(SELECT 1 / (random() * 0)::int FROM pg_sleep(0.2))", ())
    ),
    to_attr="boom_reviews",
)
# Keeps the server busy for 5 s (``run_state.sleepers()`` finds it): cancelled long before.
SLEEPING = Prefetch(
    "reviews",
    queryset=Review.objects.extra(where=["EXISTS (SELECT 1 FROM pg_sleep(5))"]),
    to_attr="never",
)
