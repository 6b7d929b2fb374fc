"""Compiled relation statements kept across calls: Django's SQL compiler runs once per
relation, not once per call.

A to-many relation's query built from the related model's plain default queryset (no
``Prefetch`` queryset; see :func:`async_prefetch.relations.parents.plain_default_queryset`)
filtered on its parents' keys as one ``= ANY`` array is
``SELECT ... WHERE <column> = ANY(%s)``: its SQL depends on the relation, the database
alias and the array's integer cast (:func:`.any_of.array_parameter`), and its only
parameter is the array. The first call compiles it with Django's compiler and keeps it
(:meth:`StatementCache.keep`); later calls bind their own array to that SQL and build
instances with that compiler's row layout (:meth:`StatementCache.find`), without Django's
filter and compiler.

One distinct key is Django's ``IN (%s)`` (PostgreSQL plans it as ``= value``), kept as a
second form of the same statement, its one parameter the key as the field prepares it.
A statement is kept only when the compiled query has exactly one of those shapes; anything
else (another backend, expressions, other conditions) is compiled by Django every time. Setting
:data:`VERIFY` (the test suite does) compiles every reused statement again and raises
``AssertionError`` when it differs from Django's.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from django.db import connections
from django.db.models.sql.compiler import SQLCompiler
from django.db.models.sql.where import WhereNode

from .any_of import AnyOf, condition_parameters, prepared
from .compiler import CompiledQuery

#: Compile every reused statement again and compare (tests).
VERIFY = False

#: Relations whose statements are kept (least recently used dropped first): one per
#: relation and database of a schema.
MAX_STATEMENTS = 512

Key = tuple[Hashable, ...]
"""What a relation's SQL depends on besides the array cast: the relation kind, its
field, the related model, the lookup path and the database alias."""


@dataclass(frozen=True)
class Statement:
    """A relation's compiled query for one call: the SQL, this call's parameters, and the
    compiler whose row layout builds the instances."""

    compiler: SQLCompiler
    sql: str
    params: tuple[Any, ...]

    def compiled(self, queryset: Any) -> CompiledQuery:
        """This statement as a :class:`CompiledQuery` for ``queryset`` (the call's
        unfiltered queryset: hints, database and fetch mode)."""
        return CompiledQuery(queryset, queryset.db, self.compiler, self.sql, self.params)


@dataclass
class _Entry:
    lookup: AnyOf  # on the condition's column, without values: prepares the next ones
    compiler: SQLCompiler  # its query without conditions: row layout only
    sql_by_cast: dict[str, str]  # by the condition's form: the array's cast, or ONE_KEY


class StatementCache:
    """Kept statements by :data:`Key`; safe to use from several threads."""

    def __init__(self, size: int = MAX_STATEMENTS) -> None:
        self._size = size
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def find(
        self, key: Key, values: list[Any], django: Callable[[], CompiledQuery] | None = None
    ) -> Statement | None:
        """The kept statement for ``key`` bound to the parents' key ``values``, or
        ``None`` (not kept yet, or these values need other SQL: Django's compiler).
        ``django()`` compiles the same query with Django: with :data:`VERIFY`, a found
        statement is compared with it (:func:`verify`)."""
        statement = self._find(key, values)
        if statement is not None and VERIFY and django is not None:
            verify(statement, django())
        return statement

    def _find(self, key: Key, values: list[Any]) -> Statement | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
        lookup = entry.lookup
        try:
            bound = condition_parameters(
                lookup, prepared(lookup, values), connections[str(key[-1])]
            )
        except Exception:  # e.g. EmptyResultSet, a value the field rejects: Django decides
            return None
        sql = entry.sql_by_cast.get(bound[1]) if bound is not None else None
        if bound is None or sql is None:
            return None
        return Statement(entry.compiler, sql, bound[0])

    def keep(self, key: Key, compiled: CompiledQuery) -> None:
        """Keep ``compiled`` (Django's compile of the relation's filtered queryset) under
        ``key`` when it has a shape :meth:`find` reproduces: the array condition alone and
        its array the only parameter, or one key's ``IN (%s)`` and that key the only one."""
        if compiled.sql is None or compiled.alias != key[-1]:
            return
        where = compiled.queryset.query.where
        condition = where.children[-1] if len(where.children) == 1 else None
        if not isinstance(condition, AnyOf):
            return
        try:
            bound = condition_parameters(condition, condition.rhs, connections[compiled.alias])
        except Exception:
            return
        if bound is None or compiled.params != bound[0]:
            return
        lookup = AnyOf(condition.lhs, [])  # prepares values as the condition does
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                # The row layout only: neither it nor its query keeps the parent keys.
                layout = copy.copy(compiled.compiler)
                layout.where = layout.having = layout.qualify = None
                layout.query = compiled.compiler.query.chain()
                layout.query.where = WhereNode()
                entry = self._entries[key] = _Entry(lookup, layout, {})
                while len(self._entries) > self._size:
                    self._entries.popitem(last=False)
            entry.sql_by_cast[bound[1]] = compiled.sql


#: The process's kept statements.
statements = StatementCache()


def verify(statement: Statement, compiled: CompiledQuery) -> None:
    """Raise ``AssertionError`` unless ``statement`` is what Django compiled."""
    if (statement.sql, statement.params) != (compiled.sql, compiled.params):
        raise AssertionError(
            "a kept statement differs from Django's:\n"
            f"kept:   {statement.sql} {statement.params!r}\n"
            f"Django: {compiled.sql} {compiled.params!r}"
        )
