"""One psycopg ``AsyncConnectionPool`` per database alias and event loop.

Pools are configured from Django's own connection parameters
(``DatabaseWrapper.get_connection_params()``: adapters, ``prepare_threshold``,
OPTIONS), opened in autocommit (one round trip per query, no BEGIN/ROLLBACK) with the
session time zone and role Django would set, and named in ``pg_stat_activity``
(``application_name``). A pool follows its alias: when the alias's connection
parameters change (as Django's test runner does when it creates the test database), or
when the pool could not connect at all, the next run gets a new pool and the old one is
closed in the background.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
from django.db import connections
from django.db.backends.base.creation import BaseDatabaseCreation
from psycopg import AsyncClientCursor, AsyncConnection, AsyncCursor, sql
from psycopg_pool import AsyncConnectionPool

from ..config import PoolConfig, load_config
from .pool_health import PoolHealth, closed_by_server

logger = logging.getLogger("async_prefetch.pools")

#: ``application_name`` of pooled connections, or the suffix added to the user's own.
APPLICATION_NAME = "async_prefetch"
_APPLICATION_NAME_MAX_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1: the server truncates beyond


@dataclass(eq=False)
class _Entry:
    pool: AsyncConnectionPool[Any]
    identity: tuple[Any, ...]  # what the pool was built from: see _identity()
    health: PoolHealth


_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Entry]] = (
    weakref.WeakKeyDictionary()
)
_health: weakref.WeakKeyDictionary[AsyncConnectionPool[Any], PoolHealth] = (
    weakref.WeakKeyDictionary()
)
_retiring: set[asyncio.Task[None]] = set()  # closes of replaced pools, on their loops
#: Connections promised to queries (:class:`Promise`) that have not checked them out yet.
_promised: weakref.WeakKeyDictionary[AsyncConnectionPool[Any], int] = weakref.WeakKeyDictionary()


def application_name(user_name: object = None) -> str:
    """``application_name`` for pooled connections: ``async_prefetch``, or the user's
    own with `` [async_prefetch]`` appended, its start truncated to fit in 63 bytes."""
    if not user_name:
        return APPLICATION_NAME
    suffix = f" [{APPLICATION_NAME}]"
    room = _APPLICATION_NAME_MAX_BYTES - len(suffix)
    return str(user_name).encode()[:room].decode(errors="ignore") + suffix


def connection_kwargs(alias: str) -> dict[str, Any]:
    """Keyword arguments for ``AsyncConnection.connect`` equivalent to Django's for ``alias``."""
    wrapper = connections[alias]
    params = dict(wrapper.get_connection_params())
    server_side_binding = wrapper.settings_dict["OPTIONS"].get("server_side_binding") is True
    params["cursor_factory"] = AsyncCursor if server_side_binding else AsyncClientCursor
    params["autocommit"] = True
    params["application_name"] = application_name(params.get("application_name"))
    return params


def _identity(alias: str) -> tuple[Any, ...]:
    """Everything a pool for ``alias`` is built from (no I/O): equal means the same pool."""
    wrapper = connections[alias]
    role = wrapper.settings_dict["OPTIONS"].get("assume_role")
    return (connection_kwargs(alias), wrapper.timezone_name, role, load_config().pool)


def _configure_for(alias: str) -> Any:
    wrapper = connections[alias]
    timezone_name = wrapper.timezone_name
    role = wrapper.settings_dict["OPTIONS"].get("assume_role")
    set_time_zone = wrapper.ops.set_time_zone_sql()

    async def configure(conn: AsyncConnection[Any]) -> None:
        # Mirrors DatabaseWrapper._configure_timezone() and _configure_role().
        if timezone_name and conn.info.parameter_status("TimeZone") != timezone_name:
            await conn.execute(set_time_zone, [timezone_name])
        if role:
            await conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))

    return configure


def _new_entry(alias: str, identity: tuple[Any, ...], config: PoolConfig) -> _Entry:
    health = PoolHealth()
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        connection_class=health.connection_class(),
        kwargs=identity[0],
        min_size=config.min_size,
        max_size=config.max_size,
        timeout=config.timeout,
        max_idle=config.max_idle,
        max_lifetime=config.max_lifetime,
        configure=_configure_for(alias),
        check=AsyncConnectionPool.check_connection if config.check else None,
        name=f"async_prefetch[{alias}]",
        open=False,
    )
    _health[pool] = health
    return _Entry(pool, identity, health)


def _retire(pool: AsyncConnectionPool[Any]) -> None:
    """Close ``pool`` in the background: connections still checked out are closed when
    they are returned; :func:`close_pools` waits for it."""
    task = asyncio.get_running_loop().create_task(pool.close())
    _retiring.add(task)
    task.add_done_callback(_retired)


def _retired(task: asyncio.Task[None]) -> None:
    _retiring.discard(task)
    if not task.cancelled() and (exc := task.exception()) is not None:
        logger.warning("closing a replaced pool failed", exc_info=exc)


