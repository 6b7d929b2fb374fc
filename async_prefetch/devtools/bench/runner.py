"""``python -m async_prefetch bench``: Django's ``prefetch_related`` against the engine.

:func:`main` starts (or finds) PostgreSQL with :func:`async_prefetch.devtools.embedded.get_server`,
puts one :class:`~async_prefetch.devtools.latency_proxy.LatencyProxyProcess` per round-trip time
in front of it, each behind its own database alias (``rtt0``, ``rtt1``, ``rtt5``: the same
database), creates and seeds the tables of :mod:`async_prefetch.devtools.bench.workloads`, and for
every workload and RTT times four sides in one process, alternating them run by run:

* ``django_sync``: ``list(root.prefetch_related(*lookups))``;
* ``django_async``: ``[x async for x in root.prefetch_related(*lookups)]`` in an event loop;
* ``engine``: ``await aprefetch(root, *lookups)`` in the same event loop;
* ``floor``: the engine's own statements (from a traced run) fetched with raw psycopg on the
  engine's pool, one depth at a time with each depth's statements concurrent, rows turned
  into one dict each and grouped by parent key: a lower bound, not an equivalent.

Every run of the first three sides must give the same structural signature as Django's
warm-up run (:func:`async_prefetch.devtools.signature.signature`); a difference is reported
with the first differing root and the workload counts as failed (exit code 1). Peak memory
(``VmHWM`` from ``/proc/self/status``, reset before the run; ``ru_maxrss`` where that is
missing) is measured in a fresh subprocess per workload and side. Medians go to
``results.md``, ``results.json`` and ``speedup.png`` in ``--out``; ``--profile WORKLOAD``
instead profiles the engine side with cProfile.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import datetime
import gc
import json
import logging
import os
import platform
import pstats
import re
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import django
import psycopg
from django.conf import settings
from django.core.management import call_command
from django.db import connections
from django.db.models import Model
from django.test.utils import CaptureQueriesContext

import async_prefetch
from async_prefetch.devtools.bench.stream import NAME as STREAM
from async_prefetch.devtools.bench.stream import StreamWorkload
from async_prefetch.devtools.demo.bookstore import DEMO_APP
from async_prefetch.devtools.embedded import ENV_SOURCE, ServerInfo, get_server
from async_prefetch.devtools.latency_proxy import LatencyProxyProcess
from async_prefetch.runtime.trace import ROOT_KEY

if TYPE_CHECKING:
    from async_prefetch.devtools.bench.workloads import Workload

BENCH_APP: Final = "async_prefetch.devtools.bench"
DEFAULT_RTTS: Final = (0.0, 1.0, 5.0)
DEFAULT_RUNS: Final = 7
QUICK_RUNS: Final = 2
POOL_SIZE: Final = 10
"""Engine pool ``MIN_SIZE`` = ``MAX_SIZE`` (no pool growth inside a timed run); the peers
bench gives every peer's pool as many connections."""
SIDES: Final = ("django_sync", "django_async", "engine", "floor")

logger = logging.getLogger(__name__)


class ResultMismatchError(AssertionError):
    """A side's result differs from Django's ``prefetch_related``."""


class FloorUnavailableError(RuntimeError):
    """The floor cannot replay this run (a step was delegated to Django, or SQL unmatched)."""


def alias_for(rtt_ms: float) -> str:
    """The database alias for ``rtt_ms``: ``rtt0``, ``rtt1``, ``rtt0_5``."""
    return f"rtt{rtt_ms:g}".replace(".", "_")


# -- Django set-up ----------------------------------------------------------------------------


def configure_django(
    server: ServerInfo,
    proxies: dict[str, tuple[str, int]],
    extra: dict[str, dict[str, Any]] | None = None,
) -> None:
    """``settings.configure`` for the bench: ``default`` goes straight to ``server``, each
    alias in ``proxies`` through its proxy (TCP host, port), plus the ``extra`` database
    entries; the engine's pool is :data:`POOL_SIZE` (min = max). Raises ``RuntimeError`` if
    settings are configured already (the bench needs its own)."""
    if settings.configured:
        raise RuntimeError("the bench configures Django itself; run it in a fresh process")
    databases = {"default": server.django_database()}
    for alias, (host, port) in proxies.items():
        databases[alias] = server.django_database(HOST=host, PORT=str(port))
    databases.update(extra or {})
    settings.configure(
        DATABASES=databases,
        INSTALLED_APPS=["django.contrib.contenttypes", DEMO_APP, BENCH_APP],
        USE_TZ=True,
        TIME_ZONE="UTC",
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        ASYNC_PREFETCH={"POOL": {"MIN_SIZE": POOL_SIZE, "MAX_SIZE": POOL_SIZE}},
    )
    django.setup()


@contextlib.contextmanager
def proxied(rtts: Sequence[float]) -> Iterator[tuple[ServerInfo, dict[str, tuple[str, int]]]]:
    """The server and one latency proxy per RTT (alias -> host, port) while entered."""
    server = get_server()
    with contextlib.ExitStack() as stack:
        proxies: dict[str, tuple[str, int]] = {}
        for rtt in rtts:
            proxy = stack.enter_context(LatencyProxyProcess(server.address(), rtt))
            proxies[alias_for(rtt)] = (proxy.host, proxy.port)
        yield server, proxies


@contextlib.contextmanager
def bench_database(
    rtts: Sequence[float],
) -> Iterator[tuple[ServerInfo, dict[str, tuple[str, int]]]]:
    """:func:`proxied`, with Django configured (:func:`configure_django`) on the server
    through the proxies, its tables created; on exit the engine's pools are closed while
    the proxies are still up."""
    with proxied(rtts) as (server, proxies):
        configure_django(server, proxies)
        try:
            call_command("migrate", run_syncdb=True, verbosity=0)
            yield server, proxies
        finally:
            shutdown_engine()


