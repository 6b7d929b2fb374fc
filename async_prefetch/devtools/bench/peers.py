"""``python -m async_prefetch.devtools.bench.peers``: the engine beside Django and the peer ORMs.

One process, one PostgreSQL (started or found with
:func:`async_prefetch.devtools.embedded.get_server`), one
:class:`~async_prefetch.devtools.latency_proxy.LatencyProxyProcess` per round-trip time, every
side connecting through it: Django on the alias ``rtt0``/``rtt1``/``rtt5``, the peers on the
same proxy port. The bench's own tables and rows (:mod:`async_prefetch.devtools.bench.workloads`,
seeded as ``python -m async_prefetch bench`` seeds them) are read by every side, mapped for the
peers in :mod:`async_prefetch.devtools.bench.peer_models`. The sides (:data:`SIDES`; a peer's
sides are left out when its package is missing):

* ``django_sync``: ``list(root.prefetch_related(*lookups))``;
* ``engine``: ``await aprefetch(root, *lookups)`` (its pool: :data:`POOL_SIZE` connections);
* ``floor`` (the fan-outs only, :data:`FLOOR_WORKLOADS`): the cheapest path to the state
  Django's ``prefetch_related`` leaves, on the engine's pool and thread
  (:mod:`async_prefetch.devtools.bench.peer_floor`): the same queries inside the timed
  region, each instance, reverse link and cached queryset built directly; its objects are
  checked against Django's on the warm-up run (:func:`check_floor`);
* ``tortoise_asyncpg``: Tortoise ORM's ``prefetch_related`` (which runs sibling prefetches
  with ``asyncio.gather``) on asyncpg, its default PostgreSQL driver, pool of
  :data:`POOL_SIZE`. (Tortoise builds a model's SQL for the placeholders of its app's
  default connection, at init, on the model class: a second Tortoise client on psycopg in
  the same process would send ``$1`` placeholders to psycopg, so there is no
  ``tortoise_psycopg`` side.)
* ``sqla_selectin_psycopg`` / ``sqla_selectin_asyncpg``: SQLAlchemy 2 async, one
  ``AsyncSession``, ``selectinload`` per relation (SQLAlchemy runs them one after another);
* ``sqla_gather_psycopg`` / ``sqla_gather_asyncpg``: SQLAlchemy 2 async, hand-rolled: the root
  in one session, then each relation's ``IN`` query in its own ``AsyncSession`` under
  ``asyncio.gather`` (a relation's own nested relation after it, in its session), the groups
  set with ``set_committed_value``; pools of :data:`POOL_SIZE`, no overflow.

The timed region of every side ends after reading every prefetched relation of every parent
once (as a serializer would) into a :data:`Shape` of primary keys; every run's shape must equal
Django's warm-up run's (the many-to-many compared as a set, having no order), else the run
fails with :class:`ResultMismatchError`. Sides alternate run by run, the starting side
rotating; a garbage collection precedes each run and the collector's time inside it is
recorded. After the timed runs at the first RTT, each side runs once more to count the objects
tracked by the collector that its result keeps alive, per root and by type
(:func:`objects_left`). One RTT's pools are open at a time (opened before its workloads,
closed after, the engine's with them): the server's ``max_connections`` is 100.

``--memory also|only`` adds (or only takes) each side's peak resident memory, one fresh
subprocess per workload and side (:func:`measure_memory`). ``--profile`` instead profiles the
engine side of one workload (:func:`profile_engine`: the collector's share, fetch and read
timed apart, objects left alive per side, cProfile with own time summed by where it goes).
Reports: ``peers.md`` and ``peers.json`` (``peers-memory.md`` with ``--memory only``,
``peers-profile-<workload>.md`` and ``.prof`` files with ``--profile``) in ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import datetime
import functools
import gc
import importlib.util
import json
import os
import platform
import pstats
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from django.core.management import call_command

from async_prefetch.devtools.bench.runner import (
    POOL_SIZE,
    CollectorClock,
    Memory,
    alias_for,
    configure_django,
    fmt_ms,
    fmt_ratio,
    memory_children,
    memory_runs,
    print_memory,
    progress,
    proxied,
)
from async_prefetch.devtools.bench.workloads import build_workloads
from async_prefetch.devtools.embedded import ServerInfo, get_server

if TYPE_CHECKING:
    from async_prefetch.devtools.bench.peer_floor import FanoutFloor
    from async_prefetch.devtools.bench.workloads import Workload

BENCH_APP: Final = "async_prefetch.devtools.bench"
WORKLOADS: Final = ("fanout-100", "chain", "fanout-1000")
DEFAULT_RTTS: Final = (0.0, 1.0, 5.0)
DEFAULT_RUNS: Final = 11
SIDES: Final = (
    "django_sync",
    "engine",
    "floor",
    "tortoise_asyncpg",
    "sqla_selectin_psycopg",
    "sqla_selectin_asyncpg",
    "sqla_gather_psycopg",
    "sqla_gather_asyncpg",
)
PEER_SIDES: Final = SIDES[3:]
FLOOR_WORKLOADS: Final = ("fanout-100", "fanout-1000")
CHILD_NAMES: Final = tuple(f"c{k}" for k in range(10))

Shape: TypeAlias = list[tuple[Any, ...]]
"""What a run read: per root, its pk and the pks of every prefetched relation, in order."""
Timed: TypeAlias = tuple[float, Shape]


RETAIN: list[Any] | None = None
"""When a list, every side appends the root objects it fetched (for :func:`count_objects`)."""


def _retain(objects: Any) -> None:
    if RETAIN is not None:
        RETAIN.append(objects)


class ResultMismatchError(AssertionError):
    """A side read other primary keys (or in another order) than Django's prefetch_related."""


def available_sides() -> list[str]:
    """:data:`SIDES` whose packages are installed (Tortoise ORM; SQLAlchemy with greenlet;
    psycopg is always there, asyncpg may not be)."""
    have = {name: importlib.util.find_spec(name) is not None for name in ("tortoise", "asyncpg")}
    have["sqlalchemy"] = all(importlib.util.find_spec(n) for n in ("sqlalchemy", "greenlet"))
    sides = ["django_sync", "engine", "floor"]
    for side in PEER_SIDES:
        package = "tortoise" if side.startswith("tortoise") else "sqlalchemy"
        if not have[package] or (side.endswith("asyncpg") and not have["asyncpg"]):
            continue
        if package == "tortoise" and not have["sqlalchemy"]:
            continue  # peer_models maps both
        if package == "sqlalchemy" and not have["tortoise"]:
            continue
        sides.append(side)
    return sides


