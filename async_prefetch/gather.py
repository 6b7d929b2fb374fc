"""Several querysets at once (:func:`agather`), and Django's queryset methods with their
queries on the engine's pool (:func:`run_methods`, the core of :mod:`.terminals`).

A call runs Django's own synchronous method (``list(qs)``, ``qs.get(pk=1)``,
``qs.count()``, ...) on the caller's event loop, in rounds. In a round the method runs
until it needs the database, where it stops: the queryset whose model rows it is about to
read, or the SQL it is about to send on its connection, is captured. The captures of every
call of a round are then evaluated together in one engine run (one concurrency limit):
model rows through the engine's own path (root rows on a pooled connection, hydrated as
``ModelIterable`` does, each queryset's ``prefetch_related()`` lookups run as soon as its
rows are in), other SQL on a pooled connection into raw rows. The next round runs each
method again from the start, its earlier queries answered from what was fetched, so the
method sees the same rows, builds the same results and raises the same exceptions as it
would have in Django. A method that needs no query (an evaluated queryset's ``count()``)
finishes in the first round without one.

Only the code between the method's start and its queries runs twice (filtering, cloning,
Django's checks); SQL other than model rows is compiled twice. Django's errors that need
no query are raised in the first round, before any query is sent. Inside ``atomic`` the
engine run uses the caller's own connection (:func:`.dispatch.run_async`); a database that
is not PostgreSQL, or a method that needs the database where the engine cannot go (a
``SynchronousOnlyOperation``), runs as Django's own async method does
(``sync_to_async``), after the others' rounds.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, overload

import anyio
from asgiref.sync import sync_to_async
from django.core.exceptions import SynchronousOnlyOperation
from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Model, QuerySet
from django.db.models.query import ModelIterable

from .dispatch import capture_async_caller, engine_supports, run_async, split_lookups
from .execution import Rows
from .runtime.scheduler import run_in_session
from .runtime.session import CallerContext, Session, in_call_scope
from .sql.compiler import CompiledQuery, compile_queryset

__all__ = ["MethodCall", "afetch_all", "agather", "run_methods"]

T = TypeVar("T")
R1 = TypeVar("R1")
R2 = TypeVar("R2")
R3 = TypeVar("R3")
R4 = TypeVar("R4")

#: Rounds after which a method that keeps asking for new queries is handed to Django.
MAX_ROUNDS = 8


# -- what a round captures ---------------------------------------------------------------


@dataclass(eq=False)
class _RowsNeed:
    """The model rows of ``queryset`` (its lookups removed into ``lookups``)."""

    queryset: QuerySet[Any]
    lookups: list[Any]

    @property
    def key(self) -> tuple[Any, ...]:
        return ("rows", self.queryset.model, self.queryset.db)


@dataclass(eq=False)
class _SqlNeed:
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


_Need = _RowsNeed | _SqlNeed


class _Capture(BaseException):
    """Stops a method at its next query (a ``BaseException``: Django's ``except
    Exception`` clean-ups around ``cursor.execute()`` let it through)."""

    def __init__(self, need: _Need) -> None:
        super().__init__(need)
        self.need = need


class _Script:
    """The answers to one call's queries, in the order the method asks them."""

    __slots__ = ("answers", "position")

    def __init__(self) -> None:
        self.answers: list[tuple[tuple[Any, ...], Any]] = []
        self.position = 0

    def answer(self, need: _Need) -> Any:
        """The recorded answer to ``need``; raises :class:`_Capture` when there is none
        (or the method asked something else than last time: answers from there on are
        dropped)."""
        if self.position < len(self.answers):
            key, value = self.answers[self.position]
            if key == need.key:
                self.position += 1
                return value
            del self.answers[self.position :]
        raise _Capture(need)

    def record(self, need: _Need, value: Any) -> None:
        self.answers.append((need.key, value))


_script: contextvars.ContextVar[_Script | None] = contextvars.ContextVar(
    "async_prefetch_script", default=None
)


if TYPE_CHECKING:
    _ModelIterable = ModelIterable[Any]
else:  # not subscriptable at run time unless django-stubs-ext patched it
    _ModelIterable = ModelIterable


class _ScriptedModelIterable(_ModelIterable):
    """``ModelIterable`` whose rows come from the call's script while one is active (a
    capture run or a replay), else from Django's own iterable."""

    def __iter__(self) -> Any:
        script = _script.get()
        if script is None:
            return super().__iter__()
        queryset = self.queryset
        if queryset.query.select_for_update:  # not the engine's: Django's rows, raw SQL
            return super().__iter__()
        captured = queryset._clone()  # type: ignore[attr-defined]
        captured._iterable_class = ModelIterable
        root, lookups = split_lookups(captured, (), None)
        instances: list[Model] = script.answer(_RowsNeed(root, lookups))
        # The engine ran the queryset's prefetch_related() lookups with the rows.
        queryset._prefetch_done = True  # type: ignore[attr-defined]
        return iter(instances)


