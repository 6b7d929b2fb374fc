"""``python -m async_prefetch.devtools.bench.load``: calls per second and latency under load.

The ``fanout-100`` workload (100 parents x 10 reverse foreign keys) called by many callers at
once, in one process, through the latency proxy of each RTT (the set-up of
:mod:`async_prefetch.devtools.bench.peers`). Each call fetches and then reads every relation of
every parent once (:func:`~async_prefetch.devtools.bench.peers.read_fanout_django`), and its
result is checked against Django's (outside the call's timed span). The sides (:data:`SIDES`):

* ``django_threads_pool``: ``--threads`` threads, each call ``list(qs.prefetch_related(...))``
  on a Django alias with psycopg's connection pool (``OPTIONS["pool"]``, min = max =
  :data:`~async_prefetch.devtools.bench.runner.POOL_SIZE`, the engine's pool size), the
  connection closed (given back to the pool) after each call as at the end of a request;
* ``django_threads_own``: the same threads, each keeping its own connection (a connection per
  thread, as Django does with persistent connections): ``--threads`` connections;
* ``engine_threads``: the same threads calling the sync API ``prefetch(qs, *lookups)``;
* ``engine_async``: ``--callers`` asyncio tasks calling ``await aprefetch(qs, *lookups)`` on
  one event loop, at most ``--cap`` calls in flight (an ``asyncio.Semaphore``, as an ASGI
  server's concurrency limit would); a call's latency includes its wait for the semaphore;
* ``engine_async_uncapped``: the same tasks without the cap.

Each side runs for ``--seconds`` after an unrecorded warm-up (one second, or ``--seconds``
if shorter); sides alternate
round by round (``--rounds``), the starting side rotating. Every caller loops until the
deadline; calls started before it finish. Calls per second = calls / (last end - start);
p50/p99 over every call of every round; calls/s is the median over rounds. Reports:
``load.md`` and ``load.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from async_prefetch.devtools.bench.peers import prepare, read_fanout_django, versions
from async_prefetch.devtools.bench.runner import POOL_SIZE, alias_for, configure_django, proxied

if TYPE_CHECKING:
    from async_prefetch.devtools.bench.workloads import Workload

WORKLOAD: Final = "fanout-100"
SIDES: Final = (
    "django_threads_pool",
    "django_threads_own",
    "engine_threads",
    "engine_async",
    "engine_async_uncapped",
)
DEFAULT_RTTS: Final = (0.0, 5.0)
POOL_SUFFIX: Final = "_djpool"


class LoadMismatchError(AssertionError):
    """A call under load read other primary keys than Django's prefetch_related."""


@dataclass
class Round:
    """One side's calls in one round: (start, end) per call, seconds since the round began."""

    calls: list[tuple[float, float]] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    """Seconds each call waited for the concurrency limit (capped async callers only)."""

    @property
    def calls_per_second(self) -> float:
        if not self.calls:
            return 0.0
        return len(self.calls) / max(end for _, end in self.calls)


@dataclass
class LoadResult:
    """One side at one RTT: calls/s per round, latency percentiles (ms) over all calls."""

    side: str
    rtt_ms: float
    callers: int
    connections: str
    calls_per_second: list[float] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    service_ms: list[float] = field(default_factory=list, repr=False)
    """Latencies less the wait for the concurrency limit (capped async callers only)."""
    calls: int = 0

    def percentile(self, q: float, service: bool = False) -> float | None:
        """The ``q`` (0-100) percentile of the call latencies (ms); with ``service``, of
        the latencies less the wait for the concurrency limit (``None`` without a limit)."""
        values = self.service_ms if service else self.latencies_ms
        if len(values) < 2:
            return values[0] if values else None
        return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]

    @property
    def median_calls_per_second(self) -> float | None:
        return statistics.median(self.calls_per_second) if self.calls_per_second else None


def _threads_round(
    call: Callable[[], list[Any]],
    threads: int,
    seconds: float,
    check: Callable[[list[Any]], None],
    finish: Callable[[], None],
) -> Round:
    """``threads`` threads calling ``call`` until ``seconds`` have passed; ``finish`` runs in
    each thread after its last call. Raises the first error a thread met."""
    barrier = threading.Barrier(threads + 1)
    out = Round()
    errors: list[BaseException] = []
    lock = threading.Lock()
    origin = [0.0]

    def worker() -> None:
        mine: list[tuple[float, float]] = []
        try:
            barrier.wait()
            deadline = origin[0] + seconds
            while (started := time.perf_counter()) < deadline and not errors:
                shape = call()
                ended = time.perf_counter()
                check(shape)
                mine.append((started - origin[0], ended - origin[0]))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            finish()
            with lock:
                out.calls.extend(mine)

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for thread in workers:
        thread.start()
    origin[0] = time.perf_counter()
    barrier.wait()
    for thread in workers:
        thread.join()
    if errors:
        raise errors[0]
    return out


