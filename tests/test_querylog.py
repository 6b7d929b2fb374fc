"""Pooled queries are reported like Django's debug cursor: logger and connection query log."""

from __future__ import annotations

import logging

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

import async_prefetch
from tests.factories import seed_bookstore
from tests.testapp.models import Book


@pytest.mark.django_db(transaction=True)
def test_engine_queries_reach_the_logger_and_the_query_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seed_bookstore()
    books = list(Book.objects.order_by("pk"))
    with (
        caplog.at_level(logging.DEBUG, logger="django.db.backends"),
        CaptureQueriesContext(connection) as captured,
    ):
        async_prefetch.prefetch_related_objects(books, "pages", "authors")

    sqls = [query["sql"] for query in captured.captured_queries]
    assert len(sqls) == 2
    assert any('FROM "testapp_page"' in sql for sql in sqls)
    assert all(float(query["time"]) >= 0 for query in captured.captured_queries)
    records = [r for r in caplog.records if r.name == "django.db.backends"]
    assert sorted(r.sql for r in records) == sorted(sqls)  # type: ignore[attr-defined]
    assert {r.alias for r in records} == {"default"}  # type: ignore[attr-defined]
    assert all(isinstance(r.duration, float) for r in records)  # type: ignore[attr-defined]
