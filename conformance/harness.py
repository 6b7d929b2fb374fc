"""The test runner ``runtests.py`` uses in a conformance run (``TEST_RUNNER`` in the settings).

It routes every prefetch through the engine (:func:`async_prefetch.install`), counts how often
the engine runs and how often it hands a call back to Django's own implementation, runs the
tests in the mode named by ``CONFORMANCE_MODE`` and writes each test's outcome and counts as
JSON to the file named by ``CONFORMANCE_RESULTS``:

``atomic``
    The tests as written: ``django.test.TestCase`` wraps each test in ``atomic``.
``transaction``
    ``django.test.TestCase`` is replaced, while the test modules are imported, by
    :class:`TransactionalTestCase`: no ``atomic`` block is open around a test, so the engine
    runs its queries on its own pool.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sys
import threading
import unittest
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ParamSpec, TypeAlias, TypeVar

import django
import django.test
import django.test.testcases
from django.apps import apps
from django.db import connections, transaction
from django.db.models import Model
from django.test import TestCase, TransactionTestCase
from django.test.runner import DiscoverRunner

import async_prefetch
from async_prefetch import api
from async_prefetch.runtime import scheduler
from async_prefetch.runtime.session import CallerContext
from async_prefetch.sql import statements

# Every kept statement the engine reuses is compiled by Django again and compared.
statements.VERIFY = True

P = ParamSpec("P")
T = TypeVar("T")
RunPrefetch: TypeAlias = Callable[..., Coroutine[Any, Any, list[Model]]]
ExcInfo: TypeAlias = tuple[type[BaseException], BaseException, TracebackType]

MODES = ("atomic", "transaction")

#: Counter names: calls of the engine's ``run_prefetch``, those of them that ran their
#: queries on the caller's own connections (inside ``atomic``) instead of the pool, calls
#: that the public API handed back to Django's ``prefetch_related_objects``, and levels the
#: engine delegated to Django's own ``get_prefetch_querysets()`` within a run.
ENGINE_RUNS = "engine_runs"
ON_CALLER_CONNECTIONS = "on_caller_connections"
HAND_BACKS = "hand_backs"
DELEGATED_LEVELS = "delegated_levels"
COUNTERS = (ENGINE_RUNS, ON_CALLER_CONNECTIONS, HAND_BACKS, DELEGATED_LEVELS)

_counts: Counter[str] = Counter()
_counts_lock = threading.Lock()


def _bump(name: str) -> None:
    with _counts_lock:
        _counts[name] += 1


def counts() -> dict[str, int]:
    """The counters so far (every name in :data:`COUNTERS`)."""
    with _counts_lock:
        return {name: _counts[name] for name in COUNTERS}


def _counting(name: str, func: Callable[P, T]) -> Callable[P, T]:
    @functools.wraps(func)
    def counted(*args: P.args, **kwargs: P.kwargs) -> T:
        _bump(name)
        return func(*args, **kwargs)

    return counted


def _counting_async(
    name: str, func: Callable[P, Coroutine[Any, Any, T]]
) -> Callable[P, Coroutine[Any, Any, T]]:
    @functools.wraps(func)
    async def counted(*args: P.args, **kwargs: P.kwargs) -> T:
        _bump(name)
        return await func(*args, **kwargs)

    return counted


def _counting_runs(run_prefetch: RunPrefetch) -> RunPrefetch:
    @functools.wraps(run_prefetch)
    async def counted(
        instances: list[Model], lookups: Sequence[Any], caller: CallerContext, **options: Any
    ) -> list[Model]:
        _bump(ENGINE_RUNS)
        if caller.caller_connections:
            _bump(ON_CALLER_CONNECTIONS)
        return await run_prefetch(instances, lookups, caller, **options)

    return counted


def install_engine() -> None:
    """``async_prefetch.install()``, then counting wrappers on the engine's entry point and
    on the hand-back path.

    ``run_prefetch`` is replaced in every ``async_prefetch`` module holding a reference to
    it (``api`` imports it by name). Must run after ``django.setup()`` and only once.
    """
    async_prefetch.install()
    api.django_prefetch_related_objects = _counting(HAND_BACKS, api.django_prefetch_related_objects)
    original = scheduler.run_prefetch
    counted = _counting_runs(original)
    for name, module in list(sys.modules.items()):
        if name.partition(".")[0] == "async_prefetch" and vars(module).get("run_prefetch") is (
            original
        ):
            module.run_prefetch = counted  # type: ignore[attr-defined]
    scheduler._Run._fetch_delegated = _counting_async(  # type: ignore[method-assign]
        DELEGATED_LEVELS, scheduler._Run._fetch_delegated
    )


_BASELINE_SCHEMA = "conformance_baseline"


@dataclass(frozen=True)
class _Baseline:
    tables: list[str]  # every table of the test database
    kept: list[str]  # the tables that held rows, copied into _BASELINE_SCHEMA


_baselines: dict[str, _Baseline] = {}


def _non_empty_tables(cursor: Any, quote: Callable[[str], str], tables: list[str]) -> list[str]:
    if not tables:
        return []
    cursor.execute(
        " UNION ALL ".join(f"SELECT %s WHERE EXISTS (SELECT FROM {quote(t)})" for t in tables),
        tables,
    )
    return [name for (name,) in cursor.fetchall()]


def save_baseline(alias: str) -> None:
    """Copy the rows of ``alias``'s test database (content types, sites, permissions of
    migrated apps) into a schema of their own, for :func:`restore_baseline`."""
    connection = connections[alias]
    quote = connection.ops.quote_name
    with transaction.atomic(using=alias), connection.cursor() as cursor:
        tables = connection.introspection.table_names(cursor)
        kept = _non_empty_tables(cursor, quote, tables)
        cursor.execute(f"DROP SCHEMA IF EXISTS {_BASELINE_SCHEMA} CASCADE")
        cursor.execute(f"CREATE SCHEMA {_BASELINE_SCHEMA}")
        for table in kept:
            cursor.execute(
                f"CREATE TABLE {_BASELINE_SCHEMA}.{quote(table)} AS TABLE {quote(table)}"
            )
    _baselines[alias] = _Baseline(tables, kept)


def restore_baseline(alias: str) -> None:
    """Put ``alias``'s test database back to the rows :func:`save_baseline` saw, in one
    transaction: the state a ``TestCase`` test starts from, same primary keys included.

    Every table that existed then and has rows is emptied with ``DELETE`` (Django's foreign keys are
    deferred, so the order does not matter); sequences are left alone, as a rollback does.
    """
    baseline = _baselines[alias]
    connection = connections[alias]
    quote = connection.ops.quote_name
    with transaction.atomic(using=alias), connection.cursor() as cursor:
        dirty = _non_empty_tables(cursor, quote, baseline.tables)
        for table in sorted({*dirty, *baseline.kept}):
            cursor.execute(f"DELETE FROM {quote(table)}")
        for table in baseline.kept:
            cursor.execute(
                f"INSERT INTO {quote(table)} SELECT * FROM {_BASELINE_SCHEMA}.{quote(table)}"
            )


class TransactionalTestCase(TransactionTestCase):
    """``django.test.TestCase``'s API without its ``atomic`` blocks.

    Each test's data is committed. Instead of a rollback, the databases are put back to
    their rows from before the first test (:func:`restore_baseline`) before and after each
    test, so every test starts from the state a ``TestCase`` test starts from.
    ``setUpTestData()`` runs before every test, after the fixtures are loaded, so each test
    gets fresh objects (what ``TestCase`` gives by deep-copying them).
    ``captureOnCommitCallbacks()`` is ``TestCase``'s; with no ``atomic`` open, callbacks
    run at once instead of being captured.
    """

    available_apps = None

    captureOnCommitCallbacks = TestCase.__dict__["captureOnCommitCallbacks"]

    @classmethod
    def setUpTestData(cls) -> None:
        """Create the data each test of the class starts from."""

    @classmethod
    def _fixture_setup(cls) -> None:
        for alias in cls._databases_names(include_mirrors=False):  # type: ignore[attr-defined]
            restore_baseline(alias)
        super()._fixture_setup()  # type: ignore[misc]
        # TestCase runs setUpTestData() in setUpClass(), before available_apps applies.
        if cls.available_apps is not None:
            apps.unset_available_apps()
        try:
            cls.setUpTestData()
        finally:
            if cls.available_apps is not None:
                apps.set_available_apps(cls.available_apps)

    def _fixture_teardown(self) -> None:
        for alias in self._databases_names(include_mirrors=False):  # type: ignore[attr-defined]
            restore_baseline(alias)

    def _should_reload_connections(self) -> bool:
        return False  # as TestCase: keep the connections open between tests


@contextmanager
def _test_case_replaced(replacement: type[TransactionTestCase]) -> Iterator[None]:
    """Make ``from django.test import TestCase`` (and ``django.test.testcases``) give
    ``replacement``; Django's own references stay as they were once the block ends."""
    modules = (django.test, django.test.testcases)
    saved = [module.TestCase for module in modules]
    for module in modules:
        module.TestCase = replacement  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for module, original in zip(modules, saved, strict=True):
            module.TestCase = original  # type: ignore[attr-defined]