# -- Django set-up ----------------------------------------------------------------------------


def prepare(names: Sequence[str], quick: bool) -> dict[str, Workload]:
    """Create the tables and seed ``names``' rows (idempotent); the workloads by name."""
    workloads = build_workloads(quick)
    call_command("migrate", run_syncdb=True, verbosity=0)
    for seed in dict.fromkeys(workloads[name].seed for name in names):
        seed()
    return {name: workloads[name] for name in names}


# -- reading what was fetched (inside every timed region) -------------------------------------


def read_fanout_django(parents: Sequence[Any]) -> Shape:
    """Every ``c0`` .. ``c9`` of every parent, through the managers' ``all()``."""
    return [
        (p.pk, tuple(tuple(c.pk for c in getattr(p, name).all()) for name in CHILD_NAMES))
        for p in parents
    ]


def read_fanout_peer(parents: Sequence[Any]) -> Shape:
    """Every ``c0`` .. ``c9`` of every parent, iterating the peer's relation containers."""
    return [
        (p.id, tuple(tuple(c.id for c in getattr(p, name)) for name in CHILD_NAMES))
        for p in parents
    ]


def read_chain_django(books: Sequence[Any]) -> Shape:
    """Every book's authors with each author's location, and its pages."""
    return [
        (
            b.pk,
            tuple((a.pk, None if a.location is None else a.location.pk) for a in b.authors.all()),
            tuple(p.pk for p in b.pages.all()),
        )
        for b in books
    ]


def read_chain_peer(books: Sequence[Any]) -> Shape:
    """:func:`read_chain_django` over a peer's objects."""
    return [
        (
            b.id,
            tuple((a.id, None if a.location is None else a.location.id) for a in b.authors),
            tuple(p.id for p in b.pages),
        )
        for b in books
    ]


def normalized(workload: str, shape: Shape) -> Shape:
    """``shape`` with what has no defined order (the chain's authors) sorted."""
    if workload != "chain":
        return shape
    return [(pk, tuple(sorted(authors)), pages) for pk, authors, pages in shape]


def difference(expected: Shape, got: Shape) -> str:
    """Where two normalized shapes first differ (a short account)."""
    if len(expected) != len(got):
        return f"{len(expected)} roots expected, {len(got)} read"
    for index, (want, have) in enumerate(zip(expected, got, strict=True)):
        if want != have:
            return (
                f"first difference at root #{index}:\n"
                f"  expected {want!r:.400}\n  read {have!r:.400}"
            )
    return "equal"


# -- the sides --------------------------------------------------------------------------------


def _is_chain(workload: Workload) -> bool:
    return workload.name == "chain"


def django_sync(workload: Workload, alias: str) -> Timed:
    """Django's ``prefetch_related`` and the read."""
    queryset = workload.queryset(alias)
    read = read_chain_django if _is_chain(workload) else read_fanout_django
    started = time.perf_counter()
    shape = read(objects := list(queryset))
    seconds = time.perf_counter() - started
    _retain(objects)
    return seconds, shape


async def engine(workload: Workload, alias: str) -> Timed:
    """``aprefetch`` and the read."""
    from async_prefetch import aprefetch

    root, lookups = workload.root(alias), workload.lookups()
    read = read_chain_django if _is_chain(workload) else read_fanout_django
    started = time.perf_counter()
    shape = read(objects := await aprefetch(root, *lookups))
    seconds = time.perf_counter() - started
    _retain(objects)
    return seconds, shape


async def floor_side(floor: FanoutFloor) -> Timed:
    """The floor's fetch and build on the engine's thread (``bridge.run_async``), and the
    read."""
    from async_prefetch.runtime import bridge

    started = time.perf_counter()
    shape = read_fanout_django(objects := await bridge.run_async(floor.run))
    seconds = time.perf_counter() - started
    _retain(objects)
    return seconds, shape


def prepare_floor(workload: Workload, alias: str) -> FanoutFloor:
    """The floor of a fan-out workload (:data:`FLOOR_WORKLOADS`) on ``alias``."""
    from async_prefetch.devtools.bench.peer_floor import fanout_floor

    return fanout_floor(workload.root(alias), [str(name) for name in workload.lookups()], alias)


def check_floor(workload: Workload, alias: str, floor: FanoutFloor, runner: asyncio.Runner) -> None:
    """Raise :class:`ResultMismatchError` unless one floor run leaves what Django's
    ``prefetch_related`` leaves (see
    :func:`~async_prefetch.devtools.bench.peer_floor.check_same_state`)."""
    from async_prefetch.devtools.bench.peer_floor import check_same_state
    from async_prefetch.runtime import bridge

    ours = runner.run(bridge.run_async(floor.run))
    django = list(workload.queryset(alias))
    problem = check_same_state(ours, django, [str(name) for name in workload.lookups()])
    if problem:
        raise ResultMismatchError(
            f"{workload.name}: the floor's objects differ from Django's: {problem}"
        )


def workload_sides(workload: Workload, sides: Sequence[str]) -> list[str]:
    """``sides`` that ``workload`` has (no ``floor`` outside :data:`FLOOR_WORKLOADS`)."""
    return [s for s in sides if s != "floor" or workload.name in FLOOR_WORKLOADS]


@dataclass
class Peers:
    """The peers' connections for one RTT: a Tortoise client per driver, SQLAlchemy async
    engines and session factories per driver (only the installed ones)."""

    tortoise: dict[str, Any] = field(default_factory=dict)
    sqla_sessions: dict[str, Any] = field(default_factory=dict)
    sqla_engines: dict[str, Any] = field(default_factory=dict)