async def _async_round(
    call: Callable[[], Any],
    callers: int,
    cap: int | None,
    seconds: float,
    check: Callable[[list[Any]], None],
) -> Round:
    """``callers`` tasks awaiting ``call()`` until ``seconds`` have passed, at most ``cap``
    at a time (``None``: no limit); a call's span includes its wait for the limit."""
    limit = asyncio.Semaphore(cap) if cap else None
    out = Round()
    origin = time.perf_counter()
    deadline = origin + seconds

    async def caller() -> None:
        while (started := time.perf_counter()) < deadline:
            if limit is not None:
                async with limit:
                    waited = time.perf_counter() - started
                    shape = await call()
            else:
                shape = await call()
            ended = time.perf_counter()
            check(shape)
            out.calls.append((started - origin, ended - origin))
            if limit is not None:
                out.waits.append(waited)

    async with asyncio.TaskGroup() as group:
        for _ in range(callers):
            group.create_task(caller())
    return out


def run_side(
    side: str,
    workload: Workload,
    rtt_ms: float,
    args: argparse.Namespace,
    runner: asyncio.Runner,
    reference: list[Any],
    seconds: float,
) -> Round:
    """One round of ``side`` for ``seconds``."""
    from django.db import connections

    from async_prefetch import aprefetch, prefetch

    alias = alias_for(rtt_ms)

    def check(shape: list[Any]) -> None:
        if shape != reference:
            raise LoadMismatchError(f"{side} @ {rtt_ms:g} ms read other rows than Django")

    if side == "django_threads_pool":
        pooled = alias + POOL_SUFFIX

        def django_pooled() -> list[Any]:
            try:
                return read_fanout_django(list(workload.queryset(pooled)))
            finally:
                connections[pooled].close()  # back to the pool, as at a request's end

        return _threads_round(django_pooled, args.threads, seconds, check, lambda: None)
    if side == "django_threads_own":
        return _threads_round(
            lambda: read_fanout_django(list(workload.queryset(alias))),
            args.threads,
            seconds,
            check,
            lambda: connections[alias].close(),
        )
    if side == "engine_threads":
        return _threads_round(
            lambda: read_fanout_django(prefetch(workload.root(alias), *workload.lookups())),
            args.threads,
            seconds,
            check,
            lambda: None,
        )

    async def engine_call() -> list[Any]:
        return read_fanout_django(await aprefetch(workload.root(alias), *workload.lookups()))

    cap = None if side == "engine_async_uncapped" else args.cap
    return runner.run(_async_round(engine_call, args.callers, cap, seconds, check))


def _connections_of(side: str, args: argparse.Namespace) -> str:
    if side == "django_threads_own":
        return f"{args.threads} (one per thread)"
    if side == "django_threads_pool":
        return f"{POOL_SIZE} (Django's psycopg pool)"
    return f"{POOL_SIZE} (engine pool)"


def _callers_of(side: str, args: argparse.Namespace) -> int:
    return int(args.callers if side.startswith("engine_async") else args.threads)


def bench_load(
    workload: Workload,
    rtt_ms: float,
    sides: Sequence[str],
    args: argparse.Namespace,
    runner: asyncio.Runner,
) -> list[LoadResult]:
    """Warm up every side, then ``args.rounds`` alternating rounds of each."""
    from django.db import connections

    alias = alias_for(rtt_ms)
    reference = read_fanout_django(list(workload.queryset(alias)))
    connections[alias].close()
    results = {
        side: LoadResult(side, rtt_ms, _callers_of(side, args), _connections_of(side, args))
        for side in sides
    }
    for side in sides:
        run_side(side, workload, rtt_ms, args, runner, reference, min(1.0, args.seconds))
    for index in range(args.rounds):
        order = list(sides[index % len(sides) :]) + list(sides[: index % len(sides)])
        for side in order:
            round_ = run_side(side, workload, rtt_ms, args, runner, reference, args.seconds)
            result = results[side]
            result.calls_per_second.append(round_.calls_per_second)
            latencies = [(end - start) * 1000 for start, end in round_.calls]
            result.latencies_ms += latencies
            if round_.waits:
                pairs = zip(latencies, round_.waits, strict=True)
                result.service_ms += [ms - wait * 1000 for ms, wait in pairs]
            result.calls += len(round_.calls)
            print(
                f"  {side} @ {rtt_ms:g} ms round {index + 1}: {round_.calls_per_second:.1f} "
                f"calls/s ({len(round_.calls)} calls)",
                file=sys.stderr,
                flush=True,
            )
    return [results[side] for side in sides]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _service(result: LoadResult) -> str:
    if not result.service_ms:
        return "-"
    return f"{_fmt(result.percentile(50, True))} / {_fmt(result.percentile(99, True))}"