# -- the floor ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Statement:
    """One engine statement (SQL and parameters, as the engine sends them) and the column
    that links its rows to their parents (``None``: not grouped)."""

    key: str
    sql: str
    params: Any
    group_by: str | None


@dataclass(frozen=True)
class FloorPlan:
    """The engine's statements of one run: root first, then one stage per lookup depth."""

    alias: str
    stages: tuple[tuple[Statement, ...], ...]

    @property
    def statements(self) -> list[Statement]:
        return [statement for stage in self.stages for statement in stage]


_PREFETCH_VAL = re.compile(r'AS "(_prefetch_related_val_\w+)"')
_FILTER_COLUMN = re.compile(r'"\w+"\."(\w+)"\s*(?:IN\s*\(|=\s*ANY\s*\()', re.IGNORECASE)


def _group_column(sql: str) -> str | None:
    """The parent-key column: Django's M2M extra select, else the last ``IN``/``ANY`` column."""
    extra = _PREFETCH_VAL.search(sql)
    if extra is not None:
        return extra.group(1)
    columns = _FILTER_COLUMN.findall(sql)
    return columns[-1] if columns else None


def floor_plan(alias: str, steps: Sequence[Any]) -> FloorPlan:
    """A traced run's query steps (their SQL and parameters) grouped by depth
    (``key.count("__")``; the root query first). Raises :class:`FloorUnavailableError`."""
    delegated = [step.key for step in steps if step.kind == "django"]
    if delegated:
        raise FloorUnavailableError(f"steps delegated to Django: {delegated}")
    by_depth: dict[int, list[Statement]] = {}
    for step in sorted(steps, key=lambda s: s.started):
        if step.kind != "query" or step.sql is None:
            continue
        depth = -1 if step.key == ROOT_KEY else step.key.count("__")
        statement = Statement(step.key, step.sql, step.params, _group_column(step.sql))
        by_depth.setdefault(depth, []).append(statement)
    return FloorPlan(alias, tuple(tuple(by_depth[depth]) for depth in sorted(by_depth)))


async def _fetch_statement(
    pool: Any, statement: Statement
) -> tuple[list[str], list[tuple[Any, ...]]]:
    async with pool.connection() as conn:
        cursor = await conn.execute(statement.sql, statement.params)
        rows: list[tuple[Any, ...]] = await cursor.fetchall()
        names = [column.name for column in cursor.description or ()]
    return names, rows


def _build(statement: Statement, names: list[str], rows: list[tuple[Any, ...]]) -> int:
    """The cheapest useful objects: a dict per row, grouped by the parent key column."""
    key = names.index(statement.group_by) if statement.group_by in names else None
    grouped: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        parent = None if key is None else row[key]
        group = grouped.get(parent)
        if group is None:
            group = grouped[parent] = []
        group.append(dict(zip(names, row, strict=True)))
    return len(rows)


async def run_floor(plan: FloorPlan) -> int:
    """Fetch ``plan`` on the engine's pool, each stage's statements concurrently; must run on
    the engine loop (``bridge.run_async``). Returns how many row objects were built."""
    from async_prefetch.execution.pools import get_pool

    pool = await get_pool(plan.alias)
    objects = 0
    for stage in plan.stages:
        fetched = await asyncio.gather(*(_fetch_statement(pool, s) for s in stage))
        for statement, (names, rows) in zip(stage, fetched, strict=True):
            objects += _build(statement, names, rows)
    return objects


async def time_statement(alias: str, statement: Statement) -> float:
    """Seconds to fetch one statement's rows on the engine's pool (engine loop only)."""
    from async_prefetch.execution.pools import get_pool

    pool = await get_pool(alias)
    started = time.perf_counter()
    await _fetch_statement(pool, statement)
    return time.perf_counter() - started


# -- the sides ------------------------------------------------------------------------------


Timed: TypeAlias = "tuple[float, list[Model] | int]"


def _django_sync(workload: Any, alias: str) -> Timed:
    queryset = workload.queryset(alias)
    started = time.perf_counter()
    objects = list(queryset)
    return time.perf_counter() - started, objects


async def _django_async(queryset: Any) -> Timed:
    started = time.perf_counter()
    objects = [obj async for obj in queryset]
    return time.perf_counter() - started, objects


async def _engine(root: Any, lookups: list[Any]) -> Timed:
    from async_prefetch import aprefetch

    started = time.perf_counter()
    objects = await aprefetch(root, *lookups)
    return time.perf_counter() - started, objects


async def _engine_traced(root: Any, lookups: list[Any]) -> tuple[list[Model], Any]:
    from async_prefetch import aprefetch, tracing

    with tracing() as trace:
        objects = await aprefetch(root, *lookups)
    return objects, trace


async def _floor(plan: FloorPlan) -> Timed:
    from async_prefetch.runtime import bridge

    started = time.perf_counter()
    objects = await bridge.run_async(run_floor, plan)
    return time.perf_counter() - started, objects


# -- one workload at one RTT --------------------------------------------------------------


