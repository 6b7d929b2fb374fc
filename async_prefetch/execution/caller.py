"""``CallerConnectionExecutor``: queries on the caller's own Django connection, one at a time."""

from __future__ import annotations

from django.db.backends.base.base import BaseDatabaseWrapper

from ..sql.compiler import CompiledQuery
from .base import RowConsumer, Rows
from .caller_thread import on_caller_thread


class CallerConnectionExecutor:
    """Runs queries through the caller's own Django connection, on the thread that owns it.

    Used inside ``atomic``, where only that connection sees the transaction's rows.
    Each query runs on the thread holding the transaction (``on_caller_thread``), and
    Django's cursor wrapper does the
    logging, ``execute_wrappers`` and error translation. Queries run one at a time.
    """

    def __init__(self, connection: BaseDatabaseWrapper) -> None:
        self._connection = connection

    def _run(self, query: CompiledQuery) -> Rows:
        assert query.sql is not None
        with self._connection.cursor() as cursor:
            cursor.execute(query.sql, query.params)
            rows: Rows = cursor.fetchall()
        return rows

    async def fetch(self, query: CompiledQuery, consume: RowConsumer) -> None:
        assert query.sql is not None
        rows = await on_caller_thread(self._run, query)
        if rows:
            await consume(rows)
