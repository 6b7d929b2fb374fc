"""Report engine queries where Django's tooling looks for them.

Queries sent on pooled connections bypass Django's cursor wrappers, so the engine
reports each one itself: to the ``django.db.backends`` logger (DEBUG, same message
and ``extra`` keys as ``CursorDebugWrapper``), to the caller's connection query log
when that connection logs queries (``DEBUG=True``, ``assertNumQueries``,
``CaptureQueriesContext``), and to django-debug-toolbar's SQL panel when it tracks
that connection (:mod:`async_prefetch.integrations.debug_toolbar`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from django.db.backends.base.base import BaseDatabaseWrapper

from ..integrations import debug_toolbar

logger = logging.getLogger("django.db.backends")


def wants_log(connection: BaseDatabaseWrapper | None) -> bool:
    """True when a query on ``connection``'s alias must be reported anywhere."""
    if connection is not None and (
        connection.queries_logged or debug_toolbar.tracking_panel(connection) is not None
    ):
        return True
    return logger.isEnabledFor(logging.DEBUG)


@contextlib.contextmanager
def instrumented_like(
    caller: BaseDatabaseWrapper | None, worker: BaseDatabaseWrapper
) -> Iterator[None]:
    """Run queries of ``worker`` (a worker thread's connection for ``caller``'s
    database) inside ``caller``'s ``execute_wrappers``, in the same order, and report
    them to the SQL panel tracking ``caller``, if any, for the duration.

    For synchronous Django code the engine runs on a worker thread for a caller (its
    query log is copied separately, once the code has returned).
    """
    if caller is None or caller is worker:
        yield
        return
    with contextlib.ExitStack() as stack:
        for wrapper in list(caller.execute_wrappers):  # the outermost first, as Django's
            stack.enter_context(worker.execute_wrapper(wrapper))
        panel = debug_toolbar.tracking_panel(caller)
        if panel is not None:
            stack.enter_context(debug_toolbar.tracked(worker, panel))
        yield


def record_query(
    connection: BaseDatabaseWrapper | None,
    alias: str,
    sql: str,
    params: Any,
    duration: float,
    text: str,
    *,
    transaction_status: Any = None,
    isolation_level: Any = None,
) -> None:
    """Report one finished query, run as ``sql`` with ``params``; ``text`` is the SQL
    as sent (parameters inlined), ``duration`` in seconds. The status and isolation
    level are the pooled connection's, after the query (for the SQL panel)."""
    if connection is not None:
        if connection.queries_logged:
            connection.queries_log.append({"sql": text, "time": f"{duration:.3f}"})
        panel = debug_toolbar.tracking_panel(connection)
        if panel is not None:
            debug_toolbar.report(
                panel,
                alias=alias,
                sql=sql,
                params=params,
                duration=duration,
                text=text,
                transaction_status=transaction_status,
                isolation_level=isolation_level,
            )
    logger.debug(
        "(%.3f) %s; args=%s; alias=%s",
        duration,
        text,
        params,
        alias,
        extra={"duration": duration, "sql": text, "params": params, "alias": alias},
    )
