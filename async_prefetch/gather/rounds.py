"""Calls run in rounds: :class:`MethodCall`, :func:`run_methods` (see the package docstring).

A round runs each pending call until it needs the database (:mod:`.script` captures
what), compiles the model-row queries captured (Django's compile-time errors before any
query), then answers the captures of every call of the round in one engine run.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from asgiref.sync import sync_to_async
from django.core.exceptions import SynchronousOnlyOperation
from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import QuerySet

from ..dispatch import capture_async_caller, engine_supports, run_async
from ..execution import Rows
from ..execution.pipeline import PipelineAborted
from ..runtime.scheduler import run_in_session
from ..runtime.session import CallerContext, Session, in_call_scope
from ..sql.compiler import CompiledQuery, compile_queryset
from .script import (
    Capture,
    Need,
    RowsNeed,
    Script,
    ScriptedConnection,
    current_script,
    scripted_clone,
)

__all__ = ["MAX_ROUNDS", "MethodCall", "run_methods"]

#: Rounds after which a method that keeps asking for new queries is handed to Django.
MAX_ROUNDS = 8


@dataclass(eq=False)
class MethodCall:
    """Django's synchronous ``method(queryset)`` to run with its queries on the pool.

    ``method`` must only read (it may run twice or more, see the package docstring). Its
    result, or its exception, is the call's.
    """

    queryset: QuerySet[Any]
    method: Callable[[QuerySet[Any]], Any]
    script: Script = field(default_factory=Script)

    @property
    def alias(self) -> str:
        return self.queryset.db

    def attempt(self) -> Any:
        """Run the method from the start in a context of its own, where the scripted
        connection and iterable stay; raises :class:`.script.Capture` at an unanswered
        query."""
        self.script.position = 0
        real = connections[self.alias]  # the caller context's (made once, kept there)
        return contextvars.copy_context().run(self._attempt, real)

    def _attempt(self, real: BaseDatabaseWrapper) -> Any:
        current_script.set(self.script)
        queryset = scripted_clone(self.queryset)
        scripted: Any = ScriptedConnection(real, self.script, queryset)
        connections[self.alias] = scripted
        return self.method(queryset)

    async def with_django(self) -> Any:
        """The method as Django's async methods run it: on the caller's thread."""
        return await sync_to_async(self.method, thread_sensitive=True)(self.queryset)


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
    """The result of each call, its queries on the engine's pool (see the package
    docstring), the queries of all calls at once; raises the error of the first call
    (in order) that failed, as evaluating them one after another would.

    ``check_first``: a compile-time error of any call's first captured model-row query
    is raised before any call's query is sent (without it, it is that call's error, in
    order). ``consistent`` and ``round_trips`` are the options of each round's engine
    run (see :func:`.agather`).
    """
    evaluate = in_call_scope(_evaluate, consistent=consistent, round_trips=round_trips)
    outcomes = [_Outcome() for _ in calls]
    engine: list[int] = []
    django_now: list[int] = []
    for i, call in enumerate(calls):
        (engine if engine_supports(call.alias) else django_now).append(i)
    for i in django_now:
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

    if django_now:
        async with anyio.create_task_group() as tg:
            tg.start_soon(by_engine)
            tg.start_soon(by_django, django_now)
    else:
        await by_engine()
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
    """Run the calls at ``indexes`` round by round (see the package docstring). The
    caller's context is captured (a hop to its thread) only once a query is needed."""
    caller: CallerContext | None = None
    pending = list(indexes)
    for round_number in range(MAX_ROUNDS + 1):
        needs: list[tuple[int, Need]] = []
        for i in pending:
            try:
                outcomes[i].value = calls[i].attempt()
            except Capture as capture:
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
        # A lone need's error is its call's; several calls' errors stay in call order
        # (the engine run raises them), unless Django's must come before any query.
        refuse = (check_first and round_number == 0) or len(needs) == 1
        if _compile_all(needs, outcomes, refuse):
            return
        if caller is None:
            caller = await capture_async_caller()
        answers: list[_Outcome] = await run_async(caller, evaluate, [n for _, n in needs])
        failed = [
            (i, answer) for (i, _), answer in zip(needs, answers, strict=True) if answer.error
        ]
        if failed:  # the first one (in order) is raised; later ones were cancelled
            # A query that only shared a pipeline with the failing one would have run.
            real = [(i, a) for i, a in failed if not isinstance(a.error, PipelineAborted)]
            i, answer = (real or failed)[0]
            outcomes[i].error = answer.error
            return
        pending = []
        for (i, need), answer in zip(needs, answers, strict=True):
            if answer.django:
                outcomes[i].django = True
            else:
                calls[i].script.record(need, answer.value)
                pending.append(i)


def _compile_all(needs: list[tuple[int, Need]], outcomes: list[_Outcome], refuse: bool) -> bool:
    """Compile the model-row needs; with ``refuse``, stop at the first that raises
    Django's error, which becomes its call's (True: no query is to be sent)."""
    for i, need in needs:
        if isinstance(need, RowsNeed) and _compile(need) and refuse:
            outcomes[i].error = need.error
            return True
    return False


def _compile(need: RowsNeed) -> bool:
    """Compile ``need``'s queryset here, once (the engine run sends that SQL and builds
    the instances with that compiler); True when Django raised an error (kept in
    ``need.error``). A compile that needs the database is left to the engine."""
    if need.compiled is not None or need.error is not None:
        return need.error is not None
    try:
        need.compiled = compile_queryset(need.queryset)
    except SynchronousOnlyOperation:
        pass  # the engine's own compile decides
    except Exception as exc:
        need.error = exc
        return True
    return False


async def _evaluate(needs: list[Need], caller: CallerContext) -> list[_Outcome]:
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
                if not isinstance(exc, PipelineAborted):  # the failing query's run decides
                    for later in scopes[index + 1 :]:
                        later.cancel()

    async with anyio.create_task_group() as tg:
        for index in range(len(needs)):
            tg.start_soon(answer, index)
    return answers


async def _answer(session: Session, need: Need) -> Any:
    if isinstance(need, RowsNeed):
        if need.error is not None:
            raise need.error
        root = need.queryset if need.compiled is None else need.compiled
        return await run_in_session(session, [], need.lookups, root)
    rows: Rows = []

    async def consume(batch: Rows) -> None:
        rows.extend(batch)

    template = need.template
    compiled = CompiledQuery(
        template, need.alias, template.query.get_compiler(using=need.alias), need.sql, need.params
    )
    await session.executor(need.alias).fetch(compiled, consume)
    return rows