@dataclass
class Result:
    """Medians (ms) of one workload at one RTT, with the raw samples and the checks."""

    workload: str
    rtt_ms: float
    alias: str
    runs: int
    kind: str = "prefetch"
    """``prefetch`` (the sides of :data:`SIDES`) or ``stream`` (those of
    :data:`async_prefetch.devtools.bench.stream.SIDES`)."""
    roots: int = 0
    django_queries: int = 0
    engine_queries: int = 0
    engine_objects: int = 0
    floor_objects: int | None = None
    slowest_query_ms: float | None = None
    median_ms: dict[str, float] = field(default_factory=dict)
    samples_ms: dict[str, list[float]] = field(default_factory=dict)
    gc_median_ms: dict[str, float] = field(default_factory=dict)
    gc_samples_ms: dict[str, list[float]] = field(default_factory=dict)
    floor_note: str | None = None
    error: str | None = None

    @property
    def speedup(self) -> float | None:
        """Django's median over the engine's: ``django_sync`` (``django_iterator`` for a
        stream) over ``engine``."""
        return self.ratio("django_iterator" if self.kind == "stream" else "django_sync", "engine")

    def ratio(self, slower: str, faster: str) -> float | None:
        """Side ``slower``'s median over side ``faster``'s (``None`` if either is missing)."""
        a, b = self.median_ms.get(slower), self.median_ms.get(faster)
        return a / b if a and b else None

    @property
    def engine_over_floor(self) -> float | None:
        engine, floor = self.median_ms.get("engine"), self.median_ms.get("floor")
        return engine / floor if engine and floor else None


class CollectorClock:
    """Wall time the cyclic garbage collector runs while this is entered, on any thread
    (``gc.callbacks``; a collection holds the GIL, so nothing else runs meanwhile): in all
    (``seconds``) and per generation (``collections``: generation -> runs, seconds)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections: dict[int, tuple[int, float]] = {}
        self._started: float | None = None

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            took = time.perf_counter() - self._started
            self.seconds += took
            count, total = self.collections.get(info["generation"], (0, 0.0))
            self.collections[info["generation"]] = (count + 1, total + took)
            self._started = None

    def __enter__(self) -> CollectorClock:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc_info: object) -> None:
        gc.callbacks.remove(self._callback)


def _check(workload: Any, reference: list[Any], side: str, run: str, objects: Any) -> None:
    from async_prefetch.devtools.signature import LazyQueryError, describe_difference

    try:
        got = workload.signature(objects)
    except LazyQueryError as exc:
        raise ResultMismatchError(f"{workload.name}: {side} ({run}): {exc}") from exc
    if got != reference:
        raise ResultMismatchError(
            f"{workload.name}: {side} ({run}) differs from Django's prefetch_related:\n"
            + describe_difference(reference, got)
        )


def bench_workload(
    workload: Any,
    rtt_ms: float,
    runs: int,
    runner: asyncio.Runner,
    result: Result,
    *,
    collect_garbage: bool = True,
) -> None:
    """Warm up, check and time the four sides of ``workload`` on ``rtt_ms``'s alias, filling
    ``result``. Raises :class:`ResultMismatchError` when a side's result differs."""
    from async_prefetch.runtime import bridge

    alias = result.alias
    # Warm-up: connections, pools, caches; the reference result; the engine's SQL.
    with CaptureQueriesContext(connections[alias]) as captured:
        _, objects = _django_sync(workload, alias)
    result.django_queries = len(captured.captured_queries)
    assert isinstance(objects, list)
    result.roots = len(objects)
    reference = workload.signature(objects)
    del objects
    _, objects = runner.run(_django_async(workload.queryset(alias)))
    _check(workload, reference, "django_async", "warm-up", objects)
    objects, trace = runner.run(_engine_traced(workload.root(alias), workload.lookups()))
    _check(workload, reference, "engine", "traced warm-up", objects)
    del objects
    result.engine_queries = trace.queries
    result.engine_objects = sum(s.objects for s in trace.steps if s.kind == "query")
    plan: FloorPlan | None = None
    try:
        plan = floor_plan(alias, trace.steps)
    except FloorUnavailableError as exc:
        result.floor_note = str(exc)
        logger.warning("%s @ %s: no floor: %s", workload.name, alias, exc)
    if plan is not None:
        _, floor_objects = runner.run(_floor(plan))
        assert isinstance(floor_objects, int)
        result.floor_objects = floor_objects
        if result.floor_objects != result.engine_objects:
            result.floor_note = (
                f"floor built {result.floor_objects} rows, the engine {result.engine_objects}"
            )
        result.slowest_query_ms = 1000 * max(
            min(bridge.run_sync(time_statement, alias, s) for _ in range(3))
            for s in plan.statements
        )

    measures: dict[str, Callable[[], Timed]] = {
        "django_sync": lambda: _django_sync(workload, alias),
        "django_async": lambda: runner.run(_django_async(workload.queryset(alias))),
        "engine": lambda: runner.run(_engine(workload.root(alias), workload.lookups())),
    }
    if plan is not None:
        floor_plan_ = plan
        measures["floor"] = lambda: runner.run(_floor(floor_plan_))
    sides = [side for side in SIDES if side in measures]
    samples: dict[str, list[float]] = {side: [] for side in sides}
    collector: dict[str, list[float]] = {side: [] for side in sides}
    for run in range(runs):
        order = sides[run % len(sides) :] + sides[: run % len(sides)]
        for side in order:
            gc.collect()
            if not collect_garbage:
                gc.disable()
            try:
                with CollectorClock() as clock:
                    seconds, objects = measures[side]()
            finally:
                gc.enable()
            if side != "floor":
                _check(workload, reference, side, f"run {run + 1}", objects)
            samples[side].append(seconds * 1000)
            collector[side].append(clock.seconds * 1000)
            del objects
    result.samples_ms = samples
    result.median_ms = {side: statistics.median(values) for side, values in samples.items()}
    result.gc_samples_ms = collector
    result.gc_median_ms = {side: statistics.median(values) for side, values in collector.items()}