class _ScriptedCursor:
    """The cursor a method gets from :class:`_ScriptedConnection`: ``execute()`` answers
    from the script, the fetch methods read the answer."""

    def __init__(self, connection: _ScriptedConnection) -> None:
        self._connection = connection
        self._rows: Rows = []
        self._next = 0

    def execute(self, sql: str, params: Any = None) -> None:
        conn = self._connection
        need = _SqlNeed(conn.alias, sql, tuple(params or ()), conn.template)
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


class _ScriptedConnection:
    """Stands in for ``connections[alias]`` while a method runs: everything is the real
    connection's (operations, features, settings) except the cursors, which answer from
    the script (no I/O, so no ``SynchronousOnlyOperation`` on the event loop)."""

    def __init__(self, real: BaseDatabaseWrapper, script: _Script, template: QuerySet[Any]) -> None:
        self.__dict__.update(_real=real, script=script, template=template)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def cursor(self) -> _ScriptedCursor:
        return _ScriptedCursor(self)

    def chunked_cursor(self) -> _ScriptedCursor:
        return _ScriptedCursor(self)


# -- calls and rounds ------------------------------------------------------------------


@dataclass(eq=False)
class MethodCall:
    """Django's synchronous ``method(queryset)`` to run with its queries on the pool.

    ``method`` must only read (it may run twice or more, see the module docstring). Its
    result, or its exception, is the call's.
    """

    queryset: QuerySet[Any]
    method: Callable[[QuerySet[Any]], Any]
    script: _Script = field(default_factory=_Script)

    @property
    def alias(self) -> str:
        return self.queryset.db

    def attempt(self) -> Any:
        """Run the method from the start in a context of its own, where the scripted
        connection and iterable stay; raises :class:`_Capture` at an unanswered query."""
        self.script.position = 0
        real = connections[self.alias]  # the caller context's (made once, kept there)
        return contextvars.copy_context().run(self._attempt, real)

    def _attempt(self, real: BaseDatabaseWrapper) -> Any:
        _script.set(self.script)
        queryset = _scripted_clone(self.queryset)
        scripted: Any = _ScriptedConnection(real, self.script, queryset)
        connections[self.alias] = scripted
        return self.method(queryset)

    async def with_django(self) -> Any:
        """The method as Django's async methods run it: on the caller's thread."""
        return await sync_to_async(self.method, thread_sensitive=True)(self.queryset)


def _scripted_clone(queryset: QuerySet[Any]) -> QuerySet[Any]:
    """A copy of ``queryset`` (its result cache included) whose model rows come from the
    script."""
    clone: QuerySet[Any] = queryset._clone()  # type: ignore[attr-defined]
    clone._result_cache = queryset._result_cache
    clone._prefetch_done = queryset._prefetch_done  # type: ignore[attr-defined]
    if clone._iterable_class is ModelIterable:
        clone._iterable_class = _ScriptedModelIterable
    return clone


@dataclass
class _Outcome:
    """What a call came to: ``value``, ``error``, or (``django``) run by Django instead."""

    value: Any = None
    error: BaseException | None = None
    django: bool = False


async def run_methods(
    calls: Sequence[MethodCall],
    *,
    check_first: bool = False,
    consistent: bool | None = None,
    round_trips: int | None = None,
) -> list[Any]:
    """The result of each call, its queries on the engine's pool (see the module
    docstring), the queries of all calls at once; raises the error of the first call
    (in order) that failed, as evaluating them one after another would.

    ``check_first``: compile every captured queryset before sending any query, so that
    Django's compile-time errors of any call come before any call's query.
    ``consistent`` and ``round_trips`` are the options of each round's engine run (see
    :func:`agather`).
    """
    evaluate = in_call_scope(_evaluate, consistent=consistent, round_trips=round_trips)
    outcomes = [_Outcome() for _ in calls]
    engine = [i for i, call in enumerate(calls) if engine_supports(call.alias)]
    for i in range(len(calls)):
        if i not in engine:
            outcomes[i].django = True

    async def by_engine() -> None:
        await _rounds(calls, engine, outcomes, check_first, evaluate)

    async def by_django(indexes: list[int]) -> None:
        for i in indexes:
            try:
                outcomes[i].value = await calls[i].with_django()
            except Exception as exc:
                outcomes[i].error = exc
                return  # later ones would not have run

    django_now = [i for i in range(len(calls)) if i not in engine]
    async with anyio.create_task_group() as tg:
        tg.start_soon(by_engine)
        if django_now:
            tg.start_soon(by_django, django_now)
    # Calls the engine handed back (they need the database where it cannot go), up to
    # the first failed call: later ones would not have run.
    failed = [i for i, outcome in enumerate(outcomes) if outcome.error is not None]
    stop = failed[0] if failed else len(calls)
    await by_django([i for i in engine if outcomes[i].django and i < stop])
    results: list[Any] = []
    for outcome in outcomes:
        if outcome.error is not None:
            raise outcome.error
        results.append(outcome.value)
    return results


