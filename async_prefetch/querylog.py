"""Report engine queries the way Django's debug cursor does.

Queries sent on pooled connections bypass Django's cursor wrappers, so the engine
reports each one itself: to the ``django.db.backends`` logger (DEBUG, same message
and ``extra`` keys as ``CursorDebugWrapper``), and to the caller's connection query
log when that connection logs queries (``DEBUG=True``, ``assertNumQueries``,
``CaptureQueriesContext``).
"""

from __future__ import annotations

import logging
from typing import Any

from django.db.backends.base.base import BaseDatabaseWrapper

logger = logging.getLogger("django.db.backends")


def wants_log(connection: BaseDatabaseWrapper | None) -> bool:
    """True when a query on ``connection``'s alias must be reported anywhere."""
    return (connection is not None and connection.queries_logged) or logger.isEnabledFor(
        logging.DEBUG
    )


def record_query(
    connection: BaseDatabaseWrapper | None,
    alias: str,
    params: Any,
    duration: float,
    text: str,
) -> None:
    """Log one finished query; ``text`` is the SQL as sent (parameters inlined)."""
    if connection is not None and connection.queries_logged:
        connection.queries_log.append({"sql": text, "time": f"{duration:.3f}"})
    logger.debug(
        "(%.3f) %s; args=%s; alias=%s",
        duration,
        text,
        params,
        alias,
        extra={"duration": duration, "sql": text, "params": params, "alias": alias},
    )
