"""What a prefetch run can leave behind, for the failure tests: pooled connections still
checked out or thrown away, queries still running in the server, and the instances'
attributes and caches."""

from __future__ import annotations

from typing import Any

import anyio
from django.db import connection

from async_prefetch.execution.pools import pool_stats


def checked_out(stats: dict[str, dict[str, int]]) -> int:
    """Connections given to clients or being prepared (a returned broken one is replaced)."""
    return sum(s.get("pool_size", 0) - s.get("pool_available", 0) for s in stats.values())


async def checked_out_now() -> int:
    """Checked-out connections of the engine's pools (call it on the engine's loop)."""
    return checked_out(pool_stats())


async def settle_pool() -> int:
    """Checked-out connections once the pool's background work is done (at most 5 s)."""
    for _ in range(250):  # polls: the pool has no event for "all returned"
        if not await checked_out_now():
            break
        await anyio.sleep(0.02)
    return await checked_out_now()


async def pool_ready(alias: str = "default", idle: int = 1) -> dict[str, int]:
    """``alias``'s pool statistics once it holds ``idle`` idle connections and is opening
    none (at most 5 s): a timed call then waits for no connection attempt."""
    stats: dict[str, int] = {}
    for _ in range(250):
        stats = pool_stats().get(alias, {})
        if stats.get("pool_available", 0) >= idle and stats.get("pool_size", 0) == stats.get(
            "pool_available", 0
        ):
            break
        await anyio.sleep(0.02)
    return stats


async def discarded_connections() -> int:
    """Connections the engine's pools got back closed (``returns_bad``) so far."""
    return sum(stats.get("returns_bad", 0) for stats in pool_stats().values())


def _activity(condition: str) -> int:
    """Sessions of other connections in ``pg_stat_activity`` matching ``condition``."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT count(*) FROM pg_stat_activity WHERE {condition} AND pid <> pg_backend_pid()"
        )
        (count,) = cursor.fetchone()
    return int(count)


def sleepers(seconds: float = 5, *, engine_only: bool = False) -> int:
    """Queries of other connections (the engine's pooled ones only, with
    ``engine_only``) sleeping in ``pg_sleep(seconds)`` in the server now."""
    condition = f"state = 'active' AND query LIKE '%%pg_sleep({seconds:g})%%'"
    if engine_only:
        condition += " AND application_name = 'async_prefetch' AND datname = current_database()"
    return _activity(condition)


def busy_engine_connections() -> int:
    """The engine's pooled connections that are not idle (a query, an open transaction)."""
    return _activity("application_name = 'async_prefetch' AND state <> 'idle'")


def state_of(books: list[Any]) -> list[Any]:
    """Everything a run could change: attributes, the fields cache, the prefetch cache.

    An empty prefetch cache counts as none: a failed run may leave the empty dict it gave
    an instance (another call may be filling it), as Django's own function leaves it.
    """
    return [
        (
            {
                k: v
                for k, v in vars(b).items()
                if k != "_state" and not (k == "_prefetched_objects_cache" and v == {})
            },
            dict(b._state.fields_cache),
            dict(getattr(b, "_prefetched_objects_cache", {})),
        )
        for b in books
    ]