async def _rounds(
    calls: Sequence[MethodCall],
    indexes: list[int],
    outcomes: list[_Outcome],
    check_first: bool,
    evaluate: Callable[..., Any],
) -> None:
    """Run the calls at ``indexes`` round by round (see the module docstring). The
    caller's context is captured (a hop to its thread) only once a query is needed."""
    caller: CallerContext | None = None
    pending = list(indexes)
    for round_number in range(MAX_ROUNDS + 1):
        needs: list[tuple[int, _Need]] = []
        for i in pending:
            try:
                outcomes[i].value = calls[i].attempt()
            except _Capture as capture:
                needs.append((i, capture.need))
            except SynchronousOnlyOperation:
                outcomes[i].django = True
            except Exception as exc:  # the method's own result, as in Django
                outcomes[i].error = exc
                if round_number == 0:
                    return  # Django's error before any query: nothing else runs
        if not needs:
            return
        if round_number == MAX_ROUNDS:  # it keeps asking: Django runs it instead
            for i, _ in needs:
                outcomes[i].django = True
            return
        if check_first and round_number == 0:
            for i, need in needs:
                if isinstance(need, _RowsNeed):
                    try:
                        compile_queryset(need.queryset)  # Django's error, before any query
                    except SynchronousOnlyOperation:
                        pass  # the engine's own compile decides
                    except Exception as exc:
                        outcomes[i].error = exc
                        return
        if caller is None:
            caller = await capture_async_caller()
        answers: list[_Outcome] = await run_async(caller, evaluate, [n for _, n in needs])
        failed = [
            (i, answer) for (i, _), answer in zip(needs, answers, strict=True) if answer.error
        ]
        if failed:  # the first one (in order) is raised; later ones were cancelled
            i, answer = failed[0]
            outcomes[i].error = answer.error
            return
        pending = []
        for (i, need), answer in zip(needs, answers, strict=True):
            if answer.django:
                outcomes[i].django = True
            else:
                calls[i].script.record(need, answer.value)
                pending.append(i)


async def _evaluate(needs: list[_Need], caller: CallerContext) -> list[_Outcome]:
    """Answer ``needs`` concurrently in one call's session (one limit, one trace).

    When one fails, the ones after it (in order) are cancelled: their results could not
    matter. A ``SynchronousOnlyOperation`` (a query needs Django's own connection, e.g.
    to read the server version while compiling) marks the need for Django's own method.
    """
    session = Session(caller)
    answers = [_Outcome() for _ in needs]
    scopes = [anyio.CancelScope() for _ in needs]

    async def answer(index: int) -> None:
        with scopes[index]:
            try:
                # A copy per run: run_in_session gives it a journal of its own, the
                # limiter, executors, trace and memos stay shared.
                answers[index].value = await _answer(session.fork(), needs[index])
            except SynchronousOnlyOperation:
                answers[index].django = True
            except Exception as exc:
                answers[index].error = exc
                for later in scopes[index + 1 :]:
                    later.cancel()

    async with anyio.create_task_group() as tg:
        for index in range(len(needs)):
            tg.start_soon(answer, index)
    return answers


async def _answer(session: Session, need: _Need) -> Any:
    if isinstance(need, _RowsNeed):
        return await run_in_session(session, [], need.lookups, need.queryset)
    rows: Rows = []

    async def consume(batch: Rows) -> None:
        rows.extend(batch)

    template = need.template
    compiled = CompiledQuery(
        template, need.alias, template.query.get_compiler(using=need.alias), need.sql, need.params
    )
    await session.executor(need.alias).fetch(compiled, consume)
    return rows


# -- agather ---------------------------------------------------------------------------


def _fetch_all(queryset: QuerySet[Any]) -> tuple[list[Any], bool]:
    """``list(queryset)``'s work: the result cache, filled and prefetched."""
    queryset._fetch_all()
    cache = queryset._result_cache
    assert cache is not None
    return cache, queryset._prefetch_done  # type: ignore[attr-defined]