async def open_peers(
    server: ServerInfo, proxies: dict[str, tuple[str, int]], sides: Sequence[str]
) -> dict[str, Peers]:
    """Connection settings (pools open lazily, on the warm-up run) of every peer side in
    ``sides``, per alias of ``proxies``; must run on the loop that runs the sides."""
    peers = {alias: Peers() for alias in proxies}
    drivers = {side.rsplit("_", 1)[1] for side in sides if side.startswith("tortoise")}
    if drivers:
        from tortoise import Tortoise, connections

        credentials = {"user": server.user, "password": server.password, "database": server.dbname}
        engines = {"asyncpg": "tortoise.backends.asyncpg"}
        config: dict[str, Any] = {"connections": {}, "apps": {}}
        for alias, (host, port) in proxies.items():
            for driver in sorted(drivers):
                config["connections"][f"{driver}_{alias}"] = {
                    "engine": engines[driver],
                    "credentials": {
                        **credentials,
                        "host": host,
                        "port": port,
                        "minsize": POOL_SIZE,
                        "maxsize": POOL_SIZE,
                    },
                }
        config["apps"]["models"] = {
            "models": ["async_prefetch.devtools.bench.peer_models"],
            "default_connection": next(iter(config["connections"])),
        }
        await Tortoise.init(config=config)
        for alias in proxies:
            for driver in drivers:
                peers[alias].tortoise[driver] = connections.get(f"{driver}_{alias}")
    sqla_drivers = {side.rsplit("_", 1)[1] for side in sides if side.startswith("sqla")}
    if sqla_drivers:
        from sqlalchemy import URL
        from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

        for alias, (host, port) in proxies.items():
            for driver in sorted(sqla_drivers):
                url = URL.create(
                    f"postgresql+{driver}",
                    username=server.user,
                    password=server.password or None,
                    host=host,
                    port=port,
                    database=server.dbname,
                )
                sqla_engine = create_async_engine(url, pool_size=POOL_SIZE, max_overflow=0)
                peers[alias].sqla_engines[driver] = sqla_engine
                peers[alias].sqla_sessions[driver] = async_sessionmaker(
                    sqla_engine, expire_on_commit=False
                )
    return peers


async def close_peers(peers: dict[str, Peers]) -> None:
    """Close every peer pool opened by :func:`open_peers`."""
    if any(p.tortoise for p in peers.values()):
        from tortoise import Tortoise

        await Tortoise.close_connections()
    for p in peers.values():
        for sqla_engine in p.sqla_engines.values():
            await sqla_engine.dispose()


async def tortoise_side(workload: Workload, n: int, db: Any) -> Timed:
    """Tortoise ORM's ``prefetch_related`` on client ``db`` and the read."""
    started = time.perf_counter()
    objects = await tortoise_fetch(workload, n, db)
    shape = (read_chain_peer if _is_chain(workload) else read_fanout_peer)(objects)
    _retain(objects)
    return time.perf_counter() - started, shape


async def tortoise_fetch(workload: Workload, n: int, db: Any) -> list[Any]:
    """Tortoise ORM's ``prefetch_related`` of ``workload`` on client ``db`` (not read)."""
    from async_prefetch.devtools.bench.peer_models import TBook, TParent

    if _is_chain(workload):
        return list(
            await TBook.all()
            .using_db(db)
            .order_by("id")
            .limit(n)
            .prefetch_related("authors__location", "pages")
        )
    return list(
        await TParent.filter(batch="fanout", seq__lt=n)
        .using_db(db)
        .order_by("seq")
        .prefetch_related(*CHILD_NAMES)
    )


async def sqla_selectin(workload: Workload, n: int, sessions: Any) -> Timed:
    """SQLAlchemy 2 async, one session, ``selectinload`` per relation, and the read."""
    from sqlalchemy import select
    from sqlalchemy.orm import selectinload

    from async_prefetch.devtools.bench.peer_models import SAuthor, SBook, SParent

    started = time.perf_counter()
    async with sessions() as session:
        if _is_chain(workload):
            books = (
                select(SBook)
                .order_by(SBook.id)
                .limit(n)
                .options(
                    selectinload(SBook.authors).selectinload(SAuthor.location),
                    selectinload(SBook.pages),
                )
            )
            shape = read_chain_peer(found := (await session.scalars(books)).all())
        else:
            parents = (
                select(SParent)
                .where(SParent.batch == "fanout", SParent.seq < n)
                .order_by(SParent.seq)
                .options(*(selectinload(getattr(SParent, name)) for name in CHILD_NAMES))
            )
            shape = read_fanout_peer(found := (await session.scalars(parents)).all())
    _retain(found)
    return time.perf_counter() - started, shape


async def sqla_gather(workload: Workload, n: int, sessions: Any) -> Timed:
    """SQLAlchemy 2 async, hand-rolled: the root in one session, each relation in its own
    session under ``asyncio.gather``, groups set with ``set_committed_value``; and the read."""
    started = time.perf_counter()
    if _is_chain(workload):
        shape = read_chain_peer(roots := await _sqla_gather_chain(n, sessions))
    else:
        shape = read_fanout_peer(roots := await _sqla_gather_fanout(n, sessions))
    _retain(roots)
    return time.perf_counter() - started, shape


async def _sqla_gather_fanout(n: int, sessions: Any) -> list[Any]:
    from sqlalchemy import select
    from sqlalchemy.orm.attributes import set_committed_value

    from async_prefetch.devtools.bench.peer_models import S_CHILDREN, SParent

    async with sessions() as session:
        statement = (
            select(SParent).where(SParent.batch == "fanout", SParent.seq < n).order_by(SParent.seq)
        )
        parents: list[Any] = list((await session.scalars(statement)).all())
    ids = [p.id for p in parents]

    async def relation(k: int) -> None:
        model: Any = S_CHILDREN[k]
        async with sessions() as session:
            statement = select(model).where(model.parent_id.in_(ids)).order_by(model.id)
            rows = (await session.scalars(statement)).all()
        groups: dict[int, list[Any]] = {}
        for row in rows:
            groups.setdefault(row.parent_id, []).append(row)
        name = CHILD_NAMES[k]
        for parent in parents:
            set_committed_value(parent, name, groups.get(parent.id, []))

    await asyncio.gather(*(relation(k) for k in range(len(CHILD_NAMES))))
    return parents


