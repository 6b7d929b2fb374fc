"""What one small call costs: the engine's fixed cost per call beside Django's.

``python -m async_prefetch.devtools.bench.overhead --rtts 0 1 5 --rounds 9`` starts (or finds)
PostgreSQL as the bench does, puts a latency proxy in front of it per RTT, seeds the demo
bookstore, and times, alternating in one process, medians of ``--rounds`` rounds of
``--calls`` sequential calls each, in microseconds per call:

* whole calls reading the 20 publishers (one query, nothing to run at once):
  ``django`` (``[p async for p in Publisher.objects.all()]``), ``engine``
  (``await aprefetch(Publisher.objects.all())``), ``django_aget`` and ``pool_aget``
  (``aget(pk=...)`` of Django and of :class:`~async_prefetch.terminals.PoolQuerySet`);
* the parts an async engine call is made of: ``sync_to_async`` of a no-op (the one hop of
  Django's async methods), ``capture_async_caller()`` (the engine's hop to the thread that
  holds the caller's Django connections), a no-op on the engine's loop
  (``bridge.run_async``), and ``SELECT 1`` on a pooled connection on the engine's loop
  against a synchronous psycopg connection (the cost of asyncio I/O), both through the
  latency proxy and, ``direct``, to the server itself (no proxy: what the proxy adds to
  each side at the same RTT).

Every ``engine`` and ``pool_aget`` result is checked equal to Django's. What a call pays
once, whatever it fetches, tells where the engine cannot gain: a lone query has nothing to
overlap.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from async_prefetch.devtools.bench import runner

WHOLE = ("django", "engine", "django_aget", "pool_aget")
PARTS = (
    "sync_to_async",
    "capture",
    "engine_hop",
    "select1_engine_pool",
    "select1_sync",
    "select1_engine_direct",
    "select1_sync_direct",
)


def _sides(
    alias: str, direct: str
) -> tuple[dict[str, Callable[[], Awaitable[Any]]], Callable[[], None]]:
    """One call of every side (needs Django set up and the bookstore seeded), and what
    closes the connections they opened; ``direct``: the server's own URL (no proxy)."""
    import psycopg
    from asgiref.sync import sync_to_async

    from async_prefetch import aprefetch
    from async_prefetch.devtools.demo.models import Publisher
    from async_prefetch.dispatch import capture_async_caller
    from async_prefetch.execution.pools import connection_kwargs, get_pool
    from async_prefetch.runtime import bridge
    from async_prefetch.terminals import PoolQuerySet

    pk = Publisher.objects.using(alias).order_by("pk").values_list("pk", flat=True)[3]
    expected = list(Publisher.objects.using(alias).values_list("pk", flat=True))
    params = {k: v for k, v in connection_kwargs(alias).items() if k != "cursor_factory"}
    sync_connection = psycopg.Connection.connect(**params)
    sync_direct = psycopg.Connection.connect(direct, autocommit=True)
    engine_direct: list[psycopg.AsyncConnection[Any]] = []

    async def django() -> Any:
        return [p async for p in Publisher.objects.using(alias).all()]

    async def engine() -> Any:
        found = await aprefetch(Publisher.objects.using(alias).all())
        assert [p.pk for p in found] == expected
        return found

    async def django_aget() -> Any:
        return await Publisher.objects.using(alias).aget(pk=pk)

    async def pool_aget() -> Any:
        found = await PoolQuerySet(model=Publisher, using=alias).aget(pk=pk)
        assert found.pk == pk
        return found

    def nothing() -> None:
        return None

    async def nothing_async() -> None:
        return None

    async def hop_to_sync() -> None:
        await sync_to_async(nothing, thread_sensitive=True)()

    async def capture() -> None:
        await capture_async_caller()

    async def engine_hop() -> None:
        await bridge.run_async(nothing_async)

    async def select1_on_pool() -> None:
        pool = await get_pool(alias)
        async with pool.connection() as conn:
            await _select1(conn)

    async def select1_direct() -> None:
        if not engine_direct:
            engine_direct.append(
                await psycopg.AsyncConnection.connect(
                    direct, autocommit=True, cursor_factory=psycopg.AsyncClientCursor
                )
            )
        await _select1(engine_direct[0])

    def timed_on_engine(call: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[float]]:
        """``call`` timed on the engine's loop: the hop is not part of it."""

        async def timed() -> float:
            return float(await bridge.run_async(_timed_on_loop, call))

        return timed

    def blocking(connection: psycopg.Connection[Any]) -> Callable[[], Awaitable[None]]:
        async def select1() -> None:
            connection.execute("SELECT 1").fetchall()

        return select1

    async def close_direct() -> None:
        for connection in engine_direct:
            await connection.close()

    def close() -> None:
        bridge.run_sync(close_direct)
        sync_connection.close()
        sync_direct.close()

    sides: dict[str, Callable[[], Awaitable[Any]]] = {
        "django": django,
        "engine": engine,
        "django_aget": django_aget,
        "pool_aget": pool_aget,
        "sync_to_async": hop_to_sync,
        "capture": capture,
        "engine_hop": engine_hop,
        "select1_engine_pool": timed_on_engine(select1_on_pool),
        "select1_sync": blocking(sync_connection),
        "select1_engine_direct": timed_on_engine(select1_direct),
        "select1_sync_direct": blocking(sync_direct),
    }
    return sides, close


