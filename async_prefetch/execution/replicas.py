"""``ReplicaExecutor``: an alias's read queries spread over its read replicas.

With ``ASYNC_PREFETCH["REPLICAS"] = {"default": ["replica_a", "replica_b"]}``, a query
the routers sent to ``"default"`` (``db_for_read`` picks the alias first) runs on one of
its replicas, each through a pool of its own (:mod:`.pools`): the usable replica with
the fewest of this process's engine queries in flight, taken in turn among equals, so
one call's concurrent queries spread across the replicas. Only the pool path uses it:
inside ``atomic`` every query stays on the caller's connection to the primary
(:func:`.executor_for`).

A replica is checked when it is used and its last check is older than
:data:`CHECK_INTERVAL` (once per replica and engine loop, not per query; only the first
check is waited for, later ones run in the background): one pooled connection runs
:data:`LAG_SQL`. A replica is skipped while its last check failed (down), or, with
``REPLICA_MAX_LAG`` set, while it lagged beyond that bound or its lag was unknown. A
query whose replica's pool cannot connect at all (it went down since its check) was not
sent: the replica is marked down and the query runs on another one. With no usable
replica, queries run on the primary. Each change (skipped, usable again, none usable) is
logged once on the ``async_prefetch`` logger.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from django.db import utils as django_db_utils
from django.db.backends.base.base import BaseDatabaseWrapper
from psycopg_pool import AsyncConnectionPool

from ..sql.compiler import CompiledQuery
from .base import Limiter, RowConsumer
from .pool import PoolExecutor
from .pool_health import unreachable_error
from .pools import acquire, get_pool

logger = logging.getLogger("async_prefetch")

#: Seconds between two checks of one replica (while it is used).
CHECK_INTERVAL = 2.0

#: Seconds a check may take (a connection, then :data:`LAG_SQL`) before the replica
#: counts as down.
CHECK_TIMEOUT = 5.0

#: Seconds the server is behind its primary: 0 on a server that is not a standby, or
#: whose replay has caught up with the WAL it received; otherwise the age of the last
#: transaction it replayed (NULL when it has replayed none since it started).
LAG_SQL = """\
SELECT CASE
    WHEN NOT pg_is_in_recovery() THEN 0.0
    WHEN pg_last_wal_receive_lsn() IS NOT NULL
        AND pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn() THEN 0.0
    ELSE extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp())::float8