async def _sqla_gather_chain(n: int, sessions: Any) -> list[Any]:
    from sqlalchemy import select
    from sqlalchemy.orm.attributes import set_committed_value

    from async_prefetch.devtools.bench.peer_models import (
        SAuthor,
        SBook,
        SLocation,
        SPage,
        book_authors,
    )

    async with sessions() as session:
        books: list[Any] = list(
            (await session.scalars(select(SBook).order_by(SBook.id).limit(n))).all()
        )
    ids = [b.id for b in books]

    async def authors_then_locations() -> None:
        async with sessions() as session:
            statement = (
                select(book_authors.c.book_id, SAuthor)
                .join(book_authors, book_authors.c.author_id == SAuthor.id)
                .where(book_authors.c.book_id.in_(ids))
            )
            pairs = (await session.execute(statement)).all()
            location_ids = {a.location_id for _, a in pairs if a.location_id is not None}
            locations: dict[int, Any] = {}
            if location_ids:
                found = await session.scalars(
                    select(SLocation).where(SLocation.id.in_(location_ids))
                )
                locations = {location.id: location for location in found}
        groups: dict[int, list[Any]] = {}
        for book_id, author in pairs:
            groups.setdefault(book_id, []).append(author)
            set_committed_value(author, "location", locations.get(author.location_id))
        for book in books:
            set_committed_value(book, "authors", groups.get(book.id, []))

    async def pages() -> None:
        async with sessions() as session:
            statement = select(SPage).where(SPage.book_id.in_(ids)).order_by(SPage.number)
            rows = (await session.scalars(statement)).all()
        groups: dict[int, list[Any]] = {}
        for page in rows:
            groups.setdefault(page.book_id, []).append(page)
        for book in books:
            set_committed_value(book, "pages", groups.get(book.id, []))

    await asyncio.gather(authors_then_locations(), pages())
    return books


def measures(
    workload: Workload,
    alias: str,
    n: int,
    peers: Peers,
    sides: Sequence[str],
    runner: asyncio.Runner,
) -> dict[str, Callable[[], Timed]]:
    """One timed call per side of ``sides`` that ``workload`` has (:func:`workload_sides`),
    on ``alias``'s proxy."""

    def run_async(make: Callable[[], Coroutine[Any, Any, Timed]]) -> Callable[[], Timed]:
        return lambda: runner.run(make())

    table: dict[str, Callable[[], Timed]] = {}
    for side in workload_sides(workload, sides):
        if side == "django_sync":
            table[side] = functools.partial(django_sync, workload, alias)
        elif side == "engine":
            table[side] = run_async(functools.partial(engine, workload, alias))
        elif side == "floor":
            table[side] = run_async(functools.partial(floor_side, prepare_floor(workload, alias)))
        else:
            driver = side.rsplit("_", 1)[1]
            if side.startswith("tortoise"):
                call = functools.partial(tortoise_side, workload, n, peers.tortoise[driver])
            elif side.startswith("sqla_selectin"):
                call = functools.partial(sqla_selectin, workload, n, peers.sqla_sessions[driver])
            else:
                call = functools.partial(sqla_gather, workload, n, peers.sqla_sessions[driver])
            table[side] = run_async(call)
    return table


# -- one workload at one RTT -----------------------------------------------------------------


@dataclass
class Result:
    """Medians (ms) of one workload at one RTT per side, the samples and the collector's."""

    workload: str
    rtt_ms: float
    runs: int
    roots: int = 0
    median_ms: dict[str, float] = field(default_factory=dict)
    samples_ms: dict[str, list[float]] = field(default_factory=dict)
    gc_median_ms: dict[str, float] = field(default_factory=dict)
    gc_samples_ms: dict[str, list[float]] = field(default_factory=dict)
    objects_per_root: dict[str, float] = field(default_factory=dict)
    """Objects tracked by the collector that one run's result keeps alive, per root."""
    object_types: dict[str, dict[str, float]] = field(default_factory=dict)
    """The same by type (module-qualified name), per root: types with at least 0.1."""
    error: str | None = None

    def best_peer(self) -> str | None:
        """The peer side with the lowest median."""
        peers = {s: ms for s, ms in self.median_ms.items() if s in PEER_SIDES}
        return min(peers, key=peers.__getitem__) if peers else None

    def ratio(self, slower: str | None, faster: str) -> float | None:
        """``slower``'s median over ``faster``'s (``None`` if either is missing)."""
        a = self.median_ms.get(slower) if slower else None
        b = self.median_ms.get(faster)
        return a / b if a and b else None


def bench_workload(
    workload: Workload,
    rtt_ms: float,
    runs: int,
    peers: Peers,
    sides: Sequence[str],
    runner: Any,
    progress: Callable[[str], None],
    objects: bool = False,
) -> Result:
    """Warm up and check every side (the floor's objects against Django's too), then
    ``runs`` alternating timed runs of each; with ``objects``, then the objects each side's
    result keeps alive (:func:`objects_left`). Raises :class:`ResultMismatchError` when a
    side's shape differs from Django's."""
    alias = alias_for(rtt_ms)
    result = Result(workload.name, rtt_ms, runs)
    _, reference_raw = django_sync(workload, alias)
    reference = normalized(workload.name, reference_raw)
    result.roots = n = len(reference)
    table = measures(workload, alias, n, peers, sides, runner)
    sides = list(table)
    if "floor" in table:
        check_floor(workload, alias, prepare_floor(workload, alias), runner)

    def check(side: str, run: str, shape: Shape) -> None:
        got = normalized(workload.name, shape)
        if got != reference:
            raise ResultMismatchError(
                f"{workload.name} @ {rtt_ms:g} ms: {side} ({run}) differs from Django's "
                f"prefetch_related: {difference(reference, got)}"
            )

    for side in sides:  # warm-up: connections, pools, statement caches
        check(side, "warm-up", table[side]()[1])
    samples: dict[str, list[float]] = {side: [] for side in sides}
    collector: dict[str, list[float]] = {side: [] for side in sides}
    for run in range(runs):
        order = list(sides[run % len(sides) :]) + list(sides[: run % len(sides)])
        for side in order:
            gc.collect()
            with CollectorClock() as clock:
                seconds, shape = table[side]()
            check(side, f"run {run + 1}", shape)
            del shape
            samples[side].append(seconds * 1000)
            collector[side].append(clock.seconds * 1000)
        progress(f"  {workload.name} @ {rtt_ms:g} ms: run {run + 1}/{runs}")
    result.samples_ms = samples
    result.median_ms = {s: statistics.median(v) for s, v in samples.items()}
    result.gc_median_ms = {s: statistics.median(v) for s, v in collector.items()}
    result.gc_samples_ms = collector
    if objects:
        for side in sides:
            left = objects_left(table[side])
            result.objects_per_root[side] = sum(left.values()) / n
            result.object_types[side] = {
                name: count / n for name, count in left.most_common() if count >= n / 10
            }
    return result


