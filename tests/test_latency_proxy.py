"""Tests for async_prefetch.devtools.latency_proxy against a real PostgreSQL.

No Django database access: the tests talk to the server from
:func:`async_prefetch.devtools.embedded.get_server` with plain psycopg, through the proxy
subprocess.

Timing assertions are chosen to be robust on a small, noisy machine: lower bounds are
asserted on every run (the proxy never delivers early and noise only makes things slower);
upper bounds, which show that the proxy does *not* serialize work, use best-of-3 and leave a
wide gap to what a serializing implementation would measure.
"""

from __future__ import annotations

import hashlib
import os
import select
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from async_prefetch.devtools.embedded import ServerInfo, get_server
from async_prefetch.devtools.latency_proxy import LatencyProxyProcess, Upstream

RTT_MS = 20.0
RTT = RTT_MS / 1000.0
# Scheduler slop allowed below a theoretical lower bound.
EARLY = 0.002


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def pg() -> ServerInfo:
    """The test session's PostgreSQL (embedded, or ``DATABASE_URL``)."""
    return get_server()


@pytest.fixture(scope="module")
def pg_upstream(pg: ServerInfo) -> Upstream:
    """The proxy's upstream for ``pg``: its unix socket file, or TCP ``(host, port)``."""
    try:
        return pg.address()
    except ValueError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def proxy0(pg_upstream: Upstream) -> Iterator[LatencyProxyProcess]:
    with LatencyProxyProcess(pg_upstream, rtt_ms=0) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def proxy20(pg_upstream: Upstream) -> Iterator[LatencyProxyProcess]:
    with LatencyProxyProcess(pg_upstream, rtt_ms=RTT_MS) as proxy:
        yield proxy


def via(proxy: LatencyProxyProcess, pg: ServerInfo) -> str:
    """Connection string for ``pg`` that goes through ``proxy``."""
    return make_conninfo(pg.url(), host=proxy.host, port=proxy.port)


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := sock.recv(65536):
            sock.sendall(data)