async def _select1(connection: Any) -> None:
    cursor = await connection.execute("SELECT 1")
    await cursor.fetchall()


async def _timed_on_loop(call: Callable[[], Awaitable[Any]]) -> float:
    started = time.perf_counter()
    await call()
    return time.perf_counter() - started


async def _round(call: Callable[[], Awaitable[Any]], calls: int, inner: bool) -> float:
    """Microseconds per call over ``calls`` sequential calls (``inner``: the call times
    itself and returns seconds)."""
    if inner:
        seconds: float = sum([await call() for _ in range(calls)])
        return seconds / calls * 1e6
    started = time.perf_counter()
    for _ in range(calls):
        await call()
    return (time.perf_counter() - started) / calls * 1e6


def measure(
    alias: str, direct: str, rounds: int, calls: int, loop: asyncio.Runner
) -> dict[str, float]:
    """Median microseconds per call of every side, sides alternating round by round."""
    sides, close = _sides(alias, direct)
    inner = {"select1_engine_pool", "select1_engine_direct"}
    try:
        for name, call in sides.items():  # warm-up: pools open, code paths compiled
            loop.run(_round(call, max(calls // 5, 1), name in inner))
        times: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(rounds):
            for name, call in sides.items():
                times[name].append(loop.run(_round(call, calls, name in inner)))
    finally:
        close()
    return {name: statistics.median(values) for name, values in times.items()}


def table(results: dict[float, dict[str, float]]) -> str:
    """A markdown table: one row per RTT, microseconds per call."""
    columns = [*WHOLE, *PARTS]
    lines = [
        "| RTT ms | " + " | ".join(f"{c} us" for c in columns) + " | engine / django |",
        "| ---: |" + " ---: |" * (len(columns) + 1),
    ]
    for rtt, medians in results.items():
        cells = [f"{medians[c]:.0f}" for c in columns]
        ratio = medians["engine"] / medians["django"]
        lines.append(f"| {rtt:g} | " + " | ".join(cells) + f" | {ratio:.2f}x |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure (see the module docstring) and print the table; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m async_prefetch.devtools.bench.overhead")
    parser.add_argument("--rtts", type=float, nargs="+", default=[0.0, 1.0, 5.0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=200, help="sequential calls per round")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.calls < 1:
        parser.error("--rounds and --calls must be at least 1")
    from async_prefetch.devtools.demo.bookstore import seed

    results: dict[float, dict[str, float]] = {}
    with runner.bench_database(args.rtts) as (server, _), asyncio.Runner() as loop:
        seed(200)
        direct = server.url()
        for rtt in args.rtts:
            results[rtt] = measure(runner.alias_for(rtt), direct, args.rounds, args.calls, loop)
            runner.progress(f"overhead @ {rtt:g} ms done")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