def bench_rtt(
    workloads: dict[str, Workload],
    names: Sequence[str],
    rtt_ms: float,
    runs: int,
    server: ServerInfo,
    proxies: dict[str, tuple[str, int]],
    sides: Sequence[str],
    runner: asyncio.Runner,
    objects: bool = False,
) -> list[Result]:
    """Every workload of ``names`` at ``rtt_ms`` (with ``objects``, the objects each side
    keeps: see :func:`bench_workload`); the peers' pools for that RTT are opened first and
    closed after, with the engine's (so at most one RTT's pools are open: the server's
    ``max_connections`` is 100). A failed workload is reported in its result."""
    from async_prefetch import aclose

    alias = alias_for(rtt_ms)
    peers = runner.run(open_peers(server, {alias: proxies[alias]}, sides))[alias]
    results: list[Result] = []
    try:
        for name in names:
            try:
                result = bench_workload(
                    workloads[name], rtt_ms, runs, peers, sides, runner, progress, objects
                )
            except Exception:  # reported, the others still run
                error = traceback.format_exc()
                result = Result(name, rtt_ms, runs, error=error)
                progress(f"FAILED {name} @ {rtt_ms:g} ms:\n{error}")
            results.append(result)
            progress(
                f"{name} @ {rtt_ms:g} ms: "
                + ", ".join(f"{s} {fmt_ms(ms)}" for s, ms in result.median_ms.items())
            )
    finally:
        runner.run(close_peers({alias: peers}))
        runner.run(aclose())
    return results


# -- profile ----------------------------------------------------------------------------------

#: Where a function's own time goes, by the first matching fragment of its file path.
BUCKETS: Final = (
    ("async_prefetch/hydration/", "engine: hydration (rows -> instances, caches)"),
    ("async_prefetch/sql/", "engine: SQL building"),
    ("async_prefetch/relations/", "engine: relation queries (parent keys, chunks)"),
    ("async_prefetch/planning/", "engine: planning"),
    ("async_prefetch/runtime/", "engine: scheduling, session, bridge"),
    ("async_prefetch/execution/", "engine: execution (pool, cursors)"),
    ("async_prefetch/", "engine: other"),
    ("django/db/models/sql/", "Django: SQL compiler and query"),
    ("django/db/models/base.py", "Django: models/base.py (Model, its pk, its state)"),
    ("django/db/models/query.py", "Django: QuerySet (clone, filter)"),
    ("django/db/models/fields/related", "Django: related descriptors and managers"),
    ("django/db/models/", "Django: other models code"),
    ("django/", "Django: other"),
    ("psycopg_pool/", "psycopg_pool"),
    ("psycopg/", "psycopg (execute, fetch, type loaders)"),
    ("anyio/", "anyio"),
    ("asyncio/", "asyncio (event loop, tasks)"),
    ("threading.py", "threading (thread hops, waits)"),
    ("selectors.py", "selectors (waiting on sockets)"),
)


def bucket_of(filename: str) -> str:
    """The :data:`BUCKETS` label of a profiled function's file (``other`` if none matches)."""
    path = filename.replace(os.sep, "/")
    if filename == "~":
        return "builtins (C functions)"
    for fragment, label in BUCKETS:
        if fragment in path:
            return label
    return "other"


def buckets(stats: pstats.Stats) -> list[tuple[str, float, int]]:
    """Own time (s) and calls per :func:`bucket_of` label, largest first."""
    totals: dict[str, list[float]] = {}
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, _, _), (_, calls, tottime, _, _) in raw.items():
        entry = totals.setdefault(bucket_of(filename), [0.0, 0])
        entry[0] += tottime
        entry[1] += calls
    return sorted(((k, v[0], int(v[1])) for k, v in totals.items()), key=lambda t: -t[1])


async def _profiler(profiler: cProfile.Profile, enable: bool) -> None:
    if enable:
        profiler.enable()
    else:
        profiler.disable()


def count_objects(
    workload: Workload,
    rtt_ms: float,
    server: ServerInfo,
    proxies: dict[str, tuple[str, int]],
    sides: Sequence[str],
    runner: asyncio.Runner,
) -> dict[str, int]:
    """Objects tracked by the cyclic garbage collector that one run of each side leaves
    alive with its roots (after a warm-up run; see :func:`objects_left`)."""
    alias = alias_for(rtt_ms)
    n = len(workload.root(alias).values_list("pk", flat=True))
    peers = runner.run(open_peers(server, {alias: proxies[alias]}, sides))[alias]
    counts: dict[str, int] = {}
    try:
        table = measures(workload, alias, n, peers, sides, runner)
        for side, call in table.items():
            call()
            counts[side] = sum(objects_left(call).values())
    finally:
        runner.run(close_peers({alias: peers}))
    return counts


def objects_left(call: Callable[[], Timed]) -> collections.Counter[str]:
    """Objects tracked by the cyclic garbage collector that one ``call`` of a side leaves
    alive with its roots, by type (``module.qualname``); the collector off during the call,
    then a collection (the run's garbage is not what it keeps). Every object alive before
    is held meanwhile, so that no new object can reuse a freed one's ``id``."""
    global RETAIN
    RETAIN = []
    gc.collect()
    before = gc.get_objects()
    gc.disable()
    try:
        call()
        gc.enable()
        gc.collect()
        seen = {id(o) for o in before}
        seen.add(id(before))
        new = collections.Counter(
            f"{type(o).__module__}.{type(o).__qualname__}"
            for o in gc.get_objects()
            if id(o) not in seen
        )
    finally:
        gc.enable()
        RETAIN = None
        del before
    return new


def split_timings(
    workload: Workload,
    alias: str,
    runs: int,
    runner: asyncio.Runner,
    tortoise: Any = None,
) -> dict[str, tuple[list[float], list[tuple[float, float]]]]:
    """Django's and the engine's fetch (ms) and read (ms, and the collector's ms inside it)
    timed apart, alternating, ``runs`` each; with ``tortoise`` (a Tortoise client), Tortoise's
    too (its ``prefetch_related``, then the read of its objects)."""
    from async_prefetch import aprefetch

    chain = _is_chain(workload)
    read_django = read_chain_django if chain else read_fanout_django
    read_peer = read_chain_peer if chain else read_fanout_peer

    async def engine_fetch() -> list[Any]:
        return await aprefetch(workload.root(alias), *workload.lookups())

    fetchers: dict[str, tuple[Callable[[], Any], Callable[[Any], Shape]]] = {
        "django_sync": (lambda: list(workload.queryset(alias)), read_django),
        "engine": (lambda: runner.run(engine_fetch()), read_django),
    }
    if tortoise is not None:
        n = len(workload.root(alias).values_list("pk", flat=True))
        fetchers["tortoise_asyncpg"] = (
            lambda: runner.run(tortoise_fetch(workload, n, tortoise)),
            read_peer,
        )
    out: dict[str, tuple[list[float], list[tuple[float, float]]]] = {
        side: ([], []) for side in fetchers
    }
    for _ in range(runs):
        for side, (fetch, read) in fetchers.items():
            gc.collect()
            started = time.perf_counter()
            objects = fetch()
            fetched = time.perf_counter()
            with CollectorClock() as clock:
                read(objects)
            out[side][0].append((fetched - started) * 1000)
            out[side][1].append(((time.perf_counter() - fetched) * 1000, clock.seconds * 1000))
            del objects
    return out


