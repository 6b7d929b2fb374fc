"""Compile an unevaluated queryset with Django's own SQL compiler, without touching the database."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.core.exceptions import EmptyResultSet
from django.db.models import Model, QuerySet
from django.db.models.sql.compiler import SQLCompiler


@dataclass(eq=False)
class CompiledQuery:
    """A queryset's SQL plus the compiler state the hydrator needs to build instances.

    ``sql`` is ``None`` when Django proved the result empty (``EmptyResultSet``):
    no query is sent for it.
    """

    queryset: QuerySet[Any]
    alias: str
    compiler: SQLCompiler
    sql: str | None
    params: tuple[Any, ...]

    @property
    def model(self) -> type[Model]:
        return self.queryset.model


def compile_queryset(queryset: QuerySet[Any]) -> CompiledQuery:
    """Run ``as_sql()`` for ``queryset`` on its database alias.

    ``as_sql()`` fills ``select``, ``klass_info`` and ``annotation_col_map`` on the
    compiler as a side effect; it does no I/O.
    """
    alias = queryset.db
    compiler = queryset.query.get_compiler(using=alias)
    try:
        sql, params = compiler.as_sql()
    except EmptyResultSet:
        return CompiledQuery(queryset, alias, compiler, None, ())
    if not sql:
        return CompiledQuery(queryset, alias, compiler, None, ())
    return CompiledQuery(queryset, alias, compiler, sql, tuple(params))
