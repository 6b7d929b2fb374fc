"""System checks (``manage.py check``), registered when ``"async_prefetch"`` is installed.

Errors: the ``ASYNC_PREFETCH`` setting (``async_prefetch.E001`` to ``E006``, see
:mod:`.config`; ``E006``: ``REPLICAS`` names a database alias that ``DATABASES``
lacks). Warnings: ``async_prefetch.W001``, prepared statements on a database that looks
as if it were behind PgBouncer in transaction pooling mode.
A database that is not PostgreSQL is no problem: the engine hands it back to Django.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.db.utils import load_backend

from .config import read_config

PREPARED_STATEMENTS_BEHIND_POOLER = "async_prefetch.W001"


def check_settings(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """An error per problem in ``settings.ASYNC_PREFETCH``."""
    _, errors = read_config()
    return [checks.Error(error.msg, hint=error.hint, id=error.id) for error in errors]


def check_databases(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """``W001`` for each PostgreSQL alias whose ``OPTIONS["prepare_threshold"]`` is a
    number while ``DISABLE_SERVER_SIDE_CURSORS`` is True, the usual sign of PgBouncer's
    transaction pooling: the engine's pooled connections prepare statements too.

    Reads settings only: no connection is made.
    """
    messages: list[checks.CheckMessage] = []
    for alias, database in settings.DATABASES.items():
        threshold = database.get("OPTIONS", {}).get("prepare_threshold")
        if (
            not database.get("DISABLE_SERVER_SIDE_CURSORS")
            or isinstance(threshold, bool)
            or not isinstance(threshold, int)
            or not _is_postgresql(database)
        ):
            continue
        messages.append(
            checks.Warning(
                f"Database {alias!r} prepares statements (OPTIONS['prepare_threshold'] = "
                f"{threshold}) and sets DISABLE_SERVER_SIDE_CURSORS, as is usual behind "
                "PgBouncer in transaction pooling mode; async_prefetch's pooled connections "
                "prepare statements too.",
                hint=(
                    "Behind PgBouncer in transaction pooling mode, prepared statements need "
                    "PgBouncer >= 1.22 with max_prepared_statements > 0 (and libpq >= 17 for "
                    "psycopg); otherwise set OPTIONS['prepare_threshold'] to None. If they "
                    f"are supported, add {PREPARED_STATEMENTS_BEHIND_POOLER!r} to "
                    "SILENCED_SYSTEM_CHECKS."
                ),
                id=PREPARED_STATEMENTS_BEHIND_POOLER,
            )
        )
    return messages


def _is_postgresql(database: dict[str, Any]) -> bool:
    """Whether the alias's backend is PostgreSQL (or built on Django's), by its class."""
    try:
        backend = load_backend(database.get("ENGINE", ""))
    except ImproperlyConfigured:  # Django reports a bad ENGINE itself
        return False
    return getattr(backend.DatabaseWrapper, "vendor", None) == "postgresql"


def register() -> None:
    """Register the checks (idempotent: the registry holds each function once)."""
    checks.register(check_settings)
    checks.register(check_databases)