def profile_engine(
    workload: Workload,
    rtt_ms: float,
    runs: int,
    out: Path,
    server: ServerInfo,
    proxies: dict[str, tuple[str, int]],
    sides: Sequence[str],
) -> str:
    """Profile ``runs`` engine runs (after 3 warm-up runs): the collector's share and the
    fetch and the read timed apart (:func:`split_timings`) without the profiler, then
    cProfile on the engine's thread and the caller's (one profiler per thread: Python <
    3.12) with the collector off, so that its pauses are not charged to whichever function
    happened to allocate. Returns a markdown summary; saves the ``.prof`` files in ``out``."""
    from async_prefetch.runtime import bridge

    alias = alias_for(rtt_ms)
    lines: list[str] = []
    with asyncio.Runner() as runner:
        for _ in range(3):
            runner.run(engine(workload, alias))
        plain, collected = [], []
        for _ in range(runs):
            gc.collect()
            with CollectorClock() as clock:
                seconds, _shape = runner.run(engine(workload, alias))
            plain.append(seconds * 1000)
            collected.append(clock.seconds * 1000)
        gc.disable()
        try:
            no_gc = []
            for _ in range(runs):
                seconds, _shape = runner.run(engine(workload, alias))
                no_gc.append(seconds * 1000)
                gc.enable()
                gc.collect()
                gc.disable()
        finally:
            gc.enable()
        lines += [
            f"Engine on `{workload.name}` at {rtt_ms:g} ms, {runs} runs (medians): "
            f"{statistics.median(plain):.1f} ms, of which the collector "
            f"{statistics.median(collected):.1f} ms; with the collector off "
            f"{statistics.median(no_gc):.1f} ms.",
            "",
            "Fetch and read apart (medians, collector on, collected before each run; the"
            " read is the same code for Django and the engine, over Django's objects):",
            "",
            "| side | fetch ms | read ms | read's collector ms |",
            "| --- | ---: | ---: | ---: |",
        ]
        tortoise = None
        if "tortoise_asyncpg" in sides:
            peers = runner.run(open_peers(server, {alias: proxies[alias]}, ["tortoise_asyncpg"]))
            tortoise = peers[alias].tortoise.get("asyncpg")
        try:
            split = split_timings(workload, alias, runs, runner, tortoise)
        finally:
            if tortoise is not None:
                runner.run(close_peers(peers))
        for side, (fetch, read) in split.items():
            lines.append(
                f"| {side} | {statistics.median(fetch):.1f} | "
                f"{statistics.median(r for r, _ in read):.1f} | "
                f"{statistics.median(g for _, g in read):.1f} |"
            )
        lines += [
            "",
            "Objects tracked by the collector that one run leaves alive with its roots:",
            "",
            "| side | tracked objects | per root |",
            "| --- | ---: | ---: |",
        ]
        roots = len(workload.root(alias).values_list("pk", flat=True))
        for side, count in count_objects(workload, rtt_ms, server, proxies, sides, runner).items():
            lines.append(f"| {side} | {count} | {count / roots:.1f} |")
        lines.append("")
        per_thread = sys.version_info < (3, 12)
        engine_profiler = cProfile.Profile() if per_thread else None
        caller_profiler = cProfile.Profile()
        if engine_profiler is not None:
            bridge.run_sync(_profiler, engine_profiler, True)
        caller_profiler.enable()
        started = time.perf_counter()
        gc.collect()
        gc.disable()  # else collections land in whichever function allocated at the time
        try:
            for _ in range(runs):
                runner.run(engine(workload, alias))
        finally:
            gc.enable()
            caller_profiler.disable()
            if engine_profiler is not None:
                bridge.run_sync(_profiler, engine_profiler, False)
        wall = (time.perf_counter() - started) * 1000 / runs
    out.mkdir(parents=True, exist_ok=True)
    lines.append(
        f"Under cProfile, the collector off: {wall:.1f} ms a run (the profiler's overhead "
        "included)."
    )
    profiles = (
        [("engine thread", engine_profiler), ("caller thread", caller_profiler)]
        if engine_profiler is not None
        else [("all threads", caller_profiler)]  # one profiler per process from 3.12
    )
    for label, profiler in profiles:
        if profiler is None:
            continue
        path = out / f"peers-profile-{workload.name}-{label.split()[0]}.prof"
        stats = pstats.Stats(profiler)
        stats.dump_stats(path)
        lines += [
            "",
            f"{label} ({path.name}), own time per run by where it goes:",
            "",
            "| where | ms per run | calls per run |",
            "| --- | ---: | ---: |",
        ]
        for label_, seconds_, calls in buckets(stats):
            if seconds_ * 1000 / runs >= 0.05:
                lines.append(f"| {label_} | {seconds_ * 1000 / runs:.1f} | {calls // runs} |")
        top = sorted(
            stats.stats.items(),  # type: ignore[attr-defined]
            key=lambda item: -item[1][2],
        )[:15]
        lines += [
            "",
            "| function (own time) | ms per run | calls per run |",
            "| --- | ---: | ---: |",
        ]
        for (filename, line, name), (_, calls, tottime, _, _) in top:
            short = "/".join(Path(filename).parts[-2:]) if filename != "~" else ""
            lines.append(
                f"| `{short}:{line} {name}` | {tottime * 1000 / runs:.2f} | {calls // runs} |"
            )
    return "\n".join(lines)


# -- peak memory ------------------------------------------------------------------------------