def _test_id(test: unittest.TestCase) -> str:
    """The test's dotted id; class-level errors become ``module.Class.setUpClass``."""
    if isinstance(test, unittest.case._SubTest):  # type: ignore[attr-defined]
        test = test.test_case
    description = test.id()
    # unittest's _ErrorHolder: "setUpClass (module.Class)", "setUpModule (module)".
    hook, _, where = description.partition(" (")
    if where.endswith(")") and "." not in hook:
        return f"{where[:-1]}.{hook}"
    return description


_SEVERITY = {
    "passed": 0,
    "expected_failure": 0,
    "skipped": 0,
    "failed": 1,
    "unexpected_success": 1,
    "error": 2,
}


class RecordingResult(unittest.TextTestResult):
    """A text result that also keeps each test's outcome, traceback and counter deltas.

    Counter deltas are attributed to the test that stops next, so a class's set-up
    (``setUpTestData`` under ``TestCase``) counts towards its first test.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.records: dict[str, dict[str, Any]] = {}
        self._mark = counts()

    def _record(self, test: unittest.TestCase, outcome: str, err: ExcInfo | None = None) -> None:
        record = self.records.setdefault(
            _test_id(test), {"outcome": "passed", "detail": "", **dict.fromkeys(COUNTERS, 0)}
        )
        if _SEVERITY[outcome] >= _SEVERITY[record["outcome"]]:
            record["outcome"] = outcome
        if err is not None:
            record["detail"] += self._exc_info_to_string(err, test)  # type: ignore[attr-defined]

    def stopTest(self, test: unittest.TestCase) -> None:
        super().stopTest(test)
        record = self.records.setdefault(
            _test_id(test), {"outcome": "passed", "detail": "", **dict.fromkeys(COUNTERS, 0)}
        )
        now = counts()
        for name in COUNTERS:
            record[name] += now[name] - self._mark[name]
        self._mark = now

    def addSuccess(self, test: unittest.TestCase) -> None:
        super().addSuccess(test)
        self._record(test, "passed")

    def addError(self, test: unittest.TestCase, err: ExcInfo) -> None:  # type: ignore[override]
        super().addError(test, err)
        self._record(test, "error", err)

    def addFailure(self, test: unittest.TestCase, err: ExcInfo) -> None:  # type: ignore[override]
        super().addFailure(test, err)
        self._record(test, "failed", err)

    def addSubTest(
        self,
        test: unittest.TestCase,
        subtest: unittest.TestCase,
        err: ExcInfo | None,  # type: ignore[override]
    ) -> None:
        super().addSubTest(test, subtest, err)
        if err is not None:
            failed = issubclass(err[0], test.failureException)
            self._record(test, "failed" if failed else "error", err)

    def addSkip(self, test: unittest.TestCase, reason: str) -> None:
        super().addSkip(test, reason)
        self._record(test, "skipped")

    def addExpectedFailure(self, test: unittest.TestCase, err: ExcInfo) -> None:  # type: ignore[override]
        super().addExpectedFailure(test, err)
        self._record(test, "expected_failure")

    def addUnexpectedSuccess(self, test: unittest.TestCase) -> None:
        super().addUnexpectedSuccess(test)
        self._record(test, "unexpected_success")


class ConformanceRunner(DiscoverRunner):
    """Django's runner with the engine installed, the mode's ``TestCase`` and a JSON report."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mode = os.environ.get("CONFORMANCE_MODE", "atomic")
        if self.mode not in MODES:
            raise ValueError(f"CONFORMANCE_MODE={self.mode!r}: expected one of {MODES}")
        self.results_path = os.environ.get("CONFORMANCE_RESULTS")

    def setup_test_environment(self, **kwargs: Any) -> None:
        super().setup_test_environment(**kwargs)
        install_engine()

    def build_suite(self, *args: Any, **kwargs: Any) -> unittest.TestSuite:
        if self.mode == "transaction":
            with _test_case_replaced(TransactionalTestCase):
                return super().build_suite(*args, **kwargs)
        return super().build_suite(*args, **kwargs)

    def setup_databases(self, **kwargs: Any) -> Any:
        old_config = super().setup_databases(**kwargs)
        if self.mode == "transaction":
            for alias in kwargs.get("aliases") or connections:
                if not connections[alias].settings_dict["TEST"]["MIRROR"]:
                    save_baseline(alias)
        return old_config

    def get_resultclass(self) -> type[unittest.TextTestResult]:
        return RecordingResult

    def run_suite(self, suite: unittest.TestSuite, **kwargs: Any) -> unittest.TextTestResult:
        result = super().run_suite(suite, **kwargs)
        if self.results_path and isinstance(result, RecordingResult):
            report = {
                "django": django.get_version(),
                "mode": self.mode,
                "tests": result.records,
            }
            Path(self.results_path).write_text(json.dumps(report, indent=1))
        return result

    def teardown_databases(self, old_config: Any, **kwargs: Any) -> None:
        # The engine's pooled connections would keep the test databases from being dropped.
        asyncio.run(async_prefetch.aclose())
        super().teardown_databases(old_config, **kwargs)