def bench_stream(
    workload: StreamWorkload,
    runs: int,
    runner: asyncio.Runner,
    result: Result,
    *,
    collect_garbage: bool = True,
) -> None:
    """Warm up, check and time the sides of the ``stream`` workload on ``result.alias``,
    filling ``result``: Django's iterator gives the reference digest, every other side's
    warm-up and every side's every timed run must give the same one. Raises
    :class:`ResultMismatchError` when a side's digest differs."""
    from async_prefetch import tracing
    from async_prefetch.devtools.bench import stream

    alias = result.alias

    def check(side: str, run: str, digest: stream.Digest) -> None:
        difference = reference.difference(digest, workload.chunk_size)
        if difference is not None:
            raise ResultMismatchError(
                f"{workload.name}: {side} ({run}) differs from Django's iterator: {difference}"
            )

    with CaptureQueriesContext(connections[alias]) as captured:
        _, reference = workload.timed("django_iterator", alias, runner)
    result.django_queries = len(captured.captured_queries)
    result.roots = reference.books
    if reference.books != workload.books:
        raise ResultMismatchError(f"{workload.name}: {reference.books} books, not {workload.books}")
    for side in stream.SIDES[1:]:
        with tracing() as trace:
            _, digest = workload.timed(side, alias, runner)
        check(side, "warm-up", digest)
        if side == "engine":
            result.engine_queries = trace.queries
    sides = list(stream.SIDES)
    samples: dict[str, list[float]] = {side: [] for side in sides}
    collector: dict[str, list[float]] = {side: [] for side in sides}
    for run in range(runs):
        order = sides[run % len(sides) :] + sides[: run % len(sides)]
        for side in order:
            gc.collect()
            if not collect_garbage:
                gc.disable()
            try:
                with CollectorClock() as clock:
                    seconds, digest = workload.timed(side, alias, runner)
            finally:
                gc.enable()
            check(side, f"run {run + 1}", digest)
            samples[side].append(seconds * 1000)
            collector[side].append(clock.seconds * 1000)
    result.samples_ms = samples
    result.median_ms = {side: statistics.median(values) for side, values in samples.items()}
    result.gc_samples_ms = collector
    result.gc_median_ms = {side: statistics.median(values) for side, values in collector.items()}


# -- peak memory ------------------------------------------------------------------------------


@dataclass
class Memory:
    """Peak resident memory of one side's first run in a fresh process, and of a second
    run in the same process, in KiB.

    ``baseline_kib`` is the resident size just before the first run (imports, Django
    set-up); the first run also pays for connecting (the engine: its pool and thread).
    ``second_peak_kib`` is the peak of the next run, once the first run's objects are
    collected: what a warm server process needs. ``method`` says how peaks were read
    (see :func:`_memory_child`).
    """

    workload: str
    side: str
    rtt_ms: float
    peak_kib: int
    baseline_kib: int
    second_peak_kib: int
    roots: int
    method: str


def _proc_status_kib(field_name: str) -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{field_name}:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) if found else None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _memory_child(spec: str, db: str, rtt_ms: float, quick: bool, books: int | None) -> int:
    """Subprocess body: two runs of one side, then print ``MEMORY {json}``.

    A peak is Linux's ``VmHWM``, reset to the current RSS just before each run when
    ``/proc/self/clear_refs`` allows it. ``ru_maxrss`` is only the fallback (no ``/proc``):
    Linux carries it over from the parent through fork and exec, so a child started by a
    large process reports the parent's peak (and the second run's is the process's).
    """
    from async_prefetch.devtools.bench import stream
    from async_prefetch.devtools.bench.workloads import build_workloads

    name, side = spec.split(":")
    host, port = db.rsplit(":", 1)
    alias = alias_for(rtt_ms)
    configure_django(get_server(), {alias: (host, int(port))})
    # Every side starts with the same modules loaded.
    import async_prefetch.api
    import async_prefetch.streaming  # noqa: F401

    if name == stream.NAME:
        if side not in stream.SIDES:
            raise ValueError(f"unknown side {side!r}")
        stream_workload = stream.build_stream(quick, books)
        return print_memory(
            memory_runs(name, side, rtt_ms, lambda: _stream_once(stream_workload, side, alias))
        )
    workload = build_workloads(quick)[name]
    if side not in ("django_sync", "engine"):
        raise ValueError(f"unknown side {side!r}")

    def run_once() -> int:
        """One run; the roots are dropped before return."""
        if side == "django_sync":
            _, objects = _django_sync(workload, alias)
        else:
            _, objects = asyncio.run(_engine(workload.root(alias), workload.lookups()))
        assert isinstance(objects, list)
        return len(objects)

    return print_memory(memory_runs(name, side, rtt_ms, run_once))


def _stream_once(workload: StreamWorkload, side: str, alias: str) -> int:
    """One run of a ``stream`` side; returns how many books it consumed."""
    with asyncio.Runner() as runner:
        _, digest = workload.timed(side, alias, runner)
    return digest.books