async def afetch_all(queryset: QuerySet[Any]) -> list[Any]:
    """Fill ``queryset``'s result cache (and its prefetch caches) as Django's
    ``_fetch_all()`` does, the queries on the engine's pool; returns the cache."""
    if queryset._result_cache is not None and (
        queryset._prefetch_done or not queryset._prefetch_related_lookups  # type: ignore[attr-defined]
    ):
        cache: list[Any] = queryset._result_cache
        return cache
    ((cache, done),) = await run_methods([MethodCall(queryset, _fetch_all)])
    _store(queryset, cache, done)
    return cache


def _store(queryset: QuerySet[Any], cache: list[Any], done: bool) -> None:
    queryset._result_cache = cache
    queryset._prefetch_done = done  # type: ignore[attr-defined]


@overload
async def agather(
    q1: QuerySet[Any, R1], /, *, consistent: bool | None = ..., round_trips: int | None = ...
) -> tuple[list[R1]]: ...
@overload
async def agather(
    q1: QuerySet[Any, R1],
    q2: QuerySet[Any, R2],
    /,
    *,
    consistent: bool | None = ...,
    round_trips: int | None = ...,
) -> tuple[list[R1], list[R2]]: ...
@overload
async def agather(
    q1: QuerySet[Any, R1],
    q2: QuerySet[Any, R2],
    q3: QuerySet[Any, R3],
    /,
    *,
    consistent: bool | None = ...,
    round_trips: int | None = ...,
) -> tuple[list[R1], list[R2], list[R3]]: ...
@overload
async def agather(
    q1: QuerySet[Any, R1],
    q2: QuerySet[Any, R2],
    q3: QuerySet[Any, R3],
    q4: QuerySet[Any, R4],
    /,
    *,
    consistent: bool | None = ...,
    round_trips: int | None = ...,
) -> tuple[list[R1], list[R2], list[R3], list[R4]]: ...
@overload
async def agather(
    *querysets: QuerySet[Any, Any], consistent: bool | None = ..., round_trips: int | None = ...
) -> tuple[list[Any], ...]: ...


async def agather(
    *querysets: QuerySet[Any, Any], consistent: bool | None = None, round_trips: int | None = None
) -> tuple[list[Any], ...]:
    """Evaluate independent querysets at once: ``books, authors = await agather(
    Book.objects.prefetch_related("pages"), Author.objects.filter(...))``.

    Returns one list per queryset, what ``list(qs)`` returns for each, with the same
    prefetch caches; each queryset's result cache is filled as ``list(qs)`` fills it.
    The root queries run at once on the engine's pool, each queryset's
    ``prefetch_related()`` lookups as soon as its rows are in, all of them under one
    ``MAX_CONCURRENCY``. Django's errors that need no query are raised before any query
    is sent; otherwise the error is the one of the first failing queryset, in order (the
    others' queries are cancelled in the server or their results dropped, and no
    instance that existed before the call keeps a cache the call wrote). Inside
    ``atomic`` the queries run on the caller's connection, each stage's in one
    pipeline (one round trip). ``values()``
    and ``values_list()`` querysets run on the pool too (Django converts their rows).
    Querysets on another database vendor, and those whose evaluation needs Django's own
    connection (``select_for_update()``), are evaluated by Django on the caller's thread,
    in order.

    ``round_trips=1``: the queries of each stage (the root queries, then each level of
    prefetches) go in one pipeline on one pooled connection: one round trip per stage,
    the server running them one after another. ``consistent=True``: every query sees one
    database snapshot (one ``REPEATABLE READ`` transaction on that connection; default:
    the ``CONSISTENT`` setting); inside ``atomic`` it needs a ``REPEATABLE READ`` or
    ``SERIALIZABLE`` transaction (``TransactionManagementError``).

    Raises ``TypeError`` for an argument that is not a queryset, ``ValueError`` for a
    ``round_trips`` other than 1 or ``None``.
    """
    for queryset in querysets:
        if not isinstance(queryset, QuerySet):
            raise TypeError(
                f"agather() arguments must be querysets, not {type(queryset).__name__}."
            )
    unique = list({id(queryset): queryset for queryset in querysets}.values())
    todo = [
        queryset
        for queryset in unique
        if queryset._result_cache is None
        or (queryset._prefetch_related_lookups and not queryset._prefetch_done)  # type: ignore[attr-defined]
    ]
    if todo:
        results = await run_methods(
            [MethodCall(queryset, _fetch_all) for queryset in todo],
            check_first=len(todo) > 1,
            consistent=consistent,
            round_trips=round_trips,
        )
        for queryset, (cache, done) in zip(todo, results, strict=True):
            _store(queryset, cache, done)
    return tuple(list(queryset._result_cache or ()) for queryset in querysets)