async def get_pool(alias: str) -> AsyncConnectionPool[Any]:
    """The open pool for ``alias`` on the running event loop, created on first use and
    replaced when ``alias``'s connection parameters changed or it could not connect.

    The engine only calls this on its own loop thread (see :mod:`async_prefetch.bridge`):
    psycopg_pool's background tasks swallow cancellation, so a pool left open on a
    loop that shuts down can hang ``asyncio.run()`` or leak its connections.
    """
    by_alias = _pools.setdefault(asyncio.get_running_loop(), {})
    identity = _identity(alias)
    entry = by_alias.get(alias)
    if entry is not None and (entry.identity != identity or entry.health.unreachable):
        _retire(entry.pool)
        entry = None
    if entry is None:
        _close_pools_before_test_databases_are_destroyed()
        entry = by_alias[alias] = _new_entry(alias, identity, identity[3])
    if entry.pool.closed:  # opening takes the pool's lock: not on every query
        await entry.pool.open()
    return entry.pool


async def acquire(
    pool: AsyncConnectionPool[Any], started: Callable[[], None] | None = None
) -> AsyncConnection[Any]:
    """A live connection from ``pool`` (one of :func:`get_pool`'s) for one query; return it
    with ``pool.putconn()``. ``started`` is called once the pool counts the request in its
    statistics (:meth:`.PoolHealth.getconn`).

    Raises Django's ``OperationalError``, caused by psycopg's, without waiting for the
    pool's timeout when the pool cannot connect at all. Idle connections the server has
    closed meanwhile (a restart) are discarded (the pool replaces them) without a round trip.
    """
    health = _health[pool]
    while True:
        conn = await health.getconn(pool, started)
        if not closed_by_server(conn):
            return conn
        with anyio.CancelScope(shield=True):
            await pool.putconn(conn)


async def close_pools() -> None:
    """Close every pool opened on the running event loop; later use opens new ones."""
    loop = asyncio.get_running_loop()
    by_alias = _pools.pop(loop, {})
    for entry in by_alias.values():
        await entry.pool.close()
    retiring = [task for task in _retiring if task.get_loop() is loop]
    if retiring:
        await asyncio.wait(retiring)


async def close_pools_of(*aliases: str) -> None:
    """Close the running loop's pools of ``aliases`` and wait until they are closed (a
    database about to go away); later use opens new ones."""
    by_alias = _pools.get(asyncio.get_running_loop(), {})
    for alias in aliases:
        entry = by_alias.pop(alias, None)
        if entry is not None:
            await entry.pool.close()


def spare_connections(pool: AsyncConnectionPool[Any]) -> int:
    """How many more connections ``pool`` can hand out now without a client queueing:
    its idle ones and its room to grow (``get_stats()``), less the clients queueing and
    the connections promised (:class:`Promise`) but not checked out yet. Zero or less:
    the next ``getconn()`` waits for a connection another query returns."""
    stats = pool.get_stats()
    return (
        stats.get("pool_available", 0)
        + stats.get("pool_max", 0)
        - stats.get("pool_size", 0)
        - stats.get("requests_waiting", 0)
        - _promised.get(pool, 0)
    )


class Promise:
    """One of ``pool``'s connections counted as taken (by :func:`spare_connections`)
    from now until :meth:`kept` (the query has checked it out, or gave up), so that
    queries routed in the same instant do not all count the same idle connection."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self._pool: AsyncConnectionPool[Any] | None = pool
        _promised[pool] = _promised.get(pool, 0) + 1

    def kept(self) -> None:
        """No longer counted (idempotent)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            _promised[pool] -= 1


def pool_stats() -> dict[str, dict[str, int]]:
    """``psycopg_pool`` statistics of the running loop's pools, by alias (observability)."""
    by_alias = _pools.get(asyncio.get_running_loop(), {})
    return {alias: entry.pool.get_stats() for alias, entry in by_alias.items()}


def _close_pools_before_test_databases_are_destroyed() -> None:
    """Make Django's ``destroy_test_db()`` close the engine's pools first (idempotent).

    PostgreSQL refuses to drop a database other sessions are connected to, and
    ``manage.py test`` and pytest-django both drop the test database through
    ``BaseDatabaseCreation.destroy_test_db()`` while the process (and so the engine's
    pools) still runs. Installed with the first pool, so it is in place whether or not
    the ``async_prefetch`` app is installed, and costs nothing where the engine is unused.
    """
    destroy = BaseDatabaseCreation.destroy_test_db
    if getattr(destroy, "_closes_async_prefetch_pools", False):
        return

    @functools.wraps(destroy)
    def destroy_test_db(self: BaseDatabaseCreation, *args: Any, **kwargs: Any) -> Any:
        from ..runtime.bridge import on_engine_thread

        on_engine_thread(close_pools)
        return destroy(self, *args, **kwargs)

    destroy_test_db._closes_async_prefetch_pools = True  # type: ignore[attr-defined]
    BaseDatabaseCreation.destroy_test_db = destroy_test_db  # type: ignore[method-assign]
