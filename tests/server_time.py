"""Queries that spend a known time in the server and record when the server started them.

Concurrency is proven with the server's own clock: ``slow()`` adds ``pg_sleep`` in an
uncorrelated sub-select (run once per query) and selects ``statement_timestamp()``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db.models import QuerySet

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
