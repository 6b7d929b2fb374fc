"""``CallerConnectionExecutor``: queries on the caller's own Django connection, one at a time."""

from __future__ import annotations

from asgiref.sync import sync_to_async
from django.db.backends.base.base import BaseDatabaseWrapper

from ..sql.compiler import CompiledQuery
from .base import RowConsumer, Rows


class CallerConnectionExecutor:
    """Runs queries through the caller's own Django connection, on the thread that owns it.

    Used inside ``atomic``, where only that connection sees the transaction's rows.
    ``sync_to_async(thread_sensitive=True)`` reaches the thread holding the transaction
    (the outer thread under ``async_to_sync``), and Django's cursor wrapper does the
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
        rows = await sync_to_async(self._run, thread_sensitive=True)(query)
        if rows:
            await consume(rows)
