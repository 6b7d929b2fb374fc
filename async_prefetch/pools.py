"""One psycopg ``AsyncConnectionPool`` per database alias and event loop.

Pools are configured from Django's own connection parameters
(``DatabaseWrapper.get_connection_params()``: adapters, ``prepare_threshold``,
OPTIONS), opened in autocommit (one round trip per query, no BEGIN/ROLLBACK) with the
session time zone and role Django would set.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from django.db import connections
from psycopg import AsyncClientCursor, AsyncConnection, AsyncCursor, sql
from psycopg_pool import AsyncConnectionPool

from .config import PoolConfig, load_config

_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, AsyncConnectionPool]] = (
    weakref.WeakKeyDictionary()
)


def connection_kwargs(alias: str) -> dict[str, Any]:
    """Keyword arguments for ``AsyncConnection.connect`` equivalent to Django's for ``alias``."""
    wrapper = connections[alias]
    params = dict(wrapper.get_connection_params())
    server_side_binding = wrapper.settings_dict["OPTIONS"].get("server_side_binding") is True
    params["cursor_factory"] = AsyncCursor if server_side_binding else AsyncClientCursor
    params["autocommit"] = True
    return params


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


def _new_pool(alias: str, config: PoolConfig) -> AsyncConnectionPool:
    return AsyncConnectionPool(
        kwargs=connection_kwargs(alias),
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


async def get_pool(alias: str) -> AsyncConnectionPool:
    """The open pool for ``alias`` on the running event loop, created on first use.

    The engine only calls this on its own loop thread (see :mod:`async_prefetch.bridge`):
    psycopg_pool's background tasks swallow cancellation, so a pool left open on a
    loop that shuts down can hang ``asyncio.run()`` or leak its connections.
    """
    loop = asyncio.get_running_loop()
    by_alias = _pools.get(loop)
    if by_alias is None:
        by_alias = _pools[loop] = {}
    pool = by_alias.get(alias)
    if pool is None:
        pool = by_alias[alias] = _new_pool(alias, load_config().pool)
    if pool.closed:  # opening takes the pool's lock: not on every query
        await pool.open()
    return pool


async def acquire(pool: AsyncConnectionPool) -> AsyncConnection[Any]:
    """A connection from ``pool`` for one query (return it with ``pool.putconn()``)."""
    return await pool.getconn()


async def close_pools() -> None:
    """Close every pool opened on the running event loop; later use opens new ones."""
    by_alias = _pools.pop(asyncio.get_running_loop(), {})
    for pool in by_alias.values():
        await pool.close()


def pool_stats() -> dict[str, dict[str, int]]:
    """``psycopg_pool`` statistics of the running loop's pools, by alias (observability)."""
    by_alias = _pools.get(asyncio.get_running_loop(), {})
    return {alias: pool.get_stats() for alias, pool in by_alias.items()}
