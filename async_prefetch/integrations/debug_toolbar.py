"""Engine queries in django-debug-toolbar's SQL panel.

While it handles a request, the SQL panel instruments the Django connections of the
request's thread: it sets itself as ``connection._djdt_logger`` and wraps the
connection's cursors, whose ``execute()`` calls ``panel.record(...)``. Pooled queries
bypass those cursors, so :func:`report` records them with what the panel's cursor
wrapper records: SQL as sent and with placeholders, parameters, duration, alias, and
the pooled connection's transaction status and isolation level (autocommit: no
transaction). No stack trace is recorded: the query runs on the engine's own thread,
whose stack says nothing about the code that asked for it.

Nothing here imports ``debug_toolbar`` until a panel is tracking a connection.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

from django.db.backends.base.base import BaseDatabaseWrapper


def tracking_panel(connection: BaseDatabaseWrapper) -> Any | None:
    """The SQL panel recording ``connection``'s queries now, if any."""
    return getattr(connection, "_djdt_logger", None)


@contextlib.contextmanager
def tracked(connection: BaseDatabaseWrapper, panel: Any) -> Iterator[None]:
    """Have ``panel`` record the queries of ``connection`` (another thread's connection
    for the same database) as it records the request thread's, for the duration."""
    from debug_toolbar.panels.sql.tracking import wrap_cursor

    wrap_cursor(connection)  # type: ignore[no-untyped-call]
    previous = tracking_panel(connection)
    connection._djdt_logger = panel  # type: ignore[attr-defined]
    try:
        yield
    finally:
        connection._djdt_logger = previous  # type: ignore[attr-defined]


def report(
    panel: Any,
    *,
    alias: str,
    sql: str,
    params: Any,
    duration: float,
    text: str,
    transaction_status: Any,
    isolation_level: Any,
) -> None:
    """Record one finished query (``duration`` in seconds) in ``panel``."""
    from debug_toolbar import settings as toolbar_settings
    from debug_toolbar.panels.sql.tracking import DDT_MODELS

    if toolbar_settings.get_config()["SKIP_TOOLBAR_QUERIES"] and any(
        table in sql for table in DDT_MODELS
    ):
        return
    try:
        decoded = _decoder()._decode(params)
    except TypeError:  # as the panel's cursor wrapper does
        decoded = None
    panel.record(
        vendor="postgresql",
        alias=alias,
        sql=text,
        duration=duration * 1000,
        raw_sql=sql,
        params=decoded,
        stacktrace=[],
        template_info=None,
        trans_id=None,
        trans_status=transaction_status,
        iso_level=isolation_level,
    )


@functools.cache
def _decoder() -> Any:
    """The panel's own parameter decoding (``NormalCursorMixin._decode``), unbound
    from any cursor."""
    from debug_toolbar.panels.sql.tracking import NormalCursorMixin

    class ParamDecoder(NormalCursorMixin):
        def __init__(self) -> None:
            pass

    return ParamDecoder()