def load_table(results: Sequence[LoadResult]) -> str:
    """Markdown: calls/s, p50 and p99 per side and RTT, and the engine's ratios to Django."""
    lines = [
        "| RTT ms | side | callers | connections | calls | calls/s (median of rounds) "
        "| p50 ms | p99 ms | p50/p99 ms after admission "
        "| calls/s vs django_threads_own | vs django_threads_pool |",
        "| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        own = next(
            (x for x in results if x.rtt_ms == r.rtt_ms and x.side == "django_threads_own"), None
        )
        pool = next(
            (x for x in results if x.rtt_ms == r.rtt_ms and x.side == "django_threads_pool"), None
        )

        def versus(other: LoadResult | None, r: LoadResult = r) -> str:
            a, b = r.median_calls_per_second, other and other.median_calls_per_second
            return f"{a / b:.2f}x" if a and b else "n/a"

        lines.append(
            f"| {r.rtt_ms:g} | {r.side} | {r.callers} | {r.connections} | {r.calls} "
            f"| {_fmt(r.median_calls_per_second)} | {_fmt(r.percentile(50))} "
            f"| {_fmt(r.percentile(99))} "
            f"| {_service(r)} "
            f"| {versus(own)} | {versus(pool)} |"
        )
    return "\n".join(lines)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m async_prefetch.devtools.bench.load",
        description="Calls/s and latency of fanout-100 under concurrent callers: Django's "
        "threads beside the engine's sync and async APIs.",
    )
    parser.add_argument("--rtts", nargs="+", type=float, metavar="MS", help="default: 0 5")
    parser.add_argument("--threads", type=int, default=32, help="threads (default 32)")
    parser.add_argument("--callers", type=int, default=200, help="async callers (default 200)")
    parser.add_argument(
        "--cap", type=int, default=32, help="async calls in flight at most (default 32)"
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="per round (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per side (default 3)")
    parser.add_argument("--sides", nargs="+", choices=SIDES, metavar="SIDE")
    parser.add_argument("--quick", action="store_true", help="small workload sizes")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    if min(args.threads, args.callers, args.cap, args.rounds) < 1 or args.seconds <= 0:
        parser.error("--threads, --callers, --cap, --rounds and --seconds must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the load bench (see the module docstring); 0, or 1 if a call read wrong rows."""
    args = _parse_args(argv)
    rtts = list(dict.fromkeys(args.rtts or DEFAULT_RTTS))
    sides = list(args.sides or SIDES)
    command = " ".join(["python -m async_prefetch.devtools.bench.load", *(argv or sys.argv[1:])])
    results: list[LoadResult] = []
    errors: list[str] = []
    with proxied(rtts) as (server, proxies):
        pooled = {
            alias + POOL_SUFFIX: server.django_database(
                HOST=host,
                PORT=str(port),
                OPTIONS={
                    **dict(server.options),
                    "pool": {"min_size": POOL_SIZE, "max_size": POOL_SIZE, "timeout": 120},
                },
            )
            for alias, (host, port) in proxies.items()
        }
        configure_django(server, proxies, pooled)
        from django.db import connections

        from async_prefetch import aclose
        from async_prefetch.runtime import bridge

        try:
            workload = prepare([WORKLOAD], args.quick)[WORKLOAD]
            facts = versions(server)
            with asyncio.Runner() as runner:
                for rtt in rtts:
                    try:
                        results += bench_load(workload, rtt, sides, args, runner)
                    except Exception as exc:  # reported; the other RTTs still run
                        errors.append(f"RTT {rtt:g} ms: {exc!r}")
                        print(f"FAILED at RTT {rtt:g} ms: {exc!r}", file=sys.stderr)
                    finally:  # one RTT's pools open at a time (max_connections)
                        runner.run(aclose())
                        connections[alias_for(rtt) + POOL_SUFFIX].close_pool()  # type: ignore[attr-defined]
        finally:
            bridge.shutdown()
    table = load_table(results)
    report = "\n".join(
        [
            "# Load: fanout-100 under concurrent callers",
            "",
            f"- {facts['date']}, git {facts['git']}; {facts['cpus']} CPUs, load average at the "
            f"start {facts['load']}; Python {facts['python']}, Django {facts['django']}, "
            f"psycopg {facts['psycopg']}, PostgreSQL {facts['postgresql']}",
            f"- command: `{command}`",
            f"- {args.threads} threads; {args.callers} async callers, at most {args.cap} calls "
            f"in flight (engine_async) or no limit (engine_async_uncapped); {args.rounds} rounds "
            f"of {args.seconds:g} s per side",
            "",
            table,
            *(["", "## FAILURES", "", *errors] if errors else []),
        ]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load.md").write_text(report + "\n")
    (args.out / "load.json").write_text(
        json.dumps(
            {
                "facts": facts,
                "command": command,
                "results": [
                    {
                        **asdict(r),
                        "latencies_ms": None,
                        "service_ms": None,
                        "p50": r.percentile(50),
                        "p99": r.percentile(99),
                    }
                    for r in results
                ],
                "errors": errors,
            },
            indent=2,
        )
        + "\n"
    )
    print(report)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