def memory_runs(name: str, side: str, rtt_ms: float, run_once: Callable[[], int]) -> Memory:
    """Peaks of two calls of ``run_once`` (which returns the roots it fetched and keeps
    nothing): the body of a memory child, which prints it with :func:`print_memory`."""
    gc.collect()
    reset = _reset_peak_rss()
    baseline = _proc_status_kib("VmRSS")
    if baseline is None:
        method = "ru_maxrss"
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    else:
        method = "VmHWM, reset before the run" if reset else "VmHWM"

    def measured() -> tuple[int, int]:
        """One run: the roots, and the peak since the last reset."""
        roots = run_once()
        peak = _proc_status_kib("VmHWM") if method != "ru_maxrss" else None
        return roots, (
            peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        )

    roots, peak = measured()
    gc.collect()
    _reset_peak_rss()
    _, second_peak = measured()
    return Memory(name, side, rtt_ms, peak, baseline, second_peak, roots, method)


def print_memory(memory: Memory) -> int:
    """A memory child's output (``MEMORY {json}``, read by :func:`memory_children`); its
    exit code."""
    print("MEMORY " + json.dumps(asdict(memory)), flush=True)
    return 0


def memory_children(
    server: ServerInfo, children: Sequence[tuple[str, str, list[str]]], *, timeout: float
) -> tuple[list[Memory], list[str]]:
    """Run each memory child (workload, side, command), one process each, on ``server``;
    the measurements and the errors of failed children."""
    env = child_env(server)
    found: list[Memory] = []
    errors: list[str] = []
    for name, side, command in children:
        payload, error = run_memory_child(command, env, timeout=timeout)
        if payload is None:
            errors.append(f"memory run {name}:{side} failed {error}")
            progress(errors[-1])
            continue
        found.append(Memory(**payload))
        progress(f"memory {name} {side}: {found[-1].peak_kib / 1024:.1f} MiB")
    return found, errors


def measure_memory(
    names: Sequence[str],
    server: ServerInfo,
    rtt_ms: float,
    proxy: tuple[str, int],
    quick: bool,
    books: int | None = None,
) -> tuple[list[Memory], list[str]]:
    """Peak memory of ``django_sync`` and ``engine`` per workload (every side of ``stream``,
    ``books`` books if given), one subprocess each, through the proxy of ``rtt_ms``. Returns
    the measurements and the errors of failed runs."""
    from async_prefetch.devtools.bench import stream

    children = [
        (
            name,
            side,
            [
                *(sys.executable, "-m", "async_prefetch", "bench", "--memory-child"),
                *(f"{name}:{side}", "--memory-db", f"{proxy[0]}:{proxy[1]}", "--rtts", str(rtt_ms)),
                *(["--quick"] if quick else []),
                *(["--books", str(books)] if books is not None else []),
            ],
        )
        for name in names
        for side in (stream.SIDES if name == stream.NAME else ("django_sync", "engine"))
    ]
    return memory_children(server, children, timeout=900)


def child_env(server: ServerInfo) -> dict[str, str]:
    """The environment of a bench child process: this process's, on ``server``
    (``DATABASE_URL``), with this checkout importable."""
    env = dict(os.environ)
    env["DATABASE_URL"] = server.url()
    env.pop(ENV_SOURCE, None)  # it would override DATABASE_URL
    root = str(Path(async_prefetch.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def run_memory_child(
    command: list[str], env: dict[str, str], *, timeout: float
) -> tuple[dict[str, Any] | None, str]:
    """Run a memory child; the fields of the ``MEMORY {json}`` line it printed, or
    ``None`` and what went wrong (exit code and the end of its stderr)."""
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("MEMORY ")), None)
    if done.returncode != 0 or line is None:
        return None, f"({done.returncode}):\n{done.stderr[-3000:]}"
    payload: dict[str, Any] = json.loads(line.removeprefix("MEMORY "))
    return payload, ""


# -- profile ----------------------------------------------------------------------------------


async def _enable(profiler: cProfile.Profile) -> None:
    profiler.enable()


async def _disable(profiler: cProfile.Profile) -> None:
    profiler.disable()


#: Before 3.12 a cProfile profiler sees the thread that enabled it; from 3.12 it uses
#: ``sys.monitoring``: one profiler at a time per process, seeing every thread.
PROFILER_PER_THREAD: Final = sys.version_info < (3, 12)


def profile_engine(workload: Any, alias: str, runs: int, out: Path, top: int = 25) -> None:
    """Profile ``runs`` engine runs of ``workload`` (after 3 warm-up runs) with cProfile; for
    ``stream``, its ``engine`` side (the synchronous :func:`async_prefetch.iterator`, the loop
    body included) after one warm-up run.

    Before Python 3.12: one profiler on the engine's loop thread, where the engine works,
    and one on the caller's thread (worker threads are not covered); prints the engine
    thread's ``top`` entries by cumulative time, then the caller's first 10, and saves
    ``out/profile-<workload>-{engine,caller}.prof``. From 3.12: one profiler for every
    thread, its ``top`` entries, saved as ``out/profile-<workload>-all.prof``; its
    ``tottime`` is right, but it keeps one call stack for all threads, so cumulative
    times and callers mix the engine's and the caller's calls.
    """
    from async_prefetch.runtime import bridge

    engine_profiler = cProfile.Profile() if PROFILER_PER_THREAD else None
    caller_profiler = cProfile.Profile()
    with asyncio.Runner() as runner:
        warm_ups = 1 if isinstance(workload, StreamWorkload) else 3

        def run_once() -> object:
            if isinstance(workload, StreamWorkload):
                return workload.timed("engine", alias, runner)
            return runner.run(_engine(workload.root(alias), workload.lookups()))

        for _ in range(warm_ups):
            run_once()
        if engine_profiler is not None:
            bridge.run_sync(_enable, engine_profiler)
        caller_profiler.enable()
        started = time.perf_counter()
        try:
            for _ in range(runs):
                run_once()
        finally:
            caller_profiler.disable()
            if engine_profiler is not None:
                bridge.run_sync(_disable, engine_profiler)
        seconds = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"{workload.name}: {runs} engine runs on {alias} in {seconds * 1000:.0f} ms "
        f"({seconds * 1000 / runs:.2f} ms each, with cProfile's overhead)"
    )
    reports = (
        [("engine", engine_profiler, top), ("caller", caller_profiler, 10)]
        if engine_profiler is not None
        else [("all", caller_profiler, top)]
    )
    for label, profiler, limit in reports:
        path = out / f"profile-{workload.name}-{label}.prof"
        stats = pstats.Stats(profiler, stream=sys.stdout)
        stats.dump_stats(path)
        title = f"{label} thread" if engine_profiler is not None else "all threads"
        print(f"\n== {title}, top {limit} by cumulative time (all stats: {path})")
        stats.sort_stats("cumulative").print_stats(limit)