def memory_child(spec: str, db: str, rtt_ms: float, quick: bool) -> int:
    """Subprocess body: two runs of side ``workload:side`` through the proxy ``db``
    (``host:port``), then ``MEMORY {json}`` on stdout. Every side's process imports the
    same modules (the engine, Tortoise, SQLAlchemy and the peer models) before its baseline.
    Linux only (``/proc/self/status``, ``clear_refs``)."""
    name, side = spec.split(":")
    host, port = db.rsplit(":", 1)
    alias = alias_for(rtt_ms)
    proxy = {alias: (host, int(port))}
    server = get_server()
    configure_django(server, proxy)
    from django.db import connections

    import async_prefetch.api
    import async_prefetch.devtools.bench.peer_models  # noqa: F401

    workload = build_workloads(quick)[name]
    n = len(workload.root(alias).values_list("pk", flat=True))
    connections[alias].close()
    with asyncio.Runner() as runner:
        peers = runner.run(open_peers(server, proxy, [side]))
        call = measures(workload, alias, n, peers[alias], [side], runner)[side]

        def run_once() -> int:
            call()
            return n

        memory = memory_runs(name, side, rtt_ms, run_once)
        runner.run(close_peers(peers))
    if side in ("engine", "floor"):
        from async_prefetch.runtime import bridge

        bridge.shutdown()
    return print_memory(memory)


def measure_memory(
    names: Sequence[str],
    sides: Sequence[str],
    server: ServerInfo,
    rtt_ms: float,
    proxy: tuple[str, int],
    quick: bool,
) -> tuple[list[Memory], list[str]]:
    """:func:`memory_child` for every workload and side, one subprocess each; the
    measurements and the errors of failed children."""
    children = [
        (
            name,
            side,
            [
                *(sys.executable, "-m", "async_prefetch.devtools.bench.peers"),
                *("--memory-child", f"{name}:{side}", "--memory-db", f"{proxy[0]}:{proxy[1]}"),
                *("--rtts", str(rtt_ms), *(["--quick"] if quick else [])),
            ],
        )
        for name in names
        for side in sides
        if side != "floor" or name in FLOOR_WORKLOADS
    ]
    return memory_children(server, children, timeout=600)