END"""


@dataclass(eq=False)
class ReplicaState:
    """What the engine knows about one replica on one event loop."""

    alias: str
    checked: bool = False  # a first check has ended
    checked_at: float = 0.0  # loop time of the last check (or failed connection)
    error: str | None = None  # why it was unreachable at the last check
    lag: float | None = None  # seconds behind its primary at the last check; None: unknown
    in_flight: int = 0  # engine queries running on it
    check_task: asyncio.Task[None] | None = None
    reported: str | None = field(default=None, repr=False)  # kind of problem last logged

    def problem(self, max_lag: float | None) -> tuple[str, str] | None:
        """``(kind, description)`` of why the replica is skipped; ``None``: usable."""
        if self.error is not None:
            return "down", f"it is unreachable ({self.error})"
        if max_lag is None:
            return None
        if self.lag is None:
            return "lag", f"its lag is unknown (REPLICA_MAX_LAG = {max_lag:g} s)"
        if self.lag > max_lag:
            return "lag", f"it lags {self.lag:.1f} s behind (REPLICA_MAX_LAG = {max_lag:g} s)"
        return None


_states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, ReplicaState]] = (
    weakref.WeakKeyDictionary()
)
_turns: dict[str, Iterator[int]] = {}  # round robin among equally loaded replicas, by primary
_none_usable: set[str] = set()  # primaries whose "no replica usable" was logged last


def forget_replicas() -> None:
    """Forget what every loop knows about replicas: each is checked afresh on its next
    use (after a change of ``DATABASES``; tests). Call it while no call is running."""
    _states.clear()
    _none_usable.clear()


class ReplicaExecutor:
    """Runs ``alias``'s queries on its ``replicas`` (see the module docstring); at most
    ``limiter`` queries of a call at once, across all of them.

    Queries are reported to ``log_connection`` (the caller's connection for ``alias``:
    its query log, SQL panel and ``execute_wrappers``) under the alias of the server
    that ran them.
    """

    def __init__(
        self,
        alias: str,
        replicas: Sequence[str],
        limiter: Limiter,
        log_connection: BaseDatabaseWrapper | None,
        *,
        max_lag: float | None,
    ) -> None:
        self._alias = alias
        self._replicas = tuple(replicas)
        self._limiter = limiter
        self._log_connection = log_connection
        self._max_lag = max_lag
        self._primary = PoolExecutor(alias, limiter, log_connection)
        self._on: dict[str, PoolExecutor] = {}

    def _executor(self, replica: str) -> PoolExecutor:
        if replica == self._alias:
            return self._primary
        executor = self._on.get(replica)
        if executor is None:
            executor = self._on[replica] = PoolExecutor(
                replica, self._limiter, self._log_connection
            )
        return executor

    async def fetch(self, query: CompiledQuery, consume: RowConsumer) -> None:
        """Run ``query`` on a usable replica (the primary when there is none) and feed
        its rows to ``consume``, as :meth:`PoolExecutor.fetch` does."""
        excluded: set[str] = set()
        while True:
            state = await _pick(self._alias, self._replicas, self._max_lag, excluded)
            if state is None:
                await self._primary.fetch(query, consume)
                return
            state.in_flight += 1
            try:
                await self._executor(state.alias).fetch(query, consume)
                return
            except django_db_utils.OperationalError as exc:
                if not unreachable_error(exc):
                    raise
                # Its pool could not connect: the query was never sent. The pool is
                # replaced on its next use, so is this call's executor for it.
                _went_down(self._alias, state, exc)
                self._on.pop(state.alias, None)
                excluded.add(state.alias)
            finally:
                state.in_flight -= 1


async def _pick(
    primary: str, replicas: Sequence[str], max_lag: float | None, excluded: set[str]
) -> ReplicaState | None:
    """The replica of ``primary`` to run the next query on; ``None``: the primary."""
    loop = asyncio.get_running_loop()
    states = _states.setdefault(loop, {})
    candidates = [
        states.get(alias) or states.setdefault(alias, ReplicaState(alias))
        for alias in replicas
        if alias not in excluded
    ]
    now = loop.time()
    for state in candidates:
        if state.check_task is None and (
            not state.checked or now - state.checked_at >= CHECK_INTERVAL
        ):
            task = loop.create_task(_check(state))
            state.check_task = task
            task.add_done_callback(_forget_check(state))
    first = [s.check_task for s in candidates if not s.checked and s.check_task is not None]
    if first:
        await asyncio.wait(first)
    usable: list[ReplicaState] = []
    for state in candidates:
        problem = state.problem(max_lag)
        _report(primary, state, problem)
        if problem is None:
            usable.append(state)
    if not usable:
        if primary not in _none_usable:
            _none_usable.add(primary)
            logger.warning(
                "async_prefetch: no read replica of database %r is usable: reading from %r itself",
                primary,
                primary,
            )
        return None
    if primary in _none_usable:
        _none_usable.discard(primary)
    turn = next(_turns.setdefault(primary, itertools.count())) % len(usable)
    ordered = usable[turn:] + usable[:turn]
    return min(ordered, key=lambda state: state.in_flight)


def _forget_check(state: ReplicaState) -> Callable[[asyncio.Task[None]], None]:
    """A done callback for ``state``'s check task: forget the task."""

    def clear(task: asyncio.Task[None]) -> None:
        if state.check_task is task:
            state.check_task = None
        if not task.cancelled():
            task.exception()  # _check() handles every Exception; retrieved anyway

    return clear


async def _check(state: ReplicaState) -> None:
    """Update ``state`` from one pooled connection to its replica (see :data:`LAG_SQL`).

    A pool that holds connections but hands none out within :data:`CHECK_TIMEOUT` is
    busy, not down: the previous verdict stands. One that cannot connect, or a query
    that does not answer in time, makes the replica down.
    """
    loop = asyncio.get_running_loop()
    pool: AsyncConnectionPool[Any] | None = None
    querying = False
    try:
        with anyio.fail_after(CHECK_TIMEOUT):
            pool = await get_pool(state.alias)
            conn = await acquire(pool)
            querying = True
            try:
                cursor = await conn.execute(LAG_SQL)
                row = await cursor.fetchone()
            finally:
                with anyio.CancelScope(shield=True):
                    await pool.putconn(conn)
    except TimeoutError:
        busy = pool is not None and pool.get_stats().get("pool_size", 0) > 0
        if querying or not (busy and state.checked):
            state.error = f"no answer in {CHECK_TIMEOUT:g} s"
    except Exception as exc:
        state.error = _described(exc)
    else:
        state.error = None
        state.lag = None if row is None or row[0] is None else float(row[0])
    finally:
        state.checked = True
        state.checked_at = loop.time()


def _went_down(primary: str, state: ReplicaState, exc: BaseException) -> None:
    """``state``'s pool could not connect at all: down until its next check."""
    state.error = _described(exc)
    state.checked = True
    state.checked_at = asyncio.get_running_loop().time()
    _report(primary, state, state.problem(None))


def _described(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _report(primary: str, state: ReplicaState, problem: tuple[str, str] | None) -> None:
    """Log ``state``'s change of usability (once per change of kind)."""
    kind = problem[0] if problem is not None else None
    if kind == state.reported:
        return
    state.reported = kind
    if problem is not None:
        logger.warning(
            "async_prefetch: read replica %r of database %r skipped: %s",
            state.alias,
            primary,
            problem[1],
        )
    else:
        logger.info(
            "async_prefetch: read replica %r of database %r is usable again",
            state.alias,
            primary,
        )