@pytest.fixture
def echo_server() -> Iterator[tuple[str, int]]:
    """A TCP echo server (exercises the proxy's host:port upstream)."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _EchoHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield ("127.0.0.1", server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_select_1_through_proxy_rtt0(proxy0: LatencyProxyProcess, pg: ServerInfo) -> None:
    assert proxy0.host == "127.0.0.1"
    assert proxy0.port > 0
    with psycopg.connect(via(proxy0, pg), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.anyio
async def test_large_payloads_intact_both_directions(
    proxy20: LatencyProxyProcess, pg: ServerInfo
) -> None:
    """Multi-chunk data keeps its order and content through the delay queues, both ways."""
    up = os.urandom(3 * 1024 * 1024).hex()  # 6 MiB client -> server
    with anyio.fail_after(20):  # a proxy that corrupts the stream may make libpq wait forever
        async with await psycopg.AsyncConnection.connect(via(proxy20, pg), autocommit=True) as conn:
            cur = await conn.execute("SELECT md5(%s::text), length(%s::text)", (up, up))
            assert await cur.fetchone() == (hashlib.md5(up.encode()).hexdigest(), len(up))
            cur = await conn.execute(
                "SELECT s, md5(s) FROM (SELECT string_agg(g::text, ',') AS s"
                " FROM generate_series(1, 1000000) AS g) AS t"  # ~6.9 MB server -> client
            )
            row = await cur.fetchone()
    assert row is not None
    assert hashlib.md5(row[0].encode()).hexdigest() == row[1]
    assert row[0].startswith("1,2,3,")
    assert row[0].endswith(",999999,1000000")


def test_sequential_queries_pay_one_rtt_each(proxy20: LatencyProxyProcess, pg: ServerInfo) -> None:
    with psycopg.connect(via(proxy20, pg), autocommit=True) as conn:
        conn.execute("SELECT 1").fetchone()  # warm up
        t0 = time.perf_counter()
        for _ in range(5):
            assert conn.execute("SELECT 1").fetchone() == (1,)
        elapsed = time.perf_counter() - t0
    assert elapsed >= 5 * RTT - EARLY, elapsed


def _echo_latencies(proxy: LatencyProxyProcess, n: int, gap: float, size: int) -> list[float]:
    """Send ``n`` messages ``gap`` s apart; return each one's echo latency (sorted)."""
    msgs = [bytes([ord("a") + i]) * size for i in range(n)]
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        received = bytearray()
        sent_at: list[float] = []
        arrived_at: list[float] = []
        t0 = time.perf_counter()
        deadline = t0 + 5
        while len(arrived_at) < n:
            now = time.perf_counter()
            assert now < deadline, (len(received), sent_at, arrived_at)
            if len(sent_at) < n and now >= t0 + len(sent_at) * gap:
                sent_at.append(now)  # before sending: keeps the lower bound sound under load
                sock.sendall(msgs[len(sent_at) - 1])
                continue
            wake = t0 + len(sent_at) * gap if len(sent_at) < n else deadline
            if select.select([sock], [], [], max(0.0, wake - now))[0]:
                data = sock.recv(65536)
                assert data, "proxy closed the connection"
                received += data
                done = time.perf_counter()
                arrived_at += [done] * (len(received) // size - len(arrived_at))
    assert bytes(received) == b"".join(msgs)
    return sorted(a - s for a, s in zip(arrived_at, sent_at, strict=True))


def test_chunks_are_delayed_not_serialized(echo_server: tuple[str, int]) -> None:
    """Messages sent 1 ms apart each come back 1 RTT after being sent, in order.

    A proxy that slept rtt/2 per chunk read (instead of queueing chunks with their deadline)
    would hold bytes arriving during that sleep for up to twice the one-way delay, so some
    messages would take ~1.5 RTT. The larger RTT keeps scheduler noise (10-15 ms seen on a
    loaded 2-core CI machine) well inside the margin between 1.3 RTT and that ~1.5 RTT.
    """
    rtt_ms = 100.0
    rtt = rtt_ms / 1000.0
    worst = []
    with LatencyProxyProcess(echo_server, rtt_ms=rtt_ms) as proxy:
        for _ in range(3):  # best of 3 for the upper bound
            latencies = _echo_latencies(proxy, n=20, gap=0.001, size=100)
            assert latencies[0] >= rtt - EARLY, latencies
            worst.append(latencies[-1])
    assert min(worst) < 1.3 * rtt, worst


@pytest.mark.anyio
async def test_pipeline_pays_rtt_once(proxy20: LatencyProxyProcess, pg: ServerInfo) -> None:
    """5 pipelined queries cost ~1 RTT, not 5 (sequential execution would need >= 5 RTT)."""
    with anyio.fail_after(20):
        timings = await _pipeline_timings(proxy20, pg)
    assert min(timings) < 2.5 * RTT, timings


async def _pipeline_timings(proxy: LatencyProxyProcess, pg: ServerInfo) -> list[float]:
    async with await psycopg.AsyncConnection.connect(via(proxy, pg), autocommit=True) as conn:
        await conn.execute("SELECT 1")  # warm up
        timings = []
        for _ in range(3):  # best of 3 for the upper bound
            t0 = time.perf_counter()
            async with conn.pipeline():
                cursors = [await conn.execute("SELECT %s::int", (i,)) for i in range(5)]
            elapsed = time.perf_counter() - t0
            assert [await cur.fetchone() for cur in cursors] == [(i,) for i in range(5)]
            assert elapsed >= RTT - EARLY, elapsed  # the round trip really was delayed
            timings.append(elapsed)
    return timings


@pytest.mark.anyio
async def test_connections_are_not_serialized(proxy20: LatencyProxyProcess, pg: ServerInfo) -> None:
    """3 connections (connect + pg_sleep(0.2) each) through one proxy run concurrently."""

    async def one() -> None:
        async with await psycopg.AsyncConnection.connect(via(proxy20, pg), autocommit=True) as conn:
            await conn.execute("SELECT pg_sleep(0.2)")

    t0 = time.perf_counter()
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(one)
    elapsed = time.perf_counter() - t0
    assert 0.2 + RTT - EARLY <= elapsed < 0.45, elapsed


def test_unreachable_upstream_closes_client(tmp_path: Path, pg: ServerInfo) -> None:
    with (
        LatencyProxyProcess(str(tmp_path / ".s.PGSQL.5432"), rtt_ms=0) as proxy,
        pytest.raises(psycopg.OperationalError),
    ):
        psycopg.connect(via(proxy, pg), connect_timeout=5)


def test_process_stops_listening_on_exit(
    pg_upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)  # the ready line is flushed explicitly
    with LatencyProxyProcess(pg_upstream, rtt_ms=0) as proxy:
        port = proxy.port
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_process_startup_failure_raises() -> None:
    proxy = LatencyProxyProcess("/nonexistent/.s.PGSQL.5432", rtt_ms=-1)
    with pytest.raises(RuntimeError, match="exited with code"):
        proxy.start()
    with pytest.raises(RuntimeError, match="not started"):
        _ = proxy.port