def memory_table(memory: Sequence[Memory], sides: Sequence[str]) -> str:
    """Markdown: per workload, each side's first-run peak MiB (+growth) / second-run peak."""
    by: dict[tuple[str, str], Memory] = {(m.workload, m.side): m for m in memory}
    head = ["workload", *sides]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * len(sides)]
    for name in dict.fromkeys(m.workload for m in memory):
        cells = [name]
        for side in sides:
            m = by.get((name, side))
            cells.append(
                "n/a"
                if m is None
                else f"{m.peak_kib / 1024:.1f} (+{(m.peak_kib - m.baseline_kib) / 1024:.1f}) "
                f"/ {m.second_peak_kib / 1024:.1f}"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- reports ----------------------------------------------------------------------------------


def results_table(results: Sequence[Result], sides: Sequence[str]) -> str:
    """Markdown: medians per side, the best peer, engine vs Django sync and vs the best peer,
    engine and the best peer vs the floor."""
    head = ["workload", "RTT ms", "runs", *(f"{s} ms" for s in sides)]
    head += ["best peer", "Django sync / engine", "best peer / engine"]
    head += ["engine / floor", "best peer / floor"]
    lines = ["| " + " | ".join(head) + " |", "| --- | " + " | ".join(["---:"] * (len(head) - 1))]
    lines[-1] += " |"
    for r in results:
        if r.error is not None:
            lines.append(f"| {r.workload} | {r.rtt_ms:g} | FAILED: see below |")
            continue
        best = r.best_peer()
        cells = [r.workload, f"{r.rtt_ms:g}", str(r.runs)]
        cells += [fmt_ms(r.median_ms.get(s)) for s in sides]
        cells += [best or "n/a", fmt_ratio(r.ratio("django_sync", "engine"))]
        cells += [fmt_ratio(r.ratio(best, "engine"))]
        cells += [fmt_ratio(r.ratio("engine", "floor")), fmt_ratio(r.ratio(best, "floor"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gc_table(results: Sequence[Result], sides: Sequence[str]) -> str:
    """Markdown: the collector's median time inside each side's run."""
    head = ["workload", "RTT ms", *(f"{s} GC ms" for s in sides)]
    lines = ["| " + " | ".join(head) + " |", "| --- | " + " | ".join(["---:"] * (len(head) - 1))]
    lines[-1] += " |"
    for r in results:
        if r.error is None:
            cells = [r.workload, f"{r.rtt_ms:g}", *(fmt_ms(r.gc_median_ms.get(s)) for s in sides)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def objects_table(results: Sequence[Result], sides: Sequence[str]) -> str:
    """Markdown: per workload, the objects each side's result keeps alive, per root."""
    counted = [r for r in results if r.objects_per_root]
    if not counted:
        return ""
    lines = [
        "| workload | " + " | ".join(sides) + " |",
        "| --- |" + " ---: |" * len(sides),
    ]
    for r in counted:
        cells = [r.workload]
        cells += [
            "n/a" if s not in r.objects_per_root else f"{r.objects_per_root[s]:.1f}" for s in sides
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: The sides broken down by type in the report (the JSON has every side's).
TYPE_SIDES: Final = ("django_sync", "engine", "floor", "tortoise_asyncpg")


def object_types_table(result: Result, sides: Sequence[str]) -> str:
    """Markdown: one workload's objects kept alive per root, by type, for the
    :data:`TYPE_SIDES` among ``sides`` (numbered models, ``Child0`` .. ``Child9``, in one
    row)."""
    sides = [s for s in sides if s in result.object_types and s in TYPE_SIDES]
    per_side: dict[str, dict[str, float]] = {}
    for side in sides:
        merged: dict[str, float] = {}
        for name, count in result.object_types[side].items():
            key = re.sub(r"\d+$", "*", name) if ".bench." in name else name
            merged[key] = merged.get(key, 0.0) + count
        per_side[side] = merged
    names = sorted(
        {name for merged in per_side.values() for name in merged},
        key=lambda name: -max(per_side[s].get(name, 0.0) for s in sides),
    )
    lines = ["| type | " + " | ".join(sides) + " |", "| --- |" + " ---: |" * len(sides)]
    for name in names:
        cells = [f"`{name}`", *(f"{per_side[s].get(name, 0.0):.2f}" for s in sides)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def versions(server: ServerInfo) -> dict[str, str]:
    """Python, Django, psycopg, peers' packages, PostgreSQL, git commit, date, load."""
    from importlib.metadata import PackageNotFoundError, version

    from django.db import connections

    found: dict[str, str] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": str(os.cpu_count()),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    for package in ("django", "psycopg", "tortoise-orm", "sqlalchemy", "asyncpg"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "absent"
    with connections["default"].cursor() as cursor:
        cursor.execute("SHOW server_version")
        row = cursor.fetchone()
    found["postgresql"] = f"{row[0] if row else '?'} ({server.source})"
    try:
        found["git"] = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        found["git"] = "unknown"
    return found


def markdown_report(
    facts: dict[str, str], command: str, results: Sequence[Result], sides: Sequence[str]
) -> str:
    """The ``peers.md`` report."""
    parts = [
        "# Peers: the engine beside Django, Tortoise ORM and SQLAlchemy",
        "",
        f"- {facts['date']}, git {facts['git']}; {facts['cpus']} CPUs, {facts['platform']}, "
        f"load average at the start {facts['load']}",
        f"- Python {facts['python']}, Django {facts['django']}, psycopg {facts['psycopg']}, "
        f"Tortoise ORM {facts['tortoise-orm']}, SQLAlchemy {facts['sqlalchemy']}, "
        f"asyncpg {facts['asyncpg']}, PostgreSQL {facts['postgresql']}",
        f"- command: `{command}`",
        f"- pools: {POOL_SIZE} connections for the engine and for each peer client",
        "",
        "Medians in ms; every side's timed region includes reading every prefetched relation "
        "of every root once; every run's primary keys equal Django's.",
        "",
        results_table(results, sides),
        "",
        "The cyclic garbage collector's median time inside each side's run:",
        "",
        gc_table(results, sides),
    ]
    objects = objects_table(results, sides)
    if objects:
        parts += [
            "",
            "Objects tracked by the collector that one run's result keeps alive, per root:",
            "",
            objects,
        ]
        for r in results:
            if r.object_types:
                parts += ["", f"By type on `{r.workload}` (per root):", ""]
                parts.append(object_types_table(r, sides))
    failures = [r for r in results if r.error]
    if failures:
        parts += ["", "## FAILURES", ""]
        for r in failures:
            parts += [f"### {r.workload} @ {r.rtt_ms:g} ms", "", "```", str(r.error), "```", ""]
    return "\n".join(parts) + "\n"


# -- main -------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m async_prefetch.devtools.bench.peers",
        description="The engine beside Django's prefetch_related, Tortoise ORM and SQLAlchemy.",
    )
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, metavar="NAME")
    parser.add_argument("--rtts", nargs="+", type=float, metavar="MS", help="default: 0 1 5")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="timed runs per side")
    parser.add_argument(
        "--sides", nargs="+", metavar="SIDE", help=f"a subset of {', '.join(SIDES)}"
    )
    parser.add_argument("--quick", action="store_true", help="small workload sizes")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument(
        "--profile",
        metavar="WORKLOAD",
        choices=WORKLOADS,
        help="profile the engine side of WORKLOAD at the first --rtts instead",
    )
    parser.add_argument(
        "--memory",
        choices=("off", "also", "only"),
        default="off",
        help="peak RSS per workload and side, each in a fresh process at the first --rtts: "
        "after the timed runs (also) or instead of them (only); Linux only",
    )
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--memory-db", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the peers bench (see the module docstring); 0, or 1 when a side's result differed
    from Django's or a workload failed."""
    args = _parse_args(argv)
    if args.memory_child:
        return memory_child(args.memory_child, args.memory_db, (args.rtts or [0.0])[0], args.quick)
    rtts = list(dict.fromkeys(args.rtts or DEFAULT_RTTS))
    if args.profile:
        rtts = rtts[:1]
    names = [args.profile] if args.profile else (args.workloads or list(WORKLOADS))
    sides = available_sides()
    missing = [s for s in SIDES if s not in sides]
    if missing:
        progress(f"skipping sides whose packages are missing: {', '.join(missing)}")
    if args.sides:
        unknown = [s for s in args.sides if s not in SIDES]
        if unknown:
            raise SystemExit(f"unknown sides {unknown}; choose from {', '.join(SIDES)}")
        sides = [s for s in sides if s in args.sides]
    command = " ".join(["python -m async_prefetch.devtools.bench.peers", *(argv or sys.argv[1:])])
    started = time.perf_counter()
    results: list[Result] = []
    memory: list[Memory] = []
    memory_errors: list[str] = []
    with proxied(rtts) as (server, proxies):
        configure_django(server, proxies)
        from async_prefetch.runtime import bridge

        try:
            workloads = prepare(names, args.quick)
            facts = versions(server)
            if args.profile:
                summary = profile_engine(
                    workloads[args.profile], rtts[0], args.runs, args.out, server, proxies, sides
                )
                print(summary)
                (args.out / f"peers-profile-{args.profile}.md").write_text(summary + "\n")
                return 0
            with asyncio.Runner() as runner:
                for rtt in rtts if args.memory != "only" else ():
                    results += bench_rtt(
                        *(workloads, names, rtt, args.runs, server, proxies, sides, runner),
                        objects=rtt == rtts[0],
                    )
                results.sort(key=lambda r: (names.index(r.workload), rtts.index(r.rtt_ms)))
            if args.memory != "off":
                memory, memory_errors = measure_memory(
                    names, sides, server, rtts[0], proxies[alias_for(rtts[0])], args.quick
                )
        finally:
            bridge.shutdown()  # the engine's pools close while the proxies are up
    args.out.mkdir(parents=True, exist_ok=True)
    facts["wall_seconds"] = f"{time.perf_counter() - started:.0f}"
    (args.out / "peers.json").write_text(
        json.dumps(
            {
                "facts": facts,
                "command": command,
                "sides": sides,
                "results": [asdict(r) for r in results],
                "memory": [asdict(m) for m in memory],
                "memory_errors": memory_errors,
            },
            indent=2,
        )
        + "\n"
    )
    report = markdown_report(facts, command, results, sides) if results else ""
    if memory:
        report += (
            f"\nPeak resident memory (VmHWM, MiB) of one run per side in a fresh process at "
            f"{rtts[0]:g} ms: first run (growth over the resident size before it, which "
            "includes connecting) / second run in the same process:\n\n"
            + memory_table(memory, sides)
            + "\n"
        )
    if memory_errors:
        report += "\n## Memory FAILURES\n\n```\n" + "\n".join(memory_errors) + "\n```\n"
    (args.out / ("peers.md" if results else "peers-memory.md")).write_text(report)
    print(report)
    return 0 if all(r.error is None for r in results) and not memory_errors else 1


if __name__ == "__main__":
    sys.exit(main())