# -- reports ----------------------------------------------------------------------------------


def machine_facts(server: ServerInfo) -> dict[str, Any]:
    """Platform, CPU count, versions (Python, Django, psycopg, PostgreSQL), date, git commit."""
    with connections["default"].cursor() as cursor:
        cursor.execute("SHOW server_version")
        row = cursor.fetchone()
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "django": django.get_version(),
        "psycopg": psycopg.__version__,
        "postgresql": row[0] if row else "unknown",
        "server_source": server.source,
        "git": commit,
    }


def fmt_ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def results_table(results: Sequence[Result]) -> str:
    """The markdown table of medians, one row per workload and RTT."""
    lines = [
        "| workload | RTT ms | runs | Django sync ms | Django async ms | engine ms | floor ms "
        "| speed-up vs Django sync | engine/floor | queries (Django/engine) | slowest query ms "
        "| GC ms (Django sync/engine) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        if r.kind != "prefetch":
            continue
        if r.error is not None:
            lines.append(f"| {r.workload} | {r.rtt_ms:g} | FAILED: see below |" + " |" * 9)
            continue
        m = r.median_ms
        lines.append(
            f"| {r.workload} | {r.rtt_ms:g} | {r.runs} | {fmt_ms(m.get('django_sync'))} "
            f"| {fmt_ms(m.get('django_async'))} | {fmt_ms(m.get('engine'))} "
            f"| {fmt_ms(m.get('floor'))} "
            f"| {fmt_ratio(r.speedup)} | {fmt_ratio(r.engine_over_floor)} "
            f"| {r.django_queries}/{r.engine_queries} | {fmt_ms(r.slowest_query_ms)} "
            f"| {fmt_ms(r.gc_median_ms.get('django_sync'))}"
            f"/{fmt_ms(r.gc_median_ms.get('engine'))} |"
        )
    return "\n".join(lines)


def memory_table(memory: Sequence[Memory]) -> str:
    """Markdown: peak RSS of Django sync and the engine per workload (MiB)."""
    by_workload: dict[str, dict[str, Memory]] = {}
    for m in memory:
        if m.workload != STREAM:
            by_workload.setdefault(m.workload, {})[m.side] = m
    lines = [
        "| workload | Django sync peak MiB | engine peak MiB | Django sync +MiB | engine +MiB "
        "| second run: Django sync peak MiB | second run: engine peak MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, sides in by_workload.items():
        django_m, engine_m = sides["django_sync"], sides["engine"]
        lines.append(
            f"| {name} | {django_m.peak_kib / 1024:.1f} | {engine_m.peak_kib / 1024:.1f} "
            f"| {(django_m.peak_kib - django_m.baseline_kib) / 1024:.1f} "
            f"| {(engine_m.peak_kib - engine_m.baseline_kib) / 1024:.1f} "
            f"| {django_m.second_peak_kib / 1024:.1f} | {engine_m.second_peak_kib / 1024:.1f} |"
        )
    return "\n".join(lines)


def stream_table(results: Sequence[Result]) -> str:
    """Markdown: the ``stream`` workload's medians per side and RTT (seconds), and ratios."""
    from async_prefetch.devtools.bench.stream import SIDES as STREAM_SIDES

    ratios = (
        ("django_iterator", "engine"),
        ("django_iterator", "engine_memo"),
        ("memoized_prefetch", "engine"),
        ("memoized_prefetch", "engine_memo"),
        ("engine", "floor"),
        ("engine_memo", "floor"),
    )
    lines = [
        "| RTT ms | runs | books | "
        + " | ".join(f"{side} s" for side in STREAM_SIDES)
        + " | "
        + " | ".join(f"{slower} / {faster}" for slower, faster in ratios)
        + " | queries (Django iterator/engine prefetch) |",
        "| " + " | ".join(["---:"] * (3 + len(STREAM_SIDES) + len(ratios) + 1)) + " |",
    ]
    for r in results:
        if r.kind != "stream":
            continue
        if r.error is not None:
            lines.append(f"| {r.rtt_ms:g} | FAILED: see below |")
            continue
        seconds = [f"{r.median_ms[side] / 1000:.2f}" for side in STREAM_SIDES]
        lines.append(
            f"| {r.rtt_ms:g} | {r.runs} | {r.roots} | "
            + " | ".join(seconds)
            + " | "
            + " | ".join(fmt_ratio(r.ratio(slower, faster)) for slower, faster in ratios)
            + f" | {r.django_queries}/{r.engine_queries} |"
        )
    return "\n".join(lines)


def stream_memory_table(memory: Sequence[Memory]) -> str:
    """Markdown: peak RSS of each ``stream`` side (MiB), first and second run."""
    lines = [
        "| side | peak MiB | +MiB | second run: peak MiB |",
        "| --- | ---: | ---: | ---: |",
    ]
    for m in memory:
        if m.workload == STREAM:
            lines.append(
                f"| {m.side} | {m.peak_kib / 1024:.1f} "
                f"| {(m.peak_kib - m.baseline_kib) / 1024:.1f} | {m.second_peak_kib / 1024:.1f} |"
            )
    return "\n".join(lines)


def markdown_report(
    report: dict[str, Any], results: Sequence[Result], memory: Sequence[Memory]
) -> str:
    """The full ``results.md``: machine facts, the medians table, memory, notes, failures."""
    facts = report["machine"]
    parts = [
        "# async_prefetch benchmark",
        "",
        f"- date: {facts['date']}; git {facts['git']}",
        f"- machine: {facts['cpu_count']} CPUs, {facts['platform']}; load average at the start "
        f"{facts['load_average']}",
        f"- Python {facts['python']}, Django {facts['django']}, psycopg {facts['psycopg']}, "
        f"PostgreSQL {facts['postgresql']} ({facts['server_source']})",
        f"- command: `{report['command']}` (wall time {report['wall_seconds']:.0f} s)",
        f"- engine pool: {POOL_SIZE} connections per alias (min = max)",
        "- cyclic garbage collector during timed runs: "
        + ("on (collected before each run)" if report["gc"] else "off (`--no-gc`)"),
        "",
        "Medians in ms of `runs` timed runs per side, sides alternating, after a warm-up run; "
        "RTT is what a latency proxy in its own process adds per round trip (RTT 0 still goes "
        "through the proxy). Speed-up = Django sync / engine. Floor = the engine's own SQL on "
        "its pool with raw psycopg, each depth's statements concurrent, a dict per row: a lower "
        "bound. Slowest query = the slowest single engine statement fetched alone (best of 3). "
        "GC = the median time the cyclic garbage collector ran during a side's timed run "
        "(included in its time; `gc.callbacks`).",
        "",
        results_table(results),
    ]
    if not any(r.kind == "prefetch" for r in results):
        del parts[-4:]  # the prefetch workloads' explanation and empty table
    if any(m.workload != STREAM for m in memory):
        parts += [
            "",
            "## Peak memory",
            "",
            f"Peak resident memory ({memory[0].method}) of the first run in a fresh process "
            f"per workload and side, at RTT {memory[0].rtt_ms:g} ms; +MiB is the growth over "
            "the resident size just before that run (after imports and Django set-up; the "
            "first run also connects: Django one connection, the engine its pool and thread). "
            "Second run: the peak of the next run in the same process, the first run's "
            "objects collected: what a warm server process needs.",
            "",
            memory_table(memory),
        ]
    if any(r.kind == "stream" for r in results):
        parts += [
            "",
            "## Stream",
            "",
            "Medians in seconds of streaming and consuming every book (the loop body reads each "
            "book's author, translator, publisher and categories once and sums and hashes their "
            "ids), sides alternating; every run's ids equal Django's iterator's. Memos are "
            "created inside each run.",
            "",
            stream_table(results),
        ]
        if any(m.workload == STREAM for m in memory):
            parts += [
                "",
                f"Peak resident memory of each side, in a fresh process, at RTT "
                f"{memory[0].rtt_ms:g} ms: the first run's peak, its growth over the resident "
                "size before it, and the next run's peak in the same process:",
                "",
                stream_memory_table(memory),
            ]
    parts += ["", "## Workloads", ""]
    parts += [f"- `{name}`: {description}" for name, description in report["workloads"].items()]
    notes = [f"- `{r.workload}` @ {r.rtt_ms:g} ms: {r.floor_note}" for r in results if r.floor_note]
    if notes:
        parts += ["", "## Floor notes", "", *notes]
    failures = [(f"`{r.workload}` @ {r.rtt_ms:g} ms", r.error) for r in results if r.error]
    failures += [("peak memory", error) for error in report.get("memory_errors", [])]
    if failures:
        parts += ["", "## FAILURES", ""]
        for title, error in failures:
            parts += [f"### {title}", "", "```", str(error), "```", ""]
    return "\n".join(parts) + "\n"


def plot_speedups(results: Sequence[Result], path: Path) -> None:
    """Speed-up (Django sync / engine) against RTT, one line per workload, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    names = list(dict.fromkeys(r.workload for r in results))
    for name in names:
        points = [(r.rtt_ms, r.speedup) for r in results if r.workload == name and r.speedup]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("added round-trip time (ms)")
    ax.set_ylabel("speed-up vs Django sync prefetch_related (x)")
    ax.set_title("async_prefetch: engine speed-up by network latency")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- main -------------------------------------------------------------------------------------


def shutdown_engine() -> None:
    from async_prefetch.runtime import bridge

    bridge.shutdown()


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m async_prefetch bench",
        description="Benchmark Django's prefetch_related against the async_prefetch engine.",
    )
    parser.add_argument(
        "--workloads",
        nargs="+",
        metavar="NAME",
        help="workloads to run (default: all); names may also be comma-separated",
    )
    parser.add_argument(
        "--rtts",
        nargs="+",
        type=float,
        metavar="MS",
        help="added round-trip times in ms (default: 0 1 5)",
    )
    parser.add_argument(
        "--runs",
        type=int,
        help=f"timed runs per side (default {DEFAULT_RUNS}, 3 for big/slow workloads, "
        f"{QUICK_RUNS} with --quick; engine runs with --profile: 20)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes and 2 runs: a smoke test (< 60 s)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench-results"), help="output folder (bench-results/)"
    )
    parser.add_argument(
        "--profile",
        metavar="WORKLOAD",
        help="profile the engine side of WORKLOAD (cProfile) at the first of --rtts (default 0) "
        "instead of benchmarking",
    )
    parser.add_argument(
        "--books",
        type=int,
        metavar="N",
        help="books in the stream workload (default 100000, 1000 with --quick)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument(
        "--no-gc",
        action="store_true",
        help="disable the cyclic garbage collector during each timed run (both sides): "
        "shows how much of a side's time the collector takes",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log server start-up")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--memory-db", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.rtts and any(rtt < 0 for rtt in args.rtts):
        parser.error("--rtts must be >= 0")
    if args.books is not None and args.books < 1:
        parser.error("--books must be at least 1")
    return args


def _selected(args: argparse.Namespace, available: Sequence[str]) -> list[str]:
    if args.profile:
        wanted = [args.profile]
    elif args.workloads:
        wanted = [n for item in args.workloads for n in item.split(",") if n]
    else:
        return list(available)
    unknown = [name for name in wanted if name not in available]
    if unknown:
        raise SystemExit(f"unknown workloads {unknown}; choose from {', '.join(available)}")
    return wanted


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (see the module docstring); returns the process exit code: 0, or 1
    when a side's result differed from Django's or a workload or memory run failed."""
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    if args.memory_child:
        rtt = (args.rtts or [0.0])[0]
        return _memory_child(args.memory_child, args.memory_db, rtt, args.quick, args.books)
    from async_prefetch.devtools.bench import stream
    from async_prefetch.devtools.bench.workloads import NAMES, build_workloads

    started = time.perf_counter()
    load_average = os.getloadavg() if hasattr(os, "getloadavg") else None
    names = _selected(args, (*NAMES, stream.NAME))
    rtts = list(dict.fromkeys(args.rtts or DEFAULT_RTTS))
    if args.profile:
        rtts = [(args.rtts or [0.0])[0]]
    with bench_database(rtts) as (server, proxies):
        progress(f"PostgreSQL from {server.source}")
        workloads: dict[str, Workload | StreamWorkload] = {
            **build_workloads(args.quick),
            stream.NAME: stream.build_stream(args.quick, args.books),
        }
        for seed in dict.fromkeys(workloads[name].seed for name in names):
            seeded = time.perf_counter()
            if seed():
                progress(f"seeded in {time.perf_counter() - seeded:.1f} s")
        if args.profile:
            runs = args.runs or (3 if args.profile == stream.NAME else 20)
            profile_engine(workloads[args.profile], alias_for(rtts[0]), runs, args.out)
            return 0
        results: list[Result] = []
        with asyncio.Runner() as runner:
            for name in names:
                workload = workloads[name]
                runs = args.runs or (QUICK_RUNS if args.quick else workload.runs or DEFAULT_RUNS)
                for rtt in rtts:
                    result = Result(name, rtt, alias_for(rtt), runs)
                    results.append(result)
                    try:
                        if isinstance(workload, StreamWorkload):
                            result.kind = "stream"
                            bench_stream(
                                workload, runs, runner, result, collect_garbage=not args.no_gc
                            )
                        else:
                            bench_workload(
                                workload, rtt, runs, runner, result, collect_garbage=not args.no_gc
                            )
                    except ResultMismatchError as exc:
                        result.error = str(exc)
                        progress(f"\nRESULT MISMATCH in {name} at RTT {rtt:g} ms:\n{exc}\n")
                        break  # the other RTTs would only repeat it
                    except Exception:
                        result.error = traceback.format_exc()
                        progress(f"\nFAILED: {name} at RTT {rtt:g} ms:\n{result.error}")
                        break
                    m = result.median_ms
                    progress(
                        f"{name} @ {rtt:g} ms: "
                        + ", ".join(f"{side} {fmt_ms(ms)}" for side, ms in m.items())
                        + f" ms ({fmt_ratio(result.speedup)})"
                    )
        memory: list[Memory] = []
        memory_errors: list[str] = []
        if not args.no_memory:
            low = min(rtts)
            memory, memory_errors = measure_memory(
                names, server, low, proxies[alias_for(low)], args.quick, args.books
            )
        report: dict[str, Any] = {
            "machine": {**machine_facts(server), "load_average": load_average},
            "command": " ".join(["python -m async_prefetch bench", *(argv or sys.argv[2:])]),
            "gc": not args.no_gc,
            "wall_seconds": time.perf_counter() - started,
            "workloads": {name: workloads[name].description for name in names},
            "ok": all(r.error is None for r in results) and not memory_errors,
            "results": [
                {**asdict(r), "speedup": r.speedup, "engine_over_floor": r.engine_over_floor}
                for r in results
            ],
            "memory": [asdict(m) for m in memory],
            "memory_errors": memory_errors,
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = markdown_report(report, results, memory)
    (args.out / "results.md").write_text(markdown)
    plot_speedups(results, args.out / "speedup.png")
    tables = []
    if any(r.kind == "prefetch" for r in results):
        tables.append(results_table(results))
    if any(m.workload != STREAM for m in memory):
        tables.append(memory_table(memory))
    if any(r.kind == "stream" for r in results):
        tables.append(stream_table(results))
    if any(m.workload == STREAM for m in memory):
        tables.append(stream_memory_table(memory))
    print("\n\n".join(tables))
    print(
        f"\nWrote {args.out}/results.md, results.json and speedup.png "
        f"({report['wall_seconds']:.0f} s)"
    )
    if not report["ok"]:
        print("\nFAILED (result mismatch or error): see FAILURES in results.md", file=sys.stderr)
        return 1
    return 0
