"""What a round captures, and the scripted stand-ins that capture it.

While a method runs in a round (:mod:`.rounds`), its model rows come from
:class:`ScriptedModelIterable` and its other SQL goes to a :class:`ScriptedConnection`:
both ask the call's :class:`Script` for the answer to their query, which either has it
(fetched in an earlier round) or raises :class:`Capture` with what is needed.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Model, QuerySet
from django.db.models.query import ModelIterable

from ..dispatch import split_lookups
from ..execution import Rows
from ..sql.compiler import CompiledQuery

__all__ = [
    "Capture",
    "Need",
    "RowsNeed",
    "Script",
    "ScriptedConnection",
    "SqlNeed",
    "current_script",
    "scripted_clone",
]


@dataclass(eq=False)
class RowsNeed:
    """The model rows of ``queryset`` (its lookups removed into ``lookups``).

    ``compiled``: its SQL, compiled on the caller's side before the engine run (``None``:
    the engine compiles it); ``error``: Django's error compiling it there, raised by the
    engine run in the need's place (so the first failing call in order still wins).
    """

    queryset: QuerySet[Any]
    lookups: list[Any]
    compiled: CompiledQuery | None = None
    error: Exception | None = None

    @property
    def key(self) -> tuple[Any, ...]:
        return ("rows", self.queryset.model, self.queryset.db)


@dataclass(eq=False)
class SqlNeed:
    """One statement the method sends on its connection to ``alias``; raw rows wanted."""

    alias: str
    sql: str
    params: tuple[Any, ...]
    template: QuerySet[Any]

    @property
    def key(self) -> tuple[Any, ...]:
        return ("sql", self.alias, self.sql, tuple(map(_Param, self.params)))


class _Param:
    """A query parameter compared by value, or by type and ``repr`` where its type has
    no equality (psycopg's ``Jsonb`` wrappers)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Param):
            return NotImplemented
        a, b = self.value, other.value
        if type(a) is not type(b):
            return False
        return bool(a == b) or repr(a) == repr(b)

    __hash__ = None  # type: ignore[assignment]


Need = RowsNeed | SqlNeed


class Capture(BaseException):
    """Stops a method at its next query (a ``BaseException``: Django's ``except
    Exception`` clean-ups around ``cursor.execute()`` let it through)."""

    def __init__(self, need: Need) -> None:
        super().__init__(need)
        self.need = need


class Script:
    """The answers to one call's queries, in the order the method asks them."""

    __slots__ = ("answers", "position")

    def __init__(self) -> None:
        self.answers: list[tuple[tuple[Any, ...], Any]] = []
        self.position = 0

    def answer(self, need: Need) -> Any:
        """The recorded answer to ``need``; raises :class:`Capture` when there is none
        (or the method asked something else than last time: answers from there on are
        dropped)."""
        if self.position < len(self.answers):
            key, value = self.answers[self.position]
            if key == need.key:
                self.position += 1
                return value
            del self.answers[self.position :]
        raise Capture(need)

    def record(self, need: Need, value: Any) -> None:
        self.answers.append((need.key, value))


current_script: contextvars.ContextVar[Script | None] = contextvars.ContextVar(
    "async_prefetch_script", default=None
)


if TYPE_CHECKING:
    _ModelIterable = ModelIterable[Any]
else:  # not subscriptable at run time unless django-stubs-ext patched it
    _ModelIterable = ModelIterable


def rows_need(queryset: QuerySet[Any]) -> RowsNeed:
    """The need of ``list(queryset)``'s model rows (a copy without its lookups), and
    the lookups Django would run on them: none once its prefetch is done."""
    captured = queryset._clone()  # type: ignore[attr-defined]
    captured._iterable_class = ModelIterable
    root, lookups = split_lookups(captured, (), None)
    if queryset._prefetch_done:  # type: ignore[attr-defined]
        lookups = []  # Django's _fetch_all() does not prefetch again (after update())
    return RowsNeed(root, lookups)


class ScriptedModelIterable(_ModelIterable):
    """``ModelIterable`` whose rows come from the call's script while one is active (a
    capture run or a replay), else from Django's own iterable."""

    def __iter__(self) -> Any:
        script = current_script.get()
        if script is None:
            return super().__iter__()
        queryset = self.queryset
        if queryset.query.select_for_update:  # not the engine's: Django's rows, raw SQL
            return super().__iter__()
        need = rows_need(queryset)
        instances: list[Model] = script.answer(need)
        if need.lookups:  # the engine ran them with the rows, Django must not again
            queryset._prefetch_done = True  # type: ignore[attr-defined]
        return iter(instances)


def scripted_clone(queryset: QuerySet[Any]) -> QuerySet[Any]:
    """A copy of ``queryset`` (its result cache included) whose model rows come from the
    script."""
    clone: QuerySet[Any] = queryset._clone()  # type: ignore[attr-defined]
    clone._result_cache = queryset._result_cache
    clone._prefetch_done = queryset._prefetch_done  # type: ignore[attr-defined]
    if clone._iterable_class is ModelIterable:
        clone._iterable_class = ScriptedModelIterable
    return clone


class _ScriptedCursor:
    """The cursor a method gets from :class:`ScriptedConnection`: ``execute()`` answers
    from the script, the fetch methods read the answer."""

    def __init__(self, connection: ScriptedConnection) -> None:
        self._connection = connection
        self._rows: Rows = []
        self._next = 0

    def execute(self, sql: str, params: Any = None) -> None:
        conn = self._connection
        need = SqlNeed(conn.alias, sql, tuple(params or ()), conn.template)
        self._rows = conn.script.answer(need)
        self._next = 0

    def fetchone(self) -> Any:
        if self._next >= len(self._rows):
            return None
        self._next += 1
        return self._rows[self._next - 1]

    def fetchmany(self, size: int = 1) -> Rows:
        rows = self._rows[self._next : self._next + size]
        self._next += len(rows)
        return rows

    def fetchall(self) -> Rows:
        rows = self._rows[self._next :]
        self._next = len(self._rows)
        return rows

    @property
    def rowcount(self) -> int:
        return len(self._rows)

    def close(self) -> None:
        self._rows = []

    def __enter__(self) -> _ScriptedCursor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ScriptedConnection:
    """Stands in for ``connections[alias]`` while a method runs: everything is the real
    connection's (operations, features, settings) except the cursors, which answer from
    the script (no I/O, so no ``SynchronousOnlyOperation`` on the event loop)."""

    def __init__(self, real: BaseDatabaseWrapper, script: Script, template: QuerySet[Any]) -> None:
        self.__dict__.update(_real=real, script=script, template=template)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def cursor(self) -> _ScriptedCursor:
        return _ScriptedCursor(self)

    def chunked_cursor(self) -> _ScriptedCursor:
        return _ScriptedCursor(self)
